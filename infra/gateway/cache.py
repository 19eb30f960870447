"""Bounded caches of the gateway: a least-recently-used dict and the encoded frames by position."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


class Lru(OrderedDict[_K, _V]):
    """A dict that forgets its least recently used entries beyond `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_fresh(self, key: _K) -> _V | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class FrameCache:
    """Encoded frames by event position, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._frames: OrderedDict[int, tuple[bytes, ...]] = OrderedDict()

    def get(self, position: int) -> tuple[bytes, ...] | None:
        frames = self._frames.get(position)
        if frames is not None:
            self._frames.move_to_end(position)
        return frames

    def put(self, position: int, frames: tuple[bytes, ...]) -> None:
        size = sum(len(f) for f in frames)
        if size > self._max // 4 or position in self._frames:
            return
        self._frames[position] = frames
        self._bytes += size
        while self._bytes > self._max:
            _, old = self._frames.popitem(last=False)
            self._bytes -= sum(len(f) for f in old)
