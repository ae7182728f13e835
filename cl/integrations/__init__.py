"""Bridges to other continual-learning libraries.

Submodules are imported explicitly (``from cl.integrations.avalanche import ClsimStrategy``); nothing is imported
here, so ``import cl`` never pays for (or requires) a third-party library.
"""

__all__: list[str] = []
