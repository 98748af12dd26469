"""`fastdino curate` edge cases found by driving it as a user: exact copies at --threshold 1.0
(fp16 unit rows whose cosine with themselves is below 1), and bad flag values refused in one
line naming the flag instead of a traceback or a silently different run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastdino.curation.cli import main
from fastdino.curation.neighbours import contamination, deduplicate, retrieve


def _short_fp16_rows(n: int, d: int = 64) -> np.ndarray:
    """n fp16 unit rows whose stored norm is visibly below 1 (as `curate embed` writes them)."""
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:
        x = rng.normal(size=d)
        x = (x / np.linalg.norm(x)).astype(np.float16)
        if float((x.astype(np.float32) ** 2).sum()) < 1 - 2e-5:  # its cosine with a copy < 1
            out.append(x)
    return np.stack(out)


def test_threshold_one_finds_exact_copies():
    x = _short_fp16_rows(12)
    x[7] = x[2]
    x[9] = x[2]
    keep, dup_of = deduplicate(x, 1.0, k=4)
    assert keep.tolist() == [i not in (7, 9) for i in range(12)]
    assert dup_of[[7, 9]].tolist() == [2, 2]
    assert [(t, e) for t, e, _ in contamination(x, x[[2]], 1.0)] == [(2, 0), (7, 0), (9, 0)]
    picked, sims = retrieve(x, x[[2]], k=3, threshold=1.0)
    assert picked.tolist() == [2, 7, 9] and (sims <= 1).all()
    # other rows stay apart at 1.0 (random unit rows in 64 dimensions are far below it)
    assert deduplicate(_short_fp16_rows(12), 1.0, k=4)[0].all()


def _embeddings(folder, x):
    folder.mkdir()
    np.save(folder / "embeddings.npy", x.astype(np.float16))
    (folder / "files.txt").write_text("".join(f"/img/{i}.jpg\n" for i in range(len(x))))
    (folder / "progress.json").write_text(json.dumps(
        {"done": len(x), "complete": True,
         "key": {"weights": "w", "arch": "a", "image_size": 224, "n": len(x), "dim": 8}}))
    return str(folder)


@pytest.mark.parametrize("argv, flag", [
    (["cluster", "E", "--clusters", "0", "--out", "C"], "--clusters"),  # was ZeroDivisionError
    (["cluster", "E", "--clusters", "4,0", "--out", "C"], "--clusters"),
    (["cluster", "E", "--clusters", "4", "--resampling-steps", "-1", "--out", "C"],
     "--resampling-steps"),  # was run as 0 steps
    (["dedup", "E", "--threshold", "1.5", "--out", "u.txt"], "--threshold"),  # removed nothing
    (["contamination", "E", "--eval", "E", "--threshold", "nan", "--out", "h.tsv"],
     "--threshold"),
    (["retrieve", "E", "--seeds", "E", "--threshold", "-2", "--out", "r.txt"], "--threshold"),
])
def test_bad_values_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, flag):
    rng = np.random.default_rng(0)
    _embeddings(tmp_path / "E", rng.normal(size=(20, 8)) / 3)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in err and "allowed is" in err
    assert not (tmp_path / "C").exists() and not (tmp_path / "u.txt").exists()


def test_sample_refuses_moved_or_changed_embeddings(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = _embeddings(tmp_path / "E", rng.normal(size=(20, 8)) / 3)
    clusters = str(tmp_path / "C")
    assert main(["cluster", emb, "--clusters", "4", "--iters", "2", "--resampling-steps", "0",
                 "--device", "cpu", "--out", clusters]) == 0
    out = str(tmp_path / "list.txt")
    # re-embedded with more images: the picked rows would be named after other images
    names = (tmp_path / "E" / "files.txt").read_text()
    (tmp_path / "E" / "files.txt").write_text("/img/new.jpg\n" + names)
    capsys.readouterr()
    assert main(["sample", clusters, "--n", "5", "--out", out]) == 2
    assert "lists 21 images but" in capsys.readouterr().err
    # moved away: the error names where the clusters were made from
    (tmp_path / "E").rename(tmp_path / "E_moved")
    assert main(["sample", clusters, "--n", "5", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "was clustered from" in err and str(tmp_path / "E") in err
    assert not (tmp_path / "list.txt").exists()


@pytest.mark.parametrize("steps", [0, 1])
def test_more_clusters_than_readable_images_is_refused_up_front(steps):
    import torch

    from fastdino.curation.hierarchical import hierarchical_kmeans
    from fastdino.curation.rows import Rows

    x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    x[[3, 8]] = np.nan  # two images that could not be decoded: 10 points to cluster
    rows = Rows(x, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"--clusters \[11\].*10 embeddings.*2 unreadable"):
        hierarchical_kmeans(rows, [11], [steps], [2], np.random.default_rng(0), n_iters=2)
    levels = hierarchical_kmeans(rows, [10], [steps], [2], np.random.default_rng(0), n_iters=2)
    assert (levels[0].assignment[[3, 8]] == -1).all()


def test_ctrl_c_in_embed_is_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import fastdino.curation.embed as embed_mod
    from fastdino.curation.progress import Progress

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")

    class CtrlC(Progress):  # the user presses Ctrl-C once the first batch is on disk
        def update(self, n):
            raise KeyboardInterrupt

    argv = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test",
            "--out", str(tmp_path / "E"), "--image-size", "32", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--quiet"]
    monkeypatch.setattr(embed_mod, "Progress", CtrlC)
    try:
        rc = main(argv)
    except KeyboardInterrupt:  # (so that it does not stop the whole pytest session)
        pytest.fail("Ctrl-C escaped `curate embed` as a traceback")
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted; the rows on disk are kept: rerun the same command" in err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "E" / "progress.json").read_text())["done"] == 2
    monkeypatch.setattr(embed_mod, "Progress", Progress)
    assert main(argv) == 0
    state = json.loads((tmp_path / "E" / "progress.json").read_text())
    assert state["done"] == 6 and state["complete"]
    assert np.isfinite(np.load(tmp_path / "E" / "embeddings.npy")).all()


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])  # cuda:99: absent on any machine
@pytest.mark.parametrize("cmd", [["cluster", "E", "--clusters", "2", "--out", "C"],
                                 ["dedup", "E", "--out", "u.txt"]])
def test_bad_device_is_one_line_error(tmp_path, monkeypatch, capsys, device, cmd):
    _embeddings(tmp_path / "E", np.random.default_rng(0).normal(size=(6, 8)))
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--device {device!r}" in err[0]


class _SlicesOnly:
    """An [N, D] matrix read only in row slices, as a memory map too big for memory is."""

    def __init__(self, x):
        self.x, self.shape, self.dtype = x, x.shape, x.dtype

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.stop - key.start <= 4, "read more than a chunk"
        return self.x[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole matrix was read at once")


def test_dedup_streams_the_embeddings():
    x = _short_fp16_rows(10)
    x[6] = x[1]
    x[8] = np.nan
    keep, dup_of = deduplicate(_SlicesOnly(x), 0.99, k=3, chunk=4)
    assert np.flatnonzero(~keep).tolist() == [6, 8] and dup_of[[6, 8]].tolist() == [1, -1]


@pytest.mark.parametrize("cmd", [["cluster", "E", "--clusters", "2", "--out", "taken"],
                                 ["cluster", "E", "--clusters", "2", "--out", "taken/C"],
                                 ["dedup", "E", "--out", "taken/u.txt"]])
def test_output_path_that_is_a_file_is_one_line_error(tmp_path, monkeypatch, capsys, cmd):
    _embeddings(tmp_path / "E", np.random.default_rng(0).normal(size=(6, 8)))
    (tmp_path / "taken").write_text("a file, not a folder\n")
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, "--device", "cpu", "--iters", "1"] if cmd[0] == "cluster"
                else [*cmd, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taken" in err[0]


def test_cluster_checks_out_before_clustering(tmp_path, monkeypatch, capsys):
    import fastdino.curation.hierarchical as hierarchical

    def never(*args, **kwargs):
        raise AssertionError("clustered before finding that --out cannot be written")

    _embeddings(tmp_path / "E", np.random.default_rng(0).normal(size=(6, 8)))
    (tmp_path / "taken").write_text("a file\n")
    monkeypatch.setattr(hierarchical, "hierarchical_kmeans", never)
    assert main(["cluster", str(tmp_path / "E"), "--clusters", "2", "--device", "cpu",
                 "--out", str(tmp_path / "taken")]) == 2
    assert "taken" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["dedup", "E", "--out", "taken/u.txt"],
                                 ["dedup", "E", "--out", "folder"],
                                 ["retrieve", "E", "--seeds", "E", "--out", "taken/r.txt"],
                                 ["contamination", "E", "--eval", "E", "--out", "h.tsv",
                                  "--clean", "taken/c.txt"]])
def test_searches_check_out_before_searching(tmp_path, monkeypatch, capsys, cmd):
    import fastdino.curation.neighbours as neighbours

    def never(*args, **kwargs):
        raise AssertionError("searched before finding that --out cannot be written")

    _embeddings(tmp_path / "E", np.random.default_rng(0).normal(size=(6, 8)))
    (tmp_path / "taken").write_text("a file\n")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(neighbours, "top_k_cosine", never)
    monkeypatch.chdir(tmp_path)
    assert main([*cmd, "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("taken" in err) != ("folder is a folder" in err)


def test_embed_refusal_names_what_differs(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    argv = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test", "--out",
            str(tmp_path / "E"), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--patches"]) == 2  # only the flag added: not "other images/weights"
    err = capsys.readouterr().err
    assert "(patches differ:" in err and "weights" not in err
    (data / "3.png").write_bytes((data / "0.png").read_bytes())  # one more image
    assert main(argv) == 2
    assert "(n differ:" in capsys.readouterr().err


def test_embed_resumed_lists_a_skipped_image_once(tmp_path, monkeypatch):
    from PIL import Image

    import fastdino.curation.embed as embed_mod

    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a_broken.png").write_bytes(b"not an image")
    for name in ("b.png", "c.png"):
        Image.new("RGB", (32, 32), (10, 200, 30)).save(data / name)
    argv = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test", "--out",
            str(tmp_path / "E"), "--image-size", "32", "--batch-size", "1", "--num-workers", "0",
            "--device", "cpu", "--quiet"]
    write_json, calls = embed_mod._write_json, []

    def interrupted(path, obj):  # Ctrl-C after skipped.txt, before progress.json says so
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(embed_mod, "_write_json", interrupted)
    assert main(argv) == 130
    monkeypatch.setattr(embed_mod, "_write_json", write_json)
    assert main(argv) == 0
    skipped = (tmp_path / "E" / "skipped.txt").read_text().splitlines()
    assert skipped == [str(data / "a_broken.png")]


def test_sample_says_when_fewer_images_than_asked(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(20, 8))
    x[4] = np.nan  # an unreadable image is never sampled
    emb = _embeddings(tmp_path / "E", x)
    assert main(["cluster", emb, "--clusters", "4,2", "--iters", "2", "--device", "cpu",
                 "--out", str(tmp_path / "C")]) == 0
    out = tmp_path / "list.txt"
    assert main(["sample", str(tmp_path / "C"), "--n", "500", "--out", str(out)]) == 0
    assert "--n 500 is more than the 19 clustered images" in capsys.readouterr().out
    assert len(set(out.read_text().splitlines())) == 19 and "/img/4.jpg" not in out.read_text()
    assert main(["sample", str(tmp_path / "C"), "--n", "7", "--out", str(out)]) == 0
    assert "more than" not in capsys.readouterr().out and len(out.read_text().split()) == 7
