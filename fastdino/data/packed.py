"""Per-image tables that forked loader workers share instead of copying.

A dataset's list of N file names is N Python str objects. Loader workers are forked and share
the parent's memory copy-on-write, but reading item i touches its object's reference count, a
write to the page that holds it: over an epoch every page is copied into every worker. Measured
on this project's 2-core CI machine: a worker reading 3M random items of a list of 2M
ImageNet-style paths (~60 characters) grew by 222 MB of private memory; from the same names
packed into one uint8 buffer with offsets (`PackedStrings`) by 6 MB. At ImageNet-22k's 14M
images that is ~1.5 GB per worker, times workers, times ranks per node: the host-RAM OOM users
report with the official loader (USERS.md §4, v3#268). The tables here hold no Python object per
item: one numpy buffer each, which reads never write to.
"""

from __future__ import annotations

import operator
from abc import abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

from fastdino.data.sources import Location, Member


class _Table(Sequence):
    """Sequence plumbing shared by the tables: slices give lists, == compares item by item with
    any sequence (a list included), as a list would; subclasses define `_item(i)`, i in range."""

    @abstractmethod
    def _item(self, i: int):
        """Item i, 0 <= i < len(self)."""

    def _check(self, i) -> int:
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return i

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(len(self)))]
        return self._item(self._check(i))

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(
                a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # equal to lists, so not hashable (as a list)


class PackedStrings(_Table):
    """An immutable sequence of str kept as one UTF-8 buffer and the end offset of each item.
    surrogateescape both ways: a file name that is not UTF-8 (b'caf\\xe9.jpg') comes from os as a
    str with surrogates ('caf\\udce9.jpg'), which round-trips unchanged, as os.fsencode does."""

    def __init__(self, items: Iterable[str]) -> None:
        # transient: freed when the buffer is built
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        self._ends = np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64,
                                           count=len(encoded)))
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def _item(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._buf[start:int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"PackedStrings([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class PackedLocations(_Table):
    """Where each image is: item i is `names[i]` (a file: its name is its path) or a tar
    `Member`, kept as arrays (shard number, -1 for a file; offset; size) and the list of shards."""

    def __init__(self, names: PackedStrings, locations: Iterable[Location]) -> None:
        self._names = names
        shard_ids: dict[str, int] = {}
        n = len(names)
        self._shard = np.full(n, -1, dtype=np.int32)
        self._offset = np.zeros(n, dtype=np.int64)
        self._size = np.zeros(n, dtype=np.int64)
        count = 0
        for i, loc in enumerate(locations):
            count += 1
            if isinstance(loc, Member):  # (a file's location is its name: nothing to store)
                self._shard[i] = shard_ids.setdefault(loc.shard, len(shard_ids))
                self._offset[i], self._size[i] = loc.offset, loc.size
        if count != n:
            raise ValueError(f"{count} locations for {n} names")
        self.shards = list(shard_ids)  # one str per shard, not per image

    def __len__(self) -> int:
        return len(self._shard)

    def _item(self, i: int) -> Location:
        s = int(self._shard[i])
        if s < 0:
            return self._names[i]
        return Member(self.shards[s], int(self._offset[i]), int(self._size[i]))
