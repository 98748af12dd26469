"""The curation k-means across 2 CPU ranks (gloo): each rank streams its shard, the sums go through
fastdino.dist, and both ranks end with the single-process result (centroids, gathered assignment,
inertia)."""

import numpy as np
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from fastdino.curation.kmeans import kmeans
from fastdino.curation.rows import Rows


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 6)) * 8
    return (centers[rng.integers(0, 5, 301)] + rng.normal(size=(301, 6))).astype(np.float32)


def _worker(rank: int, init: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rows = Rows(_data(), "cpu", chunk_rows=40, resident_bytes=0)
        assert (rows.start, rows.stop) == ((0, 151) if rank == 0 else (151, 301))
        res = kmeans(rows, 5, np.random.default_rng(3), n_iters=30)
        torch.save({"c": res.centroids, "a": torch.from_numpy(res.assignment),
                    "inertia": res.inertia}, f"{out}.{rank}")
        tdist.barrier()  # no rank tears gloo down while the other has a pending op
    finally:
        tdist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(tmp_path / "res")), nprocs=2, join=True)
    single = kmeans(Rows(_data(), "cpu"), 5, np.random.default_rng(3), n_iters=30)
    for rank in range(2):
        got = torch.load(tmp_path / f"res.{rank}", weights_only=True)
        np.testing.assert_array_equal(got["a"].numpy(), single.assignment)
        torch.testing.assert_close(got["c"], single.centroids, rtol=1e-5, atol=1e-5)
        assert abs(got["inertia"] - single.inertia) <= 1e-6 * single.inertia
