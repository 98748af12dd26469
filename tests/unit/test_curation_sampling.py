"""Balanced hierarchical sampling (fastdino/curation/sampling.py): the water-filling cap and
quotas (exactly N, never more than a cluster holds), and the flattening of an imbalanced Gaussian
mixture (a few huge clusters, many small ones) by k-means + balanced sampling, measured."""

import numpy as np
import pytest

from fastdino.curation.hierarchical import hierarchical_kmeans
from fastdino.curation.rows import Rows
from fastdino.curation.sampling import (
    hierarchical_sample,
    size_summary,
    water_fill,
    water_fill_cap,
)


def test_water_fill_cap_is_the_largest_feasible():
    sizes = np.array([100, 3, 50, 7, 7, 0, 20])
    assert water_fill_cap(sizes, 1000) == 100  # everything fits
    for target in range(0, int(sizes.sum()) + 1):
        x = water_fill_cap(sizes, target)
        assert np.minimum(x, sizes).sum() <= target
        if target < sizes.sum():
            assert np.minimum(x + 1, sizes).sum() > target


def test_water_fill_gives_exactly_n_and_respects_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 20)) * rng.integers(1, 4)
        target = int(rng.integers(0, sizes.sum() + 10))
        q = water_fill(sizes, target, rng)
        assert q.sum() == min(target, sizes.sum())
        assert (q <= sizes).all() and (q >= 0).all()
        x = water_fill_cap(sizes, target)
        assert (q <= x + 1).all()  # no cluster gets more than the cap + 1 leftover unit
        assert (q[sizes <= x] == sizes[sizes <= x]).all()  # small clusters are taken whole
    with pytest.raises(ValueError):
        water_fill(np.array([1, 2]), -1, rng)


def _imbalanced(seed=0):
    """3 huge clusters (1500 points) and 12 small ones (40), far apart in 8 dimensions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(15, 8)) * 20
    sizes = [1500] * 3 + [40] * 12
    labels = np.repeat(np.arange(15), sizes)
    x = centers[labels] + rng.normal(size=(len(labels), 8))
    return x.astype(np.float16), labels


def _max_over_mean(counts):
    counts = counts[counts > 0]
    return counts.max() / counts.mean()


@pytest.mark.parametrize("clusters", [[15], [15, 5]])
def test_sampling_flattens_an_imbalanced_mixture(clusters):
    x, labels = _imbalanced()
    levels = hierarchical_kmeans(Rows(x, "cpu"), clusters, [2] * len(clusters),
                                 [20] + [2] * (len(clusters) - 1), np.random.default_rng(0),
                                 n_iters=30)
    n = 600  # = 15 clusters x 40: a perfectly balanced sample is 40 per component
    picked = hierarchical_sample(levels, n, np.random.default_rng(1), strategy="r")
    assert len(picked) == n and len(np.unique(picked)) == n
    before = np.bincount(labels, minlength=15)
    after = np.bincount(labels[picked], minlength=15)
    summary = size_summary(levels, picked)
    assert [s["after"]["total"] for s in summary] == [n] * len(clusters)
    assert (after[:3] <= 1500 / 10).all(), "a dominant cluster was not capped"
    assert _max_over_mean(before) > 4.5  # 1500 / 332
    if len(clusters) == 1:
        # on the true mixture components, max/mean falls by a factor >= 3 (ideal: 4.5, 40 each)
        factor = _max_over_mean(before) / _max_over_mean(after)
        assert factor >= 3.0, (factor, before, after)
    else:
        # two levels balance the 5 top clusters first (a huge component alone in its top cluster
        # keeps that cluster's whole quota): max/mean of the top clusters falls by >= 1.5
        top = summary[-1]
        factor = top["before"]["max_over_mean"] / top["after"]["max_over_mean"]
        assert factor >= 1.5, (factor, top)


def test_closest_strategy_takes_the_points_nearest_the_centroid():
    x, _ = _imbalanced(seed=2)
    levels = hierarchical_kmeans(Rows(x, "cpu"), [15], [0], [1], np.random.default_rng(0))
    picked = hierarchical_sample(levels, 300, np.random.default_rng(0), strategy="c")
    a, d2 = levels[0].assignment, levels[0].dist2
    for j in range(15):
        members = np.nonzero(a == j)[0]
        chosen = np.intersect1d(members, picked)
        if 0 < len(chosen) < len(members):
            rest = np.setdiff1d(members, chosen)
            assert d2[chosen].max() <= d2[rest].min()


def test_asking_for_more_than_everything_returns_everything():
    x, _ = _imbalanced(seed=3)
    levels = hierarchical_kmeans(Rows(x[:300], "cpu"), [6, 2], [0, 0], [1, 1],
                                 np.random.default_rng(0))
    picked = hierarchical_sample(levels, 10_000, np.random.default_rng(0))
    np.testing.assert_array_equal(picked, np.arange(300))
