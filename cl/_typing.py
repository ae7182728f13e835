"""Static-typing helpers; nothing here exists at runtime.

``nn.ModuleDict`` types every item as ``nn.Module``. :class:`ModuleDictOf` is a type-checker-only view of a
``ModuleDict`` whose values all have one type, so ``model.sites[key].router`` type-checks without a cast at every use::

    self.sites = cast("ModuleDictOf[AdaptedSite]", nn.ModuleDict())

At runtime the attribute is the plain ``nn.ModuleDict`` (the cast is the identity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__: list[str] = []

if TYPE_CHECKING:
    from collections.abc import ItemsView, Iterator, ValuesView
    from typing import Generic, TypeVar

    from torch import nn

    M = TypeVar("M", bound=nn.Module)

    class ModuleDictOf(nn.ModuleDict, Generic[M]):
        """An ``nn.ModuleDict`` whose values are all ``M`` (static view only)."""

        def __getitem__(self, key: str) -> M: ...
        def __iter__(self) -> Iterator[str]: ...
        def items(self) -> ItemsView[str, M]: ...
        def values(self) -> ValuesView[M]: ...
        def pop(self, key: str) -> M: ...
