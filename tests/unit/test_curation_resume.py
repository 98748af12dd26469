"""`fastdino curate cluster` is resumable: every finished level, and the k-means progress within
a level, is saved atomically into --out; the same command continues a killed run to the result of
an uninterrupted one (same seed), a rerun with other arguments or other embeddings is refused in
one line, and a refused argument leaves no --out behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastdino.curation.hierarchical as hierarchical
from fastdino.curation.cli import main


def _embeddings(folder, n=160, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, d)) * 4
    x = centers[rng.integers(0, 10, n)] + rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    folder.mkdir(exist_ok=True)
    np.save(folder / "embeddings.npy", x.astype(np.float16))
    (folder / "files.txt").write_text("".join(f"/img/{i}.jpg\n" for i in range(n)))
    (folder / "progress.json").write_text(json.dumps(
        {"done": n, "complete": True,
         "key": {"weights": "w", "arch": "a", "image_size": 224, "n": n, "dim": d}}))
    return str(folder)


ARGS = ["--clusters", "12,4,2", "--resampling-steps", "2", "--iters", "4", "--device", "cpu"]


def _cluster(emb, out, *extra):
    return main(["cluster", emb, *ARGS, "--out", str(out), *extra])


def _levels(out):
    return {f"level{i}/{n}": np.load(out / f"level{i}" / f"{n}.npy")
            for i in (1, 2, 3) for n in ("centroids", "assignment", "dist2")}


def _save_always(monkeypatch):
    """Every point of progress within a level saved (not every 5 minutes)."""
    monkeypatch.setattr(hierarchical, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(hierarchical, "SAVE_SHARE", float("inf"))


def _kill_when(monkeypatch, stop):
    """Ctrl-C right after the progress file that `stop(state)` is true of is on disk."""
    commit = hierarchical.ClusterStore._commit

    def killed(self):
        commit(self)
        if stop(self.state):
            raise KeyboardInterrupt

    monkeypatch.setattr(hierarchical.ClusterStore, "_commit", killed)
    return commit


def _partial(level, stage, done):
    return lambda s: s["partial"] == {**(s["partial"] or {}), "level": level, "stage": stage,
                                      "done": done}


@pytest.mark.parametrize("stop, said", [
    (lambda s: len(s["levels"]) == 1 and s["partial"] is None, "resuming: level 1 of 3 done"),
    (lambda s: len(s["levels"]) == 2 and s["partial"] is None, "resuming: levels 1-2 of 3 done"),
    (_partial(1, "lloyd", 2), "resuming: level 1 at Lloyd iteration 2/4"),
    (_partial(1, "lloyd", 0), "resuming: level 1 after its k-means++ init"),
    (_partial(2, "resampling", 1),
     "resuming: level 1 of 3 done, level 2 at resampling step 1/2"),
])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys, stop,
                                                         said):
    _save_always(monkeypatch)
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "whole") == 0
    whole = _levels(tmp_path / "whole")
    commit = _kill_when(monkeypatch, stop)
    capsys.readouterr()
    assert _cluster(emb, tmp_path / "C") == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to continue from what --out holds" in err
    assert not (tmp_path / "C" / "meta.json").exists()  # not a finished clustering
    assert main(["sample", str(tmp_path / "C"), "--n", "5", "--out",
                 str(tmp_path / "l.txt")]) == 2
    assert "not fully clustered yet: rerun the same" in capsys.readouterr().err
    monkeypatch.setattr(hierarchical.ClusterStore, "_commit", commit)
    assert _cluster(emb, tmp_path / "C") == 0
    assert said in capsys.readouterr().out.splitlines()
    resumed = _levels(tmp_path / "C")
    for name, a in whole.items():
        np.testing.assert_array_equal(resumed[name], a, err_msg=name)
    a_meta, b_meta = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("whole", "C"))
    assert a_meta == b_meta
    # and the same Lloyd iteration counts and random generator state after every level
    a_prog, b_prog = (json.loads((tmp_path / d / hierarchical.PROGRESS).read_text())
                      for d in ("whole", "C"))
    assert a_prog["levels"] == b_prog["levels"]
    assert not list((tmp_path / "C").glob("*.partial.npy"))
    assert not list((tmp_path / "C").glob(".*.tmp"))


def test_finished_rerun_computes_nothing(tmp_path, monkeypatch, capsys):
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "C") == 0
    before = _levels(tmp_path / "C")

    def never(*args, **kwargs):
        raise AssertionError("a finished clustering was computed again")

    monkeypatch.setattr(hierarchical, "kmeans", never)
    capsys.readouterr()
    assert _cluster(emb, tmp_path / "C") == 0
    out = capsys.readouterr().out
    assert "resuming: levels 1-3 of 3 done: nothing left to cluster" in out
    assert "level 3: 2 clusters" in out
    for name, a in _levels(tmp_path / "C").items():
        np.testing.assert_array_equal(a, before[name])


@pytest.mark.parametrize("extra, said", [
    (["--seed", "1"], "--seed 0 (now 1)"),
    (["--clusters", "12,4"], "--clusters 12,4,2 (now 12,4)"),
    (["--resampling-steps", "3"], "--resampling-steps 2,2,2 (now 3,3,3)"),
    (["--sample-size", "3"], "--sample-size"),
    (["--iters", "5"], "--iters 4 (now 5)"),
    (["--strategy", "r"], "--strategy c (now r)"),
])
def test_rerun_with_other_arguments_is_refused(tmp_path, monkeypatch, capsys, extra, said):
    _save_always(monkeypatch)
    emb = _embeddings(tmp_path / "E")
    _kill_when(monkeypatch, lambda s: len(s["levels"]) == 1)
    assert _cluster(emb, tmp_path / "C") == 130
    progress = (tmp_path / "C" / hierarchical.PROGRESS).read_text()
    capsys.readouterr()
    assert _cluster(emb, tmp_path / "C", *extra) == 2  # (argparse: the last --clusters wins)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and "--overwrite" in err[0], err
    assert (tmp_path / "C" / hierarchical.PROGRESS).read_text() == progress  # untouched


def test_other_embeddings_are_refused_and_overwrite_starts_over(tmp_path, monkeypatch, capsys):
    _save_always(monkeypatch)
    emb = _embeddings(tmp_path / "E")
    commit = _kill_when(monkeypatch, lambda s: len(s["levels"]) == 1)
    assert _cluster(emb, tmp_path / "C") == 130
    monkeypatch.setattr(hierarchical.ClusterStore, "_commit", commit)
    capsys.readouterr()
    _embeddings(tmp_path / "E", n=150, seed=1)  # the same folder, embedded again
    assert _cluster(emb, tmp_path / "C") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n 160, now 150" in err[0] and "--overwrite" in err[0]
    _embeddings(tmp_path / "E", seed=2)  # as many rows, with the same key: other values
    assert _cluster(emb, tmp_path / "C") == 2
    assert "the embeddings of" in (err := _one_line(capsys)) and "other content" in err
    other = _embeddings(tmp_path / "E2", seed=3)  # another folder
    assert _cluster(other, tmp_path / "C") == 2
    was, now = (str((tmp_path / d).resolve()) for d in ("E", "E2"))
    assert f"{was} (now {now}) as they were then (other content)" in _one_line(capsys)
    (tmp_path / "C" / "notes.txt").write_text("mine\n")
    assert _cluster(emb, tmp_path / "C", "--overwrite") == 0
    assert "resuming" not in capsys.readouterr().out
    assert (tmp_path / "C" / "notes.txt").read_text() == "mine\n"  # only its own files deleted
    assert _cluster(emb, tmp_path / "fresh") == 0
    fresh = _levels(tmp_path / "fresh")
    for name, a in _levels(tmp_path / "C").items():
        np.testing.assert_array_equal(a, fresh[name], err_msg=name)


def test_moved_embeddings_resume(tmp_path, monkeypatch, capsys):
    """The embeddings are identified by their content, not their path: after a preemption the
    job may see them under another mount."""
    _save_always(monkeypatch)
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "whole") == 0
    commit = _kill_when(monkeypatch, lambda s: len(s["levels"]) == 1)
    assert _cluster(emb, tmp_path / "C") == 130
    monkeypatch.setattr(hierarchical.ClusterStore, "_commit", commit)
    (tmp_path / "E").rename(tmp_path / "moved")
    capsys.readouterr()
    assert _cluster(str(tmp_path / "moved"), tmp_path / "C") == 0
    assert "resuming: level 1 of 3 done" in capsys.readouterr().out
    whole = _levels(tmp_path / "whole")
    for name, a in _levels(tmp_path / "C").items():
        np.testing.assert_array_equal(a, whole[name], err_msg=name)
    meta = json.loads((tmp_path / "C" / "meta.json").read_text())
    assert meta["embeddings"] == str((tmp_path / "moved").resolve())  # sample's files.txt


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_out_in_the_embeddings_folder_leaves_them_alone(tmp_path, capsys):
    """--out E (the embeddings folder itself): the clustering's files beside the embeddings;
    --overwrite deletes only them (it deleted `curate embed`'s progress.json, and the folder
    was no longer an embeddings folder for dedup / retrieve / contamination)."""
    emb = _embeddings(tmp_path / "E")
    before = sorted(p.name for p in (tmp_path / "E").iterdir())
    assert _cluster(emb, tmp_path / "E") == 0
    assert _cluster(emb, tmp_path / "E", "--overwrite") == 0
    assert main(["dedup", emb, "--out", str(tmp_path / "u.txt"), "--device", "cpu",
                 "--quiet"]) == 0
    assert main(["sample", emb, "--n", "5", "--out", str(tmp_path / "s.txt")]) == 0
    after = {p.name for p in (tmp_path / "E").iterdir()}
    assert set(before) <= after


def test_folder_without_progress_is_refused(tmp_path, capsys):
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "C") == 0
    (tmp_path / "C" / hierarchical.PROGRESS).unlink()  # as made before clustering resumed
    capsys.readouterr()
    assert _cluster(emb, tmp_path / "C") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without cluster_progress.json" in err[0] and "--overwrite" in err[0]
    assert _cluster(emb, tmp_path / "C", "--overwrite") == 0


@pytest.mark.parametrize("extra", [["--clusters", "500"],  # more clusters than embeddings
                                   ["--clusters", "6,12"],  # more than the level below
                                   ["--sample-size", "2,2"],  # 2 values for 3 levels
                                   ["--resampling-steps", "1,1"]])
def test_refused_arguments_leave_no_out_folder(tmp_path, extra):
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "new" / "C", *extra) == 2
    assert not (tmp_path / "new").exists()


def _rank(rank: int, port: int, argvs: list[list[str]], results: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import contextlib
    import io

    rcs = []
    for argv in argvs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                rcs.append(main(argv[rank] if isinstance(argv[0], list) else argv))
        except Exception as e:  # noqa: BLE001 (reported to the test, not swallowed)
            rcs.append(repr(e))
        rcs.append(err.getvalue().strip())
    with open(f"{results}.{rank}", "w") as f:
        json.dump(rcs, f)


def test_two_ranks_resume_and_agree_on_the_progress(tmp_path, monkeypatch):
    """Under torchrun every rank reads --out (only the first writes): two ranks continue a
    single-process run killed after level 1; and ranks that see different progress (an --out
    that is not shared) are refused on both instead of waiting for each other forever."""
    import socket

    import torch.multiprocessing as mp

    _save_always(monkeypatch)
    emb = _embeddings(tmp_path / "E")
    assert _cluster(emb, tmp_path / "whole") == 0
    commit = _kill_when(monkeypatch, lambda s: len(s["levels"]) == 1 and s["partial"] is None)
    assert _cluster(emb, tmp_path / "C") == 130
    monkeypatch.setattr(hierarchical.ClusterStore, "_commit", commit)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["cluster", emb, *ARGS]
    runs = [[*argv, "--out", str(tmp_path / "C")],  # both ranks: the same folder
            [[*argv, "--out", str(tmp_path / "C")], [*argv, "--out", str(tmp_path / "other")]]]
    mp.spawn(_rank, args=(port, runs, str(tmp_path / "rc")), nprocs=2, join=True)
    for r in (0, 1):
        rc, err, rc_other, err_other = json.loads((tmp_path / f"rc.{r}").read_text())
        assert (rc, rc_other) == (0, 2) and "error" not in err
        assert "the ranks found different progress in it" in err_other.splitlines()[-1]
    whole, resumed = _levels(tmp_path / "whole"), _levels(tmp_path / "C")
    for name, a in whole.items():  # (2 ranks sum in another order: centroids to rounding)
        np.testing.assert_allclose(resumed[name], a, rtol=1e-5, atol=1e-6, err_msg=name)
    assert not (tmp_path / "other").exists()


def test_slow_saves_are_spaced_out(tmp_path, monkeypatch):
    """Within a level, a save that takes long (millions of centroids) is not repeated sooner
    than 10 times its duration, whatever SAVE_EVERY_S says."""
    import torch

    monkeypatch.setattr(hierarchical, "SAVE_EVERY_S", 0.0)
    store = hierarchical.ClusterStore(tmp_path / "C", {"clusters": [2], "iters": 5})
    save = store.saver(1, np.random.default_rng(0))
    save("lloyd", 1, torch.zeros(2, 3), 1)
    assert store.state["partial"]["done"] == 1
    store.save_s = 1e6  # as if that save had taken 11 days
    save("lloyd", 2, torch.ones(2, 3), 2)
    assert store.state["partial"]["done"] == 1
    assert np.load(tmp_path / "C" / "level1.partial.npy").sum() == 0


def test_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    """Two runs writing one --out (two terminals, a job queued twice) mixed their levels: the
    writer holds a lock, a second run is refused naming it, and the lock ends with the run."""
    import os

    emb = _embeddings(tmp_path / "E")
    other = hierarchical.ClusterStore.open(tmp_path / "C", {"clusters": [2]})
    try:
        assert _cluster(emb, tmp_path / "C") == 2
        err = _one_line(capsys)
        assert "is being written by another `curate cluster`" in err
        assert f"pid {os.getpid()}" in err
    finally:
        other.close()
    assert _cluster(emb, tmp_path / "C") == 0
    assert _cluster(emb, tmp_path / "C") == 0  # (released at the end of the call)
