"""Containers that allocate nothing until the first item: one per session of a
home server's 20,000 idle clients, almost all of them empty all their life.

An empty `deque()` costs ~760 bytes (it always holds one 64-slot block) and an
empty `set()` 216; these cost one slotted object (~48 bytes) until used, and
give the storage back when emptied. They offer exactly what the engine calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class LazyDeque(Generic[T]):
    """A FIFO (`append` at the right, `popleft`) whose deque exists only while it
    holds something."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[T] | None = None

    def append(self, item: T) -> None:
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> T:
        items = self._items
        if items is None:
            raise IndexError("pop from an empty deque")
        item = items.popleft()
        if not items:
            self._items = None
        return item

    def clear(self) -> None:
        self._items = None

    def __getitem__(self, index: int) -> T:
        if self._items is None:
            raise IndexError("deque index out of range")
        return self._items[index]

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __bool__(self) -> bool:
        return self._items is not None

    def __iter__(self) -> Iterator[T]:
        return iter(()) if self._items is None else iter(self._items)


class LazySet(Generic[T]):
    """A set whose storage exists only while it holds something."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: set[T] | None = None

    def add(self, item: T) -> None:
        if self._items is None:
            self._items = set()
        self._items.add(item)

    def update(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)

    def discard(self, item: T) -> None:
        items = self._items
        if items is not None:
            items.discard(item)
            if not items:
                self._items = None

    def clear(self) -> None:
        self._items = None

    def __contains__(self, item: object) -> bool:
        return self._items is not None and item in self._items

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def __bool__(self) -> bool:
        return self._items is not None

    def __iter__(self) -> Iterator[T]:
        return iter(()) if self._items is None else iter(self._items)
