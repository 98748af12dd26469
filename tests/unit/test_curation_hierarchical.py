"""Hierarchical k-means with resampling steps (fastdino/curation/hierarchical.py): level shapes,
resampling keeps k centroids (also when clusters are tiny), the balanced resampling sample,
save / load, and bad level specifications."""

import numpy as np
import pytest
import torch

from fastdino.curation.hierarchical import (
    balanced_sample,
    default_sample_sizes,
    hierarchical_kmeans,
    kmeans_with_resampling,
    leaf_sizes,
    load_levels,
    save_levels,
)
from fastdino.curation.rows import Rows


def _data(n=400, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, dim)) * 6
    return (centers[rng.integers(0, 12, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def test_hierarchy_shapes_and_sizes(tmp_path):
    x = _data()
    levels = hierarchical_kmeans(Rows(x, "cpu"), [20, 6, 2], [2, 2, 2], [5, 2, 2],
                                 np.random.default_rng(0), n_iters=20)
    assert [tuple(lv.centroids.shape) for lv in levels] == [(20, 6), (6, 6), (2, 6)]
    assert [len(lv.assignment) for lv in levels] == [400, 20, 6]
    for lv, k in zip(levels, (20, 6, 2), strict=True):
        assert lv.assignment.min() >= 0 and lv.assignment.max() < k
        assert torch.isfinite(lv.centroids).all()
    sizes = leaf_sizes(levels)
    assert [s.sum() for s in sizes] == [400, 400, 400]
    # a level-2 cluster's size is the sum of its level-1 clusters' sizes
    np.testing.assert_array_equal(sizes[1], np.bincount(levels[1].assignment, sizes[0], 6))
    save_levels(levels, tmp_path / "C", {"n": 400})
    loaded, meta = load_levels(tmp_path / "C")
    assert meta["clusters"] == [20, 6, 2] and meta["n"] == 400
    for a, b in zip(levels, loaded, strict=True):
        np.testing.assert_array_equal(a.assignment, b.assignment)
        torch.testing.assert_close(a.centroids, b.centroids)


def test_resampling_keeps_k_centroids_and_reassigns_everything():
    x = _data(seed=1)
    rng = np.random.default_rng(0)
    res = kmeans_with_resampling(Rows(x, "cpu"), 30, resampling_steps=3, sample_size=4, rng=rng,
                                 n_iters=20)
    assert res.centroids.shape == (30, 6) and torch.isfinite(res.centroids).all()
    # the final assignment is the nearest of the final centroids for every point
    d = torch.cdist(torch.from_numpy(x), res.centroids) ** 2
    np.testing.assert_array_equal(res.assignment, d.argmin(1).numpy())
    # tiny clusters: 30 clusters of 40 points with sample size 2 hold < k points before top-up
    few = _data(n=40, seed=2)
    res = kmeans_with_resampling(Rows(few, "cpu"), 30, 2, 2, np.random.default_rng(0), n_iters=5)
    assert res.centroids.shape == (30, 6)


def test_balanced_sample_takes_the_closest_per_cluster():
    assignment = np.array([0, 1, 0, 0, 1, -1, 2, 0])
    dist2 = np.array([5.0, 1.0, 0.5, 9.0, 3.0, 0.0, 2.0, 1.0])
    got = balanced_sample(assignment, dist2, 3, 2, "c", np.random.default_rng(0))
    np.testing.assert_array_equal(got, [1, 2, 4, 6, 7])  # cluster 0: rows 2, 7; 1: 1, 4; 2: 6
    rnd = balanced_sample(assignment, dist2, 3, 2, "r", np.random.default_rng(0))
    assert len(rnd) == 5 and 5 not in rnd
    assert np.bincount(assignment[rnd], minlength=3).tolist() == [2, 2, 1]
    with pytest.raises(ValueError, match="'c'"):
        balanced_sample(assignment, dist2, 3, 2, "furthest", np.random.default_rng(0))


def test_bad_level_specs():
    rows = Rows(_data(n=50), "cpu")
    with pytest.raises(ValueError, match="at most as many clusters"):
        hierarchical_kmeans(rows, [10, 20], [1, 1], [2, 2], np.random.default_rng(0))
    with pytest.raises(ValueError, match="one value per level"):
        hierarchical_kmeans(rows, [10, 5], [1], [2, 2], np.random.default_rng(0))
    assert default_sample_sizes(1000, [50, 10]) == [10, 2]
