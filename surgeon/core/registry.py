"""A tiny name -> factory registry (as timm does for models), used for judges, policies, surgery modes,
image sources and exporters instead of if-chains."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from surgeon.core.errors import InvalidInput

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._options: dict[str, list[str]] = {}

    def register(self, name: str, options: Iterable[str] = ()) -> Callable[[T], T]:
        """`options`: the request fields the entry reads (what ListPolicies tells a client to set)."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            self._options[name] = list(options)
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise InvalidInput(
                f"unknown {self.kind} {name!r}", hint=f"choose one of: {', '.join(self.names())}"
            ) from None

    def options(self, name: str) -> list[str]:
        self.get(name)  # an unknown name is InvalidInput
        return list(self._options[name])

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
