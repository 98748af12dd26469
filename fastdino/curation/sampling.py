"""Balanced hierarchical sampling (SPEC.md §5; facebookresearch/ssl-data-curation
`src/hierarchical_sampling.py`; no code copied).

    rows = hierarchical_sample(levels, n=1000, rng=np.random.default_rng(0), strategy="r")

Given a target N: at the top level choose the cap x, by binary search, as the largest integer with
Σ_i min(x, size_i) <= N (water-filling: small clusters are taken whole, large ones capped at x);
the N - Σ min(x, size_i) leftover units go +1 to as many random clusters larger than x. Each
cluster's quota is then split the same way among its sub-clusters (sizes counted in level-0
points), down to level 1, where a cluster whose quota covers it is taken whole, else its `quota`
points closest to the centroid ("c") or random ones ("r"). The result has exactly min(N, #points)
rows and never takes more from a cluster than it holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastdino.curation.hierarchical import STRATEGIES, leaf_sizes
from fastdino.curation.kmeans import KMeansResult


def water_fill_cap(sizes: np.ndarray, target: int) -> int:
    """Largest integer x with Σ min(x, sizes) <= target (max(sizes) when everything fits)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0 or (sizes < 0).any():
        raise ValueError(f"water-filling needs a target >= 0 and sizes >= 0, got target {target}")
    if len(sizes) == 0 or sizes.sum() <= target:
        return int(sizes.max(initial=0))
    lo, hi = 0, int(sizes.max())  # Σ min(lo, s) <= target < Σ min(hi, s)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(mid, sizes).sum() <= target:
            lo = mid
        else:
            hi = mid
    return lo


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Quotas q_i <= sizes_i with Σ q = min(target, Σ sizes): min(x, size) plus one more unit for
    random clusters larger than the cap x until the sum is exact."""
    sizes = np.asarray(sizes, dtype=np.int64)
    x = water_fill_cap(sizes, target)
    quota = np.minimum(x, sizes)
    left = min(target, int(sizes.sum())) - int(quota.sum())
    if left > 0:  # fewer than #{size > x} by the choice of x (else x + 1 would fit)
        bigger = np.nonzero(sizes > x)[0]
        quota[rng.choice(bigger, size=left, replace=False)] += 1
    return quota


def _children(assignment: np.ndarray, k: int) -> list[np.ndarray]:
    """Members of each of the k clusters (ids of the level below), ascending."""
    ok = np.nonzero(assignment >= 0)[0]
    order = ok[np.argsort(assignment[ok], kind="stable")]
    bounds = np.searchsorted(assignment[order], np.arange(k + 1))
    return [order[bounds[j]:bounds[j + 1]] for j in range(k)]


def hierarchical_sample(levels: Sequence[KMeansResult], n: int, rng: np.random.Generator,
                        strategy: str = "r") -> np.ndarray:
    """Level-0 row ids of a balanced sample of size min(n, #points) (module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy {strategy!r} is invalid: allowed is 'c' (closest to the "
                         "centroid) or 'r' (random)")
    if n < 0:
        raise ValueError(f"--n must be >= 0, got {n}")
    sizes = leaf_sizes(levels)
    children = [_children(lv.assignment, lv.centroids.shape[0]) for lv in levels]
    # level-1 members sorted by distance to their centroid, for strategy "c"
    d1 = levels[0].dist2
    members1 = [m[np.argsort(d1[m], kind="stable")] for m in children[0]]
    picked: list[np.ndarray] = []

    def take(level: int, cluster: int, quota: int) -> None:  # level is 1-based
        if quota == 0:
            return
        if level == 1:
            m = members1[cluster]
            if quota >= len(m):
                picked.append(m)
            elif strategy == "c":
                picked.append(m[:quota])
            else:
                picked.append(rng.choice(m, size=quota, replace=False))
            return
        subs = children[level - 1][cluster]
        for sub, q in zip(subs, water_fill(sizes[level - 2][subs], quota, rng), strict=True):
            take(level - 1, int(sub), int(q))

    top = len(levels)
    for cluster, q in enumerate(water_fill(sizes[top - 1], n, rng)):
        take(top, cluster, int(q))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def size_summary(levels: Sequence[KMeansResult], picked: np.ndarray) -> list[dict]:
    """Per level: cluster sizes (level-0 points) before and after sampling."""
    n0 = len(levels[0].assignment)
    mask = np.zeros(n0, dtype=bool)
    mask[picked] = True
    out = []
    for i, before in enumerate(leaf_sizes(levels), 1):
        # cluster of every level-0 row at this level
        lab = levels[0].assignment.copy()
        for lv in levels[1:i]:
            lab = np.where(lab >= 0, lv.assignment[np.maximum(lab, 0)], -1)
        after = np.bincount(lab[mask & (lab >= 0)], minlength=len(before))
        out.append({"level": i, "clusters": len(before),
                    "before": _stats(before), "after": _stats(after)})
    return out


def _stats(s: np.ndarray) -> dict:
    nz = s[s > 0]
    return {"total": int(s.sum()), "nonempty": int(len(nz)),
            "min": int(nz.min()) if len(nz) else 0,
            "median": float(np.median(nz)) if len(nz) else 0.0,
            "max": int(s.max(initial=0)),
            # max / mean over non-empty clusters: 1 = perfectly flat
            "max_over_mean": float(nz.max() / nz.mean()) if len(nz) else 0.0}


def format_summary(rows: list[dict]) -> str:
    head = (f"{'level':>5} {'k':>7} {'':>6} {'total':>9} {'nonempty':>8} {'min':>7} "
            f"{'median':>8} {'max':>8} {'max/mean':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for when in ("before", "after"):
            s = r[when]
            lines.append(f"{r['level']:>5} {r['clusters']:>7} {when:>6} {s['total']:>9} "
                         f"{s['nonempty']:>8} {s['min']:>7} {s['median']:>8.1f} {s['max']:>8} "
                         f"{s['max_over_mean']:>8.2f}")
    return "\n".join(lines)
