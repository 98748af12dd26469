"""The ranks share a first run's tar-shard indexing (fastdino/data/sources.py): 2 gloo ranks
build the training dataset together from 6 shards with an empty index cache; each rank indexes 3
of them (its share, into the cache) and reads the others from the cache, and both get the table
a single process builds, for data.root and for a file list naming the shards."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from spawn_ranks import mark_done, spawn_ranks
from trainer_helpers import REPO, _free_port


def _worker(rank: int, world: int, port: int, out_dir: str, shards: str, cache: str) -> None:
    os.environ["FASTDINO_CACHE"] = cache
    import torch.distributed as tdist

    from fastdino.data import sources
    from fastdino.data.datasets import ImageFolderUnlabeled

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    try:
        opened = []
        real = sources.index_shard

        def counting(path):
            opened.append(Path(path).name)
            return real(path)

        sources.index_shard = counting
        by_root = ImageFolderUnlabeled(root=shards, ranks=(rank, world))
        first = sorted(opened)
        opened.clear()
        listing = Path(out_dir) / "list.txt"
        by_list = ImageFolderUnlabeled(file_list=listing, ranks=(rank, world))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "indexed": first, "indexed_again": opened, "root": list(by_root.paths),
            "list": list(by_list.paths)}))
        tdist.barrier()
        mark_done(out_dir, rank)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_share_the_first_indexing(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from data_helpers import pack_shards

    from fastdino.data import sample_images_dir
    from fastdino.data.datasets import ImageFolderUnlabeled

    shards = pack_shards(sample_images_dir(), tmp_path / "shards", per_shard=3)
    names = sorted(p.name for p in shards.iterdir())
    assert len(names) == 6
    (tmp_path / "list.txt").write_text("".join(f"{shards / n}\n" for n in names))
    spawn_ranks(_worker, (2, _free_port(), str(tmp_path), str(shards), str(tmp_path / "cache")),
                2, str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["indexed"] == names[0::2] and res[1]["indexed"] == names[1::2]
    assert res[0]["indexed_again"] == res[1]["indexed_again"] == []  # the list: all cached
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache_single"))
    single = list(ImageFolderUnlabeled(root=shards).paths)
    assert len(single) == 18
    for r in res:
        assert r["root"] == single and r["list"] == single
