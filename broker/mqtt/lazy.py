"""Containers that allocate nothing until the first item: one per session of a
home server's 20,000 idle clients, almost all of them empty all their life.
NO_DICT is the same as NO_QUEUE for a dict.

An empty `deque()` costs ~760 bytes (it always holds one 64-slot block) and an
empty `set()` 216. A session's outgoing queue is the shared NO_QUEUE until its
first message is queued (a real deque from then on: its hot loops stay at C
speed); its QoS 2 ids are the shared NO_SET until the first, then a LazySet
(one slotted object, 40 bytes, whose set exists only while it holds ids).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Final, Generic, Self, TypeVar

T = TypeVar("T")


class _SharedEmptyDeque(deque[Any]):
    """NO_QUEUE: reads (len, truth, iteration, [0]) are a deque's own, at C speed;
    adding to it raises, so a session that forgot own_queue() fails loudly instead
    of queueing into every idle session's queue."""

    __slots__ = ()

    def _refuse(self, *_args: object) -> None:
        raise TypeError("NO_QUEUE is shared by every idle session: add to SessionState.own_queue()")

    append = appendleft = extend = extendleft = insert = _refuse  # type: ignore[assignment]

    def __iadd__(self, _other: Iterable[Any]) -> Self:
        raise TypeError("NO_QUEUE is shared by every idle session: add to SessionState.own_queue()")


# The outgoing queue of every session that has never queued a message: an empty
# deque() is ~760 bytes (it always holds one 64-slot block) per idle session.
NO_QUEUE: Final[deque[Any]] = _SharedEmptyDeque()


class _SharedEmptyDict(dict[Any, Any]):
    """NO_DICT: reads (get, in, len, items, pop of a missing key, clear) are a dict's
    own; adding to it raises, like NO_QUEUE's."""

    __slots__ = ()

    def _refuse(self, *_args: object, **_kw: object) -> Any:
        raise TypeError("NO_DICT is shared by every idle session: add to the session's own dict (own_...())")

    __setitem__ = setdefault = update = __ior__ = _refuse  # type: ignore[assignment]


# A session's in-flight window and MQTT 5 subscription options until their first
# entry: an empty dict is 64 bytes per idle session.
NO_DICT: Final[dict[Any, Any]] = _SharedEmptyDict()


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


class _SharedEmptyLazySet(LazySet[Any]):
    """NO_SET: an empty LazySet whose reads (in, len, truth, iteration) and removals
    (discard, clear: nothing to remove) work; adding raises, like NO_DICT's."""

    __slots__ = ()

    def add(self, item: Any) -> None:
        raise TypeError("NO_SET is shared by every idle session: add to the session's own set (own_...())")

    def update(self, items: Iterable[Any]) -> None:
        for _ in items:
            raise TypeError("NO_SET is shared by every idle session: add to the session's own set (own_...())")


# A session's QoS 2 packet ids until its first: a LazySet is 40 bytes per idle session.
NO_SET: Final[LazySet[Any]] = _SharedEmptyLazySet()
