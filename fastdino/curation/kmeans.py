"""k-means for curation (SPEC.md §5): k-means++ initialisation, Lloyd iterations, L2 distance,
float64 sums, chunked over rows (fastdino.curation.rows), sharded over ranks.

    res = kmeans(Rows(x, device), k=100, n_iters=50, rng=np.random.default_rng(0))
    res.centroids [k, D] fp32, res.assignment [N] int64 (-1: unreadable row), res.dist2 [N] fp32

Following facebookresearch/ssl-data-curation `src/kmeans_gpu.py` (no code copied):
- k-means++ (the scikit-learn variant): the first centre uniformly at random, then each next centre
  from 2 + ln k candidates drawn with probability ∝ the squared distance to the closest chosen
  centre, keeping the candidate that lowers the potential most.
- Lloyd: assign every point to its nearest centroid (the fused Triton kernel on GPU,
  kernels/kmeans_assign.py; its PyTorch reference on CPU), centroid = mean of its points summed
  in float64; an empty cluster keeps its centroid. `n_iters` updates (50 in the paper's configs),
  stopping early only at an exact fixed point, then one final assignment.
Distributed: every rank streams its shard; centroid sums, counts, potentials and the k-means++
candidates are all-reduced through fastdino.dist, and all ranks draw the same random numbers
(same seeded generator, draws never depend on rank-local data), so they hold identical centroids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fastdino import dist
from fastdino.curation.rows import Rows, gather_rows_result
from fastdino.kernels.kmeans_assign import kmeans_assign, kmeans_assign_ref
from fastdino.layers.select import use_triton

logger = logging.getLogger("fastdino.curation")


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, D] fp32, on the rows' device
    assignment: np.ndarray  # [N] int64 nearest centroid; -1 for non-finite rows
    dist2: np.ndarray  # [N] fp32 squared distance to it; inf for non-finite rows
    inertia: float  # Σ dist2 over the assigned rows (the k-means objective)
    n_iters: int  # Lloyd updates run


def assign_chunk(x: torch.Tensor, centroids: torch.Tensor, impl: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, D] (working dtype), centroids [k, D] fp32 -> (idx [n] int64, dist2 [n] fp32)."""
    c = centroids.to(x.dtype)
    if use_triton(impl, x, "kmeans_assign"):
        return kmeans_assign(x, c)
    return kmeans_assign_ref(x, c)


def _sq_dists(x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[n, D] x [t, D] -> [n, t] fp32 squared distances (small t: k-means++ candidates)."""
    x = x.float()
    d = x.square().sum(1, keepdim=True) - 2 * x @ cand.T + cand.square().sum(1)
    return d.clamp_min_(0)


def kmeans_plusplus(rows: Rows, k: int, rng: np.random.Generator,
                    n_local_trials: int | None = None) -> torch.Tensor:
    """k initial centroids [k, D] fp32 by greedy k-means++ (module docstring)."""
    trials = n_local_trials or 2 + int(math.log(k))
    ids = [i for i, _ in rows.chunks()]
    # closest squared distance of every local row to the chosen centres; first draw: uniform
    closest = [torch.ones(len(i), dtype=torch.float64, device=rows.device) for i in ids]
    centres = torch.empty(k, rows.dim, dtype=torch.float32, device=rows.device)
    centres[0] = _draw_rows(closest, ids, rows, 1, rng)[0]
    closest = [_sq_dists(x, centres[:1])[:, 0].double() for _, x in rows.chunks()]
    for j in range(1, k):
        cand = _draw_rows(closest, ids, rows, trials, rng)  # [t, D]
        pot = torch.zeros(trials, dtype=torch.float64, device=rows.device)
        new = []
        for (_, x), cl in zip(rows.chunks(), closest, strict=True):
            m = torch.minimum(cl[:, None], _sq_dists(x, cand).double())  # [n, t]
            pot += m.sum(0)
            new.append(m)
        dist.all_reduce_sum(pot)
        best = int(torch.argmin(pot))  # same on every rank (same sums)
        centres[j] = cand[best]
        closest = [m[:, best].contiguous() for m in new]
    return centres


def _draw_rows(weights: list[torch.Tensor], ids: list[torch.Tensor], rows: Rows, t: int,
               rng: np.random.Generator, uniform: bool = False) -> torch.Tensor:
    """t rows drawn with probability ∝ weight, globally over ranks -> [t, D] fp32 on every rank.
    weights / ids: this rank's per-chunk weights (fp64) and global row ids."""
    w = torch.cat(weights) if weights else torch.zeros(0, dtype=torch.float64, device=rows.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    pots = torch.zeros(world, dtype=torch.float64, device=rows.device)
    pots[rank] = w.sum()
    dist.all_reduce_sum(pots)  # every rank's potential
    cum = torch.cumsum(pots, 0).cpu().numpy()
    if cum[-1] <= 0 and uniform:
        raise ValueError("k-means: no finite embedding to cluster")
    if cum[-1] <= 0:  # every point sits on a chosen centre: fewer distinct points than clusters
        logger.warning("k-means++: fewer distinct points than clusters (e.g. a backbone whose "
                       "embeddings do not depend on the image): drawing duplicate centres")
        return _draw_rows([torch.ones_like(wi) for wi in weights], ids, rows, t, rng, True)
    u = rng.random(t) * cum[-1]  # identical on every rank
    owner = np.minimum(np.searchsorted(cum, u, side="right"), world - 1)
    out = torch.zeros(t, rows.dim, dtype=torch.float32, device=rows.device)
    mine = np.nonzero(owner == rank)[0]
    if len(mine) and len(w):
        before = cum[rank] - pots[rank].item()
        target = torch.tensor(u[mine] - before, dtype=torch.float64, device=w.device)
        pos = torch.searchsorted(torch.cumsum(w, 0), target).clamp_(max=len(w) - 1)
        picked = torch.cat(ids)[pos].cpu().numpy()
        out[torch.from_numpy(mine).to(rows.device)] = rows.gather(picked)
    return dist.all_reduce_sum(out)


def _lloyd_pass(rows: Rows, centroids: torch.Tensor, impl: str):
    """One pass: (sums [k, D] fp64, counts [k] fp64, inertia) over all ranks."""
    k = centroids.shape[0]
    sums = torch.zeros(k, rows.dim, dtype=torch.float64, device=rows.device)
    counts = torch.zeros(k, dtype=torch.float64, device=rows.device)
    inertia = torch.zeros(1, dtype=torch.float64, device=rows.device)
    for _, x in rows.chunks():
        idx, d2 = assign_chunk(x, centroids, impl)
        sums.index_add_(0, idx, x.double())
        counts += torch.bincount(idx, minlength=k).double()
        inertia += d2.double().sum()
    for t in (sums, counts, inertia):
        dist.all_reduce_sum(t)
    return sums, counts, inertia.item()


def assign_all(rows: Rows, centroids: torch.Tensor, impl: str = "auto"
               ) -> tuple[np.ndarray, np.ndarray]:
    """(assignment [N] int64, dist2 [N] fp32) of every row, gathered on every rank."""
    n_local = rows.stop - rows.start
    idx = torch.full((n_local,), -1, dtype=torch.int64, device=rows.device)
    d2 = torch.full((n_local,), float("inf"), dtype=torch.float32, device=rows.device)
    for ids, x in rows.chunks():
        i, d = assign_chunk(x, centroids, impl)
        idx[ids - rows.start], d2[ids - rows.start] = i, d
    idx = gather_rows_result(idx, rows.start, rows.stop, rows.shard, rows.n, -1)
    d2 = gather_rows_result(d2, rows.start, rows.stop, rows.shard, rows.n, float("inf"))
    return idx.cpu().numpy(), d2.cpu().numpy()


def kmeans(rows: Rows, k: int, rng: np.random.Generator, n_iters: int = 50,
           impl: str = "auto", init: torch.Tensor | None = None, done: int = 0,
           on_update: Callable[[torch.Tensor, int], None] | None = None) -> KMeansResult:
    """k-means++ (or `init` [k, D]), up to `n_iters` Lloyd updates, the final assignment.
    Resuming: `init` = the centroids after `done` updates continues exactly where they were.
    `on_update(centroids, done)` after the k-means++ init (done = 0) and each update that moved
    them (`curate cluster` saves its progress there)."""
    if k < 1:
        raise ValueError(f"k-means: the number of clusters must be >= 1, got {k}")
    if k > rows.n_finite():  # (non-finite rows, undecodable images, are never clustered)
        raise ValueError(f"k-means: {k} clusters for only {rows.n_finite()} points: use at most "
                         f"{rows.n_finite()}")
    if init is None:
        c = kmeans_plusplus(rows, k, rng)
        if on_update is not None:
            on_update(c, 0)
    else:
        c = init.float().to(rows.device).clone()
    while done < n_iters:
        done += 1
        sums, counts, _ = _lloyd_pass(rows, c, impl)
        empty = counts == 0
        new = torch.where(empty[:, None], c.double(), sums / counts.clamp_min(1)[:, None]).float()
        if torch.equal(new, c):  # exact fixed point: further iterations change nothing
            break
        c = new
        if on_update is not None and done < n_iters:
            on_update(c, done)
    assignment, dist2 = assign_all(rows, c, impl)
    ok = assignment >= 0
    return KMeansResult(c, assignment, dist2, float(dist2[ok].astype(np.float64).sum()), done)
