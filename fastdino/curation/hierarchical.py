"""Hierarchical k-means with resampling steps (SPEC.md §5; Vo et al., TMLR 2024,
facebookresearch/ssl-data-curation `src/hierarchical_kmeans_gpu.py`; no code copied).

    levels = hierarchical_kmeans(Rows(emb, device), clusters=[100, 20, 5], resampling_steps=[10]*3,
                                 sample_sizes=[10, 3, 2], rng=np.random.default_rng(0))
    levels[l].centroids [k_l, D]; levels[l].assignment [n_{l-1}] (level 1: one per embedding,
    level l > 1: one per level-(l-1) cluster); levels[l].dist2 the squared distance to it

Level 1 clusters the embeddings; level l clusters the centroids of level l-1. Each level runs
k-means (k-means++ init, Lloyd), then `resampling_steps` times: take from every cluster its
`sample_size` points closest to the centroid ("c"; or random ones, "r"), re-run k-means with the
same k on this balanced sample, and re-assign all points to the new centroids. The resampling is
what moves centroids from the dense modes of the data towards a uniform cover of its concepts.
A sample size <= 1 means no resampling at that level (as the reference code). If the sample holds
fewer than k points (many tiny or empty clusters) it is topped up with random other points, so the
level always keeps exactly k centroids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fastdino.curation.kmeans import KMeansResult, assign_all, kmeans
from fastdino.curation.rows import Rows

logger = logging.getLogger("fastdino.curation")
STRATEGIES = ("c", "r")


def balanced_sample(assignment: np.ndarray, dist2: np.ndarray, k: int, sample_size: int,
                    strategy: str, rng: np.random.Generator) -> np.ndarray:
    """Sorted row ids: up to `sample_size` rows per cluster, closest to the centroid first ("c")
    or at random ("r"). Rows with assignment -1 are never taken."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling strategy {strategy!r} is invalid: allowed is 'c' (closest to "
                         "the centroid) or 'r' (random)")
    ok = np.nonzero(assignment >= 0)[0]
    key = dist2[ok] if strategy == "c" else rng.random(len(ok))
    order = ok[np.lexsort((key, assignment[ok]))]  # by cluster, then by key
    a = assignment[order]
    first = np.searchsorted(a, np.arange(k))  # start of each cluster in `order`
    rank_in_cluster = np.arange(len(order)) - first[a]
    return np.sort(order[rank_in_cluster < sample_size])


def _top_up(sample: np.ndarray, assignment: np.ndarray, k: int,
            rng: np.random.Generator) -> np.ndarray:
    if len(sample) >= k:
        return sample
    rest = np.setdiff1d(np.nonzero(assignment >= 0)[0], sample)
    extra = rng.choice(rest, size=min(len(rest), k - len(sample)), replace=False)
    logger.info("resampling: %d sampled points < k=%d, added %d random points", len(sample), k,
                len(extra))
    return np.sort(np.concatenate([sample, extra]))


def kmeans_with_resampling(rows: Rows, k: int, resampling_steps: int, sample_size: int,
                           rng: np.random.Generator, n_iters: int = 50, strategy: str = "c",
                           impl: str = "auto") -> KMeansResult:
    """One level: k-means, then the resampling steps (module docstring)."""
    res = kmeans(rows, k, rng, n_iters=n_iters, impl=impl)
    logger.info("k-means k=%d: inertia %.6g after %d iterations", k, res.inertia, res.n_iters)
    if sample_size <= 1:
        return res
    for step in range(resampling_steps):
        ids = balanced_sample(res.assignment, res.dist2, k, sample_size, strategy, rng)
        ids = _top_up(ids, res.assignment, k, rng)
        sample = Rows(rows.gather(ids), rows.device)
        centroids = kmeans(sample, k, rng, n_iters=n_iters, impl=impl).centroids
        assignment, dist2 = assign_all(rows, centroids, impl)
        ok = assignment >= 0
        res = KMeansResult(centroids, assignment, dist2,
                           float(dist2[ok].astype(np.float64).sum()), res.n_iters)
        logger.info("resampling step %d/%d (k=%d, sample %d): inertia %.6g", step + 1,
                    resampling_steps, k, len(ids), res.inertia)
    return res


def hierarchical_kmeans(rows: Rows, clusters: Sequence[int], resampling_steps: Sequence[int],
                        sample_sizes: Sequence[int], rng: np.random.Generator,
                        n_iters: int = 50, strategy: str = "c", impl: str = "auto"
                        ) -> list[KMeansResult]:
    """One KMeansResult per level, bottom (level 1, over `rows`) to top."""
    n_levels = len(clusters)
    if not (len(resampling_steps) == len(sample_sizes) == n_levels) or n_levels == 0:
        raise ValueError(f"--clusters, --resampling-steps and --sample-size need one value per "
                         f"level, got {list(clusters)}, {list(resampling_steps)}, "
                         f"{list(sample_sizes)}")
    # checked before any k-means runs: with unreadable images (NaN rows, never clustered) a k
    # between the finite and the total count failed only at the first resampling step
    n = rows.n_finite()
    sizes = [n, *clusters]
    if any(b > a for a, b in zip(sizes, sizes[1:], strict=False)):
        unreadable = f", {rows.n - n} unreadable images left out" if n < rows.n else ""
        raise ValueError(f"--clusters {list(clusters)}: each level needs at most as many clusters "
                         f"as points below it ({n} embeddings at level 0{unreadable})")
    levels: list[KMeansResult] = []
    per_level = zip(clusters, resampling_steps, sample_sizes, strict=True)
    for level, (k, steps, size) in enumerate(per_level, 1):
        source = rows if level == 1 else Rows(levels[-1].centroids, rows.device)
        logger.info("level %d/%d: %d points -> %d clusters", level, n_levels, source.n, k)
        levels.append(kmeans_with_resampling(source, k, steps, size, rng, n_iters, strategy,
                                             impl))
    return levels


def default_sample_sizes(n: int, clusters: Sequence[int]) -> list[int]:
    """Half the average cluster size at each level (SPEC.md §5), at least 2."""
    sizes = [n, *clusters]
    return [max(2, sizes[i] // clusters[i] // 2) for i in range(len(clusters))]


def leaf_sizes(levels: Sequence[KMeansResult]) -> list[np.ndarray]:
    """Points (level-0 rows) in every cluster of every level: [k_1], [k_2], ..."""
    out = []
    below = None
    for lv in levels:
        k = lv.centroids.shape[0]
        a = lv.assignment
        w = None if below is None else below[a >= 0]
        out.append(np.bincount(a[a >= 0], weights=w, minlength=k).astype(np.int64))
        below = out[-1]
    return out


def save_levels(levels: Sequence[KMeansResult], out: str, meta: dict) -> None:
    """<out>/level{l}/{centroids,assignment,dist2}.npy + <out>/meta.json."""
    import json
    import os
    from pathlib import Path

    root = Path(out)
    for i, lv in enumerate(levels, 1):
        d = root / f"level{i}"
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "centroids.npy", lv.centroids.cpu().numpy().astype(np.float32))
        np.save(d / "assignment.npy", lv.assignment.astype(np.int64))
        np.save(d / "dist2.npy", lv.dist2.astype(np.float32))
    tmp = root / ".meta.json.tmp"
    tmp.write_text(json.dumps({**meta, "levels": len(levels),
                               "clusters": [int(lv.centroids.shape[0]) for lv in levels],
                               "inertia": [lv.inertia for lv in levels]}, indent=2))
    os.replace(tmp, root / "meta.json")


def load_levels(path: str) -> tuple[list[KMeansResult], dict]:
    import json
    from pathlib import Path

    root = Path(path)
    if not (root / "meta.json").is_file():
        raise FileNotFoundError(f"{path!r} holds no meta.json: give the --out folder of "
                                "`fastdino curate cluster`")
    meta = json.loads((root / "meta.json").read_text())
    levels = []
    for i in range(1, meta["levels"] + 1):
        d = root / f"level{i}"
        levels.append(KMeansResult(torch.from_numpy(np.load(d / "centroids.npy")),
                                   np.load(d / "assignment.npy"), np.load(d / "dist2.npy"),
                                   meta["inertia"][i - 1], 0))
    return levels, meta
