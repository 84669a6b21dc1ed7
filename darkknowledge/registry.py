"""One generic registry: register by name, look up with "did you mean", list."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from darkknowledge.errors import RegistryError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table for losses, models, datasets, schemes.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("mlp")
        ... def mlp(**kw): ...
        >>> MODELS.get("mlp")  # the function
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable[[T], T]:
        """Decorator that registers an object under ``name`` (default: its ``__name__``).

        Args:
            name: Registry key; lower-case by convention.
            overwrite: Allow replacing an existing entry (otherwise a duplicate is an error).
        """

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register {obj!r} as a {self.kind}: give it a name")
            if key in self._items and not overwrite and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T, *, overwrite: bool = False) -> T:
        """Register ``obj`` under ``name`` without the decorator syntax."""
        return self.register(name, overwrite=overwrite)(obj)

    def get(self, name: str) -> T:
        """Return the entry named ``name``; unknown names raise with the closest valid names."""
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} "
                f"Valid {self.kind} names: {', '.join(known) or '(none registered)'}."
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """All (name, entry) pairs, sorted by name."""
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
