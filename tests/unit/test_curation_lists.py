"""`fastdino curate` searches never write an empty training list as if all were well (every
training image contaminated, a --threshold nobody reaches, empty embedding folders), and two
embedding folders are comparable only when embedded with the same white level."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastdino.curation.cli import main


def _units(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings(folder, x, **key):
    folder.mkdir()
    np.save(folder / "embeddings.npy", x.astype(np.float16))
    (folder / "files.txt").write_text("".join(f"/img/{folder.name}/{i}.jpg\n"
                                              for i in range(len(x))))
    (folder / "progress.json").write_text(json.dumps(
        {"done": len(x), "complete": True,
         "key": {"weights": "w", "arch": "a", "image_size": 224, "n": len(x), "dim": x.shape[1],
                 **key}}))
    return str(folder)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_clean_list_of_nothing_is_refused(tmp_path, capsys):
    x = _units(3)
    train = _embeddings(tmp_path / "T", x[[0, 0, 1, 2, 2]])  # every one a copy of an eval image
    evaluation = _embeddings(tmp_path / "V", x)
    hits, clean = tmp_path / "hits.tsv", tmp_path / "clean.txt"
    argv = ["contamination", train, "--eval", evaluation, "--out", str(hits), "--clean",
            str(clean), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "5 of 5 training images" in out.out  # the search's report, and its pairs, are kept
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "--clean" in err[0] and "no training image is left" in err[0]
    assert len(hits.read_text().splitlines()) == 5
    assert not clean.exists()
    # one image left: written as before
    train2 = _embeddings(tmp_path / "T2", np.concatenate([x[[0, 1]], _units(1, seed=5)]))
    assert main([*argv[:1], train2, *argv[2:]]) == 0
    assert clean.read_text() == "/img/T2/2.jpg\n"


def test_clean_list_leaves_out_images_without_an_embedding(tmp_path, capsys):
    """An unreadable training image was never checked: it is not listed as clean (dedup leaves
    it out too), and a list of only such images is an empty one."""
    x = _units(3)
    rows = np.concatenate([x[[0]], np.full((1, 8), np.nan), _units(1, seed=5)])
    evaluation = _embeddings(tmp_path / "V", x)
    clean = tmp_path / "clean.txt"
    argv = ["--eval", evaluation, "--out", str(tmp_path / "h.tsv"), "--clean", str(clean),
            "--device", "cpu", "--quiet"]
    assert main(["contamination", _embeddings(tmp_path / "T", rows), *argv]) == 0
    assert clean.read_text() == "/img/T/2.jpg\n"
    assert "and the 1 without an embedding (unreadable)" in capsys.readouterr().out
    clean.unlink()
    assert main(["contamination", _embeddings(tmp_path / "T2", rows[:2]), *argv]) == 2
    assert "no training image is left" in _one_error_line(capsys) and not clean.exists()


def test_retrieve_that_finds_nothing_is_refused(tmp_path, capsys):
    pool = _embeddings(tmp_path / "P", _units(20))
    seeds = _embeddings(tmp_path / "S", _units(2, seed=1))
    out = tmp_path / "r.txt"
    argv = ["retrieve", pool, "--seeds", seeds, "--k", "2", "--out", str(out), "--device", "cpu",
            "--quiet"]
    assert main([*argv, "--threshold", "0.9999"]) == 2  # random unit rows: none that close
    err = _one_error_line(capsys)
    assert "--threshold 0.9999" in err and "no list written" in err
    assert not out.exists()
    assert main(argv) == 0 and len(out.read_text().splitlines()) in (2, 3, 4)


@pytest.mark.parametrize("cmd", [["dedup", "Z", "--out", "u.txt"],
                                 ["retrieve", "Z", "--seeds", "E", "--out", "r.txt"],
                                 ["retrieve", "E", "--seeds", "Z", "--out", "r.txt"],
                                 ["contamination", "Z", "--eval", "E", "--out", "h.tsv"],
                                 ["contamination", "E", "--eval", "Z", "--out", "h.tsv"]])
def test_empty_embedding_folder_is_refused(tmp_path, monkeypatch, capsys, cmd):
    _embeddings(tmp_path / "E", _units(5))
    _embeddings(tmp_path / "Z", np.zeros((0, 8)))
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, "--device", "cpu", "--quiet"]) == 2
    assert "Z holds no embeddings (0 images)" in _one_error_line(capsys)
    assert not (tmp_path / cmd[-1]).exists()


@pytest.mark.parametrize("levels, said", [
    ((4095, None), ("--white-level 4095 but", "--white-level none")),
    ((None, 1023), ("--white-level none (the default", "--white-level 1023")),
    ((4095, 1023), ("--white-level 4095 but", "--white-level 1023")),
])
@pytest.mark.parametrize("cmd", ["retrieve", "contamination"])
def test_other_white_level_is_not_comparable(tmp_path, capsys, levels, said, cmd):
    x = _units(6)
    # a folder embedded before the white level was recorded has no such key: none, the default
    a = _embeddings(tmp_path / "A", x, **({} if levels[0] is None else {"white_level": levels[0]}))
    b = _embeddings(tmp_path / "B", x, **({} if levels[1] is None else {"white_level": levels[1]}))
    other = {"retrieve": "--seeds", "contamination": "--eval"}[cmd]
    argv = [cmd, a, other, b, "--out", str(tmp_path / "o.txt"), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert all(s in err for s in said) and "embed both with the same --white-level" in err
    assert not (tmp_path / "o.txt").exists()


def test_same_white_level_or_none_recorded_is_comparable(tmp_path):
    x = _units(6)
    old = _embeddings(tmp_path / "old", x)  # none recorded
    new = _embeddings(tmp_path / "new", x)
    assert main(["contamination", old, "--eval", new, "--out", str(tmp_path / "h.tsv"),
                 "--device", "cpu", "--quiet"]) == 0
    a = _embeddings(tmp_path / "A", x, white_level=4095)
    b = _embeddings(tmp_path / "B", x, white_level=4095)
    assert main(["retrieve", a, "--seeds", b, "--out", str(tmp_path / "r.txt"), "--device",
                 "cpu", "--quiet"]) == 0


def test_sample_refuses_embeddings_of_other_images_as_many(tmp_path, capsys):
    """Re-embedded since the clustering with as many other images: the picked rows were named
    after the new images (only the count was checked)."""
    emb = _embeddings(tmp_path / "E", _units(30))
    clusters, out = str(tmp_path / "C"), str(tmp_path / "list.txt")
    assert main(["cluster", emb, "--clusters", "4", "--iters", "2", "--device", "cpu",
                 "--out", clusters]) == 0
    assert main(["sample", clusters, "--n", "5", "--out", out]) == 0
    names = (tmp_path / "E" / "files.txt").read_text().replace("/img/", "/other/")
    (tmp_path / "E" / "files.txt").write_text(names)
    capsys.readouterr()
    assert main(["sample", clusters, "--n", "5", "--out", out]) == 2
    assert "lists other images than when" in _one_error_line(capsys)
    # a clustering made before the digest was recorded: sampled as before
    meta = json.loads((tmp_path / "C" / "meta.json").read_text())
    del meta["files"]
    (tmp_path / "C" / "meta.json").write_text(json.dumps(meta))
    assert main(["sample", clusters, "--n", "5", "--out", out]) == 0


def test_embed_refusal_shows_an_option_not_given_as_none(tmp_path, capsys):
    """Resumed without the --white-level the folder was embedded with: the refusal said
    "{'white_level': 4095} on disk, {} now"."""
    from PIL import Image

    from fastdino.data import datasets

    data = tmp_path / "imgs"
    data.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(data / "a.png")
    argv = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test", "--out",
            str(tmp_path / "E"), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--quiet"]
    assert main([*argv, "--white-level", "4095"]) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert (f"{{'white_level': 4095, 'white_level_decode': {datasets.WHITE_LEVEL_DECODE}}} on "
            "disk, {'white_level': None, 'white_level_decode': None} now") in err


def test_embed_refuses_to_resume_over_pixels_decoded_otherwise(tmp_path, capsys, monkeypatch):
    """A folder embedded with a white level before its decoding changed (16-bit RGB TIFFs read
    at full depth: datasets.WHITE_LEVEL_DECODE 2) is not continued with other pixels."""
    from PIL import Image

    from fastdino.data import datasets

    data = tmp_path / "imgs"
    data.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(data / "a.png")
    argv = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test", "--out",
            str(tmp_path / "E"), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--quiet", "--white-level", "4095"]
    assert main(argv) == 0
    assert main(argv) == 0  # the same decoding: nothing to do
    capsys.readouterr()
    monkeypatch.setattr(datasets, "WHITE_LEVEL_DECODE", datasets.WHITE_LEVEL_DECODE + 1)
    assert main(argv) == 2
    assert "white_level_decode" in _one_error_line(capsys)


def test_sample_out_naming_a_folder_is_refused(tmp_path, capsys):
    """`--out lists/` (a trailing slash) wrote a file named `lists`; an existing folder too."""
    emb = _embeddings(tmp_path / "E", _units(30))
    clusters = str(tmp_path / "C")
    assert main(["cluster", emb, "--clusters", "4", "--iters", "2", "--device", "cpu",
                 "--out", clusters]) == 0
    capsys.readouterr()
    for out in (f"{tmp_path / 'lists'}/", str(tmp_path / "C")):
        assert main(["sample", clusters, "--n", "5", "--out", out]) == 2
        assert "give a file name" in _one_error_line(capsys)
    assert not (tmp_path / "lists").exists()
