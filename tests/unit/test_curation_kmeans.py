"""Curation k-means (fastdino/curation/kmeans.py, rows.py): recovery of well-separated blobs,
k-means++ on duplicated points, inertia against scikit-learn, chunked streaming == resident,
unreadable (NaN) rows, and bad inputs. CPU, PyTorch reference assignment."""

import numpy as np
import pytest
import torch

from fastdino.curation.kmeans import kmeans, kmeans_plusplus
from fastdino.curation.rows import Rows


def blobs(n_per: int, centers: np.ndarray, std: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centers)), n_per)
    x = centers[labels] + std * rng.normal(size=(len(labels), centers.shape[1]))
    return x.astype(np.float32), labels


def _centers(k: int, dim: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, dim)) * 10


def test_recovers_well_separated_blobs():
    centers = _centers(6, 8)
    x, labels = blobs(100, centers, 0.5)
    res = kmeans(Rows(x, "cpu"), 6, np.random.default_rng(0), n_iters=50)
    # every found cluster is exactly one true blob (a bijection), centroids on the blob means
    pairs = set(zip(res.assignment.tolist(), labels.tolist(), strict=True))
    assert len(pairs) == 6 and len({a for a, _ in pairs}) == 6
    for a, lab in pairs:
        np.testing.assert_allclose(res.centroids[a].numpy(), x[labels == lab].mean(0), atol=1e-4)
    assert res.assignment.dtype == np.int64 and res.dist2.shape == (600,)
    np.testing.assert_allclose(res.dist2, ((x - res.centroids.numpy()[res.assignment]) ** 2).sum(1),
                               rtol=1e-4, atol=1e-2)  # ‖x‖² ~ 800: fp32 expansion rounding


def test_kmeans_plusplus_picks_distinct_data_points():
    # 30 distinct points, each repeated 5 times: a chosen point's copies have weight 0, so k = 30
    # centres must be the 30 distinct points, each once
    base = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float32)
    x = np.repeat(base, 5, axis=0)
    c = kmeans_plusplus(Rows(x, "cpu"), 30, np.random.default_rng(0)).numpy()
    d = ((c[:, None] - base[None]) ** 2).sum(-1)  # [30, 30]
    assert (d.min(1) == 0).all(), "a centre is not a data point"
    assert sorted(d.argmin(1).tolist()) == list(range(30)), "a point was picked twice"


def test_inertia_matches_scikit_learn():
    from sklearn.cluster import KMeans

    centers = _centers(10, 16, seed=3)
    x, _ = blobs(60, centers, 3.0, seed=4)  # overlapping enough that k-means has work to do
    ours = kmeans(Rows(x, "cpu"), 10, np.random.default_rng(0), n_iters=50).inertia
    sk = KMeans(10, init="k-means++", n_init=1, max_iter=50, random_state=0).fit(x).inertia_
    # same budget (one k-means++ init, 50 Lloyd iterations): within 2% of scikit-learn
    assert ours <= 1.02 * sk, (ours, sk)


def test_streamed_chunks_equal_resident_rows():
    x, _ = blobs(50, _centers(4, 6), 1.0, seed=5)
    a = kmeans(Rows(x, "cpu"), 4, np.random.default_rng(7), n_iters=20)
    b = kmeans(Rows(x, "cpu", chunk_rows=37, resident_bytes=0), 4, np.random.default_rng(7),
               n_iters=20)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-6, atol=1e-6)


def test_memmap_fp16_with_unreadable_rows(tmp_path):
    x, labels = blobs(40, _centers(3, 8, seed=6), 0.3, seed=6)
    x[[5, 77]] = np.nan  # images that could not be decoded
    mm = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    emb = np.load(tmp_path / "e.npy", mmap_mode="r")
    res = kmeans(Rows(emb, "cpu", chunk_rows=16, resident_bytes=0), 3, np.random.default_rng(0))
    assert res.assignment[5] == -1 and res.assignment[77] == -1
    assert np.isinf(res.dist2[[5, 77]]).all()
    ok = np.ones(len(x), bool)
    ok[[5, 77]] = False
    assert len(set(zip(res.assignment[ok].tolist(), labels[ok].tolist(), strict=True))) == 3
    assert torch.isfinite(res.centroids).all()


def test_bad_inputs():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="at most 5"):
        kmeans(Rows(x, "cpu"), 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="\\[N, D\\]"):
        Rows(np.zeros(5, np.float32), "cpu")
