"""A tiny name -> object registry (timm style) for everything chosen by a string in YAML."""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a `KeyError` that lists the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REG.register("name")` stores the decorated object under `name`."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj
        return deco

    def add(self, name: str, obj: T) -> T:
        """Register `obj` under `name` without a decorator."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """Return the object registered as `name`; raise KeyError naming the valid names otherwise."""
        if not isinstance(name, str) or name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Call the registered factory `name` with keyword arguments."""
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
