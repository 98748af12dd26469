"""Nearest-neighbour curation (fastdino/curation/neighbours.py): the streamed top-k equals a
brute-force search (chunk boundaries, ties, non-finite rows), and dedup / retrieval /
contamination do what they say on planted duplicates; then the three commands end to end on
embedded images (near-duplicates made by re-saving images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdino.curation.cli import main
from fastdino.curation.embed import read_files
from fastdino.curation.neighbours import contamination, deduplicate, retrieve, top_k_cosine


def _unit(rng, n, d=16):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_top_k_equals_brute_force(chunk):
    rng = np.random.default_rng(0)
    keys, queries = _unit(rng, 40), _unit(rng, 13)
    keys[5] = np.nan  # an image without an embedding: never a neighbour
    queries[2] = np.nan  # and finds none
    keys[30] = keys[11]  # an exact duplicate: ties go to the lower id
    sims, ids = top_k_cosine(queries, keys, k=6, chunk=chunk)
    s = queries.astype(np.float64) @ np.nan_to_num(keys, nan=0).T
    s[:, 5] = -np.inf
    for q in range(13):
        if q == 2:
            assert (ids[q] == -1).all() and np.isneginf(sims[q]).all()
            continue
        want = np.argsort(-s[q], kind="stable")[:6]  # stable: lower id first among ties
        assert ids[q].tolist() == want.tolist()
        np.testing.assert_allclose(sims[q], s[q, want], rtol=1e-5, atol=1e-6)
    # more neighbours asked than finite keys: padded with -1 / -inf
    sims, ids = top_k_cosine(queries[:1], keys[:4], k=6, chunk=chunk)
    assert ids[0, 4:].tolist() == [-1, -1] and np.isneginf(sims[0, 4:]).all()


def test_exclude_self():
    x = _unit(np.random.default_rng(1), 20)
    _, ids = top_k_cosine(x, x, k=3, chunk=6, exclude_self=True)
    assert not (ids == np.arange(20)[:, None]).any()


def test_dedup_groups_and_keeps_the_lowest_row():
    rng = np.random.default_rng(2)
    x = _unit(rng, 30)
    x[17] = x[4] + 0.01 * _unit(rng, 1)[0]  # 4 ~ 17 ~ 25: one group, chained
    x[25] = x[17] + 0.01 * _unit(rng, 1)[0]
    x[9] = x[8]  # an exact pair
    x[12] = np.nan
    x = x / np.linalg.norm(np.nan_to_num(x), axis=1, keepdims=True).clip(1e-12)
    keep, dup_of = deduplicate(x, threshold=0.99, k=4, chunk=8)
    assert not keep[[17, 25, 9, 12]].any() and keep[[4, 8]].all()
    assert dup_of[17] == dup_of[25] == 4 and dup_of[9] == 8 and dup_of[12] == -1
    assert keep.sum() == 30 - 4


def test_retrieve_and_contamination():
    rng = np.random.default_rng(3)
    pool = _unit(rng, 50)
    seeds = pool[[7, 21]] + 0.02 * _unit(rng, 2)
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    picked, sims = retrieve(pool, seeds, k=1)
    assert picked.tolist() == [7, 21] and (sims > 0.99).all()
    picked3, _ = retrieve(pool, seeds, k=3)
    assert len(picked3) == 6 and {7, 21} <= set(picked3.tolist())
    assert retrieve(pool, seeds, k=3, threshold=0.99)[0].tolist() == [7, 21]
    hits = contamination(pool, seeds, threshold=0.99)
    assert [(t, e) for t, e, _ in hits] == [(7, 0), (21, 1)]
    assert contamination(pool, _unit(rng, 5), threshold=0.99) == []


def test_contamination_finds_every_copy_of_an_image_copied_many_times():
    """An evaluation image copied 12 times into the training set: all 12 copies are flagged
    (the old search took the 8 nearest training rows of each evaluation row and missed 4)."""
    rng = np.random.default_rng(5)
    evaluation = _unit(rng, 3)
    copies = evaluation[[1] * 12] + 0.01 * _unit(rng, 12)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    train = np.concatenate([_unit(rng, 20), copies])  # rows 20..31 copy evaluation row 1
    hits = contamination(train, evaluation, threshold=0.99)
    assert [(t, e) for t, e, _ in hits] == [(t, 1) for t in range(20, 32)]
    assert all(s >= 0.99 for _, _, s in hits)


def test_similarities_of_fp16_embeddings_are_at_most_one():
    """`curate embed` stores unit rows in fp16, whose norms are 1 only to fp16's rounding: the
    similarity of a row with its copy is reported as 1 at most (hits.tsv showed 1.0003)."""
    rng = np.random.default_rng(7)
    emb = _unit(rng, 64).astype(np.float16)
    assert (np.einsum("nd,nd->n", emb.astype(np.float32), emb.astype(np.float32)) > 1).any()
    sims, ids = top_k_cosine(emb, emb, 1)
    assert ids[:, 0].tolist() == list(range(64)) and sims.max() <= 1.0
    assert (sims[:, 0] > 0.998).all()


def _pool(root, n=12):
    """n random images, then copies of images 0 and 3 re-saved as JPEG (near-duplicates)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        arr = np.kron(arr[::8, ::8], np.ones((8, 8, 1), dtype=np.uint8))  # 8 px blocks
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
    for i in (0, 3):
        Image.open(root / f"img{i:02d}.png").save(root / f"zcopy{i:02d}.jpg", quality=95)
    return root


def _embed(data, out, config, seed=0):
    assert main(["embed", "--data", str(data), "--weights", "random", "--config", str(config),
                 "--seed", str(seed), "--out", str(out), "--image-size", "32", "--batch-size",
                 "8", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0


def test_commands_end_to_end(tmp_path, capsys):
    # a random ViT-S with LayerScale 1 (at 1e-5 the blocks do nothing and every CLS is alike):
    # measured, a re-saved copy is at cosine 0.99 of its original, other images below 0.83
    config = tmp_path / "arch.yaml"
    config.write_text("model:\n  arch: vit_small\n  layerscale_init: 1.0\n")
    pool = _pool(tmp_path / "pool")
    _embed(pool, tmp_path / "E", config)
    files = read_files(tmp_path / "E")
    assert main(["dedup", str(tmp_path / "E"), "--threshold", "0.95", "--out",
                 str(tmp_path / "unique.txt"), "--device", "cpu", "--quiet"]) == 0
    kept = (tmp_path / "unique.txt").read_text().splitlines()
    removed = [line.split("\t") for line in
               (tmp_path / "unique.txt.removed.tsv").read_text().splitlines()]
    names = {f.rsplit("/", 1)[1] for f in kept}
    assert sorted(r[0].rsplit("/", 1)[1] for r in removed) == ["zcopy00.jpg", "zcopy03.jpg"]
    assert {r[1].rsplit("/", 1)[1] for r in removed} == {"img00.png", "img03.png"}
    assert len(kept) == len(files) - 2 and "img00.png" in names
    # seeds / evaluation set: the originals 0 and 3 embedded on their own
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for i in (0, 3):
        (seeds / f"s{i}.png").write_bytes((pool / f"img{i:02d}.png").read_bytes())
    _embed(seeds, tmp_path / "S", config)
    assert main(["retrieve", str(tmp_path / "E"), "--seeds", str(tmp_path / "S"), "--k", "2",
                 "--out", str(tmp_path / "retrieved.txt"), "--device", "cpu", "--quiet"]) == 0
    got = {f.rsplit("/", 1)[1] for f in (tmp_path / "retrieved.txt").read_text().splitlines()}
    assert got == {"img00.png", "zcopy00.jpg", "img03.png", "zcopy03.jpg"}
    rc = main(["contamination", str(tmp_path / "E"), "--eval", str(tmp_path / "S"),
               "--threshold", "0.95", "--out", str(tmp_path / "hits.tsv"), "--clean",
               str(tmp_path / "clean.txt"), "--fail-on-hits", "--device", "cpu", "--quiet"])
    assert rc == 1
    hits = [line.split("\t") for line in (tmp_path / "hits.tsv").read_text().splitlines()]
    assert sorted(h[0].rsplit("/", 1)[1] for h in hits) == ["img00.png", "img03.png",
                                                          "zcopy00.jpg", "zcopy03.jpg"]
    assert len((tmp_path / "clean.txt").read_text().splitlines()) == len(files) - 4
    # embeddings of other weights are refused
    _embed(seeds, tmp_path / "S1", config, seed=1)
    capsys.readouterr()
    assert main(["retrieve", str(tmp_path / "E"), "--seeds", str(tmp_path / "S1"), "--out",
                 str(tmp_path / "x.txt"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdino curate retrieve: error: ")
    assert "other weights or image size" in err
