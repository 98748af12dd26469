"""The packed per-image tables (fastdino/data/packed.py): list semantics, and the reason they
exist: a forked worker reading them does not copy them."""

import os
import sys

import pytest

from fastdino.data.packed import PackedLocations, PackedStrings
from fastdino.data.sources import Member


def test_packed_strings_behave_as_the_list():
    items = ["/a/b.jpg", "", "ünï/cödé.png", "x" * 300, "/s.tar/0.png"]
    p = PackedStrings(items)
    assert len(p) == 5 and list(p) == items and p == items and items == p
    assert [p[i] for i in range(-5, 5)] == items + items
    assert p[1:4] == items[1:4] and p[::-2] == items[::-2]
    assert "x" * 300 in p and p.index("/s.tar/0.png") == 4
    assert p != items[:4] and p != items[::-1] and PackedStrings([]) == []
    for bad in (5, -6):
        with pytest.raises(IndexError):
            p[bad]


def test_packed_strings_keep_file_names_that_are_not_utf8(tmp_path):
    """A file named b'caf\\xe9.jpg' (Latin-1) is 'caf\\udce9.jpg' to os: packed and read back
    unchanged, still naming the file (its UTF-8 encoding raised UnicodeEncodeError)."""
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write(b"x")
    name = next(e.path for e in os.scandir(tmp_path))
    assert "\udce9" in name
    p = PackedStrings(["/a.jpg", name, "ünï.png"])
    assert list(p) == ["/a.jpg", name, "ünï.png"]
    with open(p[1], "rb") as f:
        assert f.read() == b"x"


def test_packed_locations_give_back_files_and_members():
    names = PackedStrings(["/d/a.jpg", "/s1.tar/x.png", "/d/b.jpg", "/s0.tar/y.png"])
    locs = ["/d/a.jpg", Member("/s1.tar", 512, 7), "/d/b.jpg", Member("/s0.tar", 2048, 2**40)]
    packed = PackedLocations(names, locs)
    assert packed == locs and packed[-1] == locs[-1] and packed[1:3] == locs[1:3]
    assert packed.shards == ["/s1.tar", "/s0.tar"]  # one entry per shard
    with pytest.raises(ValueError, match="3 locations for 4 names"):
        PackedLocations(names, locs[:3])


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))


def _child_growth_kb(table) -> int:
    """Private memory a forked child gains by reading every item of `table` in a scattered
    order (i -> 7919·i mod n, a permutation for n coprime to 7919; no index list, whose own int
    objects would be touched too)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a loader worker does, reads items and nothing else
        base = _private_dirty_kb()
        n = len(table)
        for k in range(n):
            table[k * 7919 % n]
        os.write(w, str(_private_dirty_kb() - base).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return int(f.read())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_a_forked_worker_does_not_copy_the_packed_names():
    """A list of str is copied page by page into a forked worker that reads it (reference counts
    are written); the packed table is not. Same names, same reads, in one process."""
    names = [f"/data/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG" for i in range(300_000)]
    listed = _child_growth_kb(names)
    packed = _child_growth_kb(PackedStrings(names))
    assert listed > 10_000, listed  # ~30 MB of str objects touched
    assert packed < listed / 5, (packed, listed)
