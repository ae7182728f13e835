"""Continual-learning strategies. Importing this package registers every built-in strategy."""

from strategies import finetune, joint, lae, mhr, mos, sema, simplecil  # noqa: F401  (registration)

__all__: list[str] = []
