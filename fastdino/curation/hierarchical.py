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

Resumable (`store`, a ClusterStore over `curate cluster --out`): each finished level, and within a
level the k-means progress every SAVE_EVERY_S, is saved with the random generator's state, so a
rerun continues a killed run to the uninterrupted run's result.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

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
                           impl: str = "auto", store: ClusterStore | None = None,
                           level: int = 1) -> KMeansResult:
    """One level: k-means, then the resampling steps (module docstring). `store`: saves the
    progress of level `level` into it, and continues from what it holds (ClusterStore)."""
    at = store.partial(level) if store is not None else None
    save = None if store is None else store.saver(level, rng)
    if at is None or at["stage"] == "lloyd":
        init = None if at is None else store.partial_centroids(rows.device)
        res = kmeans(rows, k, rng, n_iters=n_iters, impl=impl, init=init,
                     done=0 if at is None else at["done"],
                     on_update=None if save is None else
                     lambda c, done: save("lloyd", done, c, done))
        logger.info("k-means k=%d: inertia %.6g after %d iterations", k, res.inertia, res.n_iters)
        first = 0
    else:  # resampling step `done` finished: its assignment is the centroids' (as below)
        c = store.partial_centroids(rows.device)
        assignment, dist2 = assign_all(rows, c, impl)
        res = KMeansResult(c, assignment, dist2,
                           float(dist2[assignment >= 0].astype(np.float64).sum()), at["n_iters"])
        first = at["done"]
    if sample_size <= 1:
        return res
    for step in range(first, resampling_steps):
        if save is not None:
            save("resampling", step, res.centroids, res.n_iters)
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


def check_levels(clusters: Sequence[int], resampling_steps: Sequence[int],
                 sample_sizes: Sequence[int], n: int, n_rows: int) -> None:
    """The level specification against `n` clusterable embeddings of `n_rows` (ValueError)."""
    n_levels = len(clusters)
    if not (len(resampling_steps) == len(sample_sizes) == n_levels) or n_levels == 0:
        raise ValueError(f"--clusters, --resampling-steps and --sample-size need one value per "
                         f"level, got {list(clusters)}, {list(resampling_steps)}, "
                         f"{list(sample_sizes)}")
    sizes = [n, *clusters]
    if any(b > a for a, b in zip(sizes, sizes[1:], strict=False)):
        unreadable = f", {n_rows - n} unreadable images left out" if n < n_rows else ""
        raise ValueError(f"--clusters {list(clusters)}: each level needs at most as many clusters "
                         f"as points below it ({n} embeddings at level 0{unreadable})")


def hierarchical_kmeans(rows: Rows, clusters: Sequence[int], resampling_steps: Sequence[int],
                        sample_sizes: Sequence[int], rng: np.random.Generator,
                        n_iters: int = 50, strategy: str = "c", impl: str = "auto",
                        store: ClusterStore | None = None) -> list[KMeansResult]:
    """One KMeansResult per level, bottom (level 1, over `rows`) to top. `store`: each finished
    level (and the progress within one) is saved into it, and the levels it already holds are
    taken from it (with the random generator's state at that point: the result is the
    uninterrupted run's)."""
    n_levels = len(clusters)
    # checked before any k-means runs: with unreadable images (NaN rows, never clustered) a k
    # between the finite and the total count failed only at the first resampling step
    check_levels(clusters, resampling_steps, sample_sizes, rows.n_finite(), rows.n)
    levels: list[KMeansResult] = store.restore(rows.device, rng) if store is not None else []
    per_level = zip(clusters, resampling_steps, sample_sizes, strict=True)
    for level, (k, steps, size) in enumerate(per_level, 1):
        if level <= len(levels):
            continue
        source = rows if level == 1 else Rows(levels[-1].centroids, rows.device)
        logger.info("level %d/%d: %d points -> %d clusters", level, n_levels, source.n, k)
        levels.append(kmeans_with_resampling(source, k, steps, size, rng, n_iters, strategy,
                                             impl, store, level))
        if store is not None:
            store.save_level(level, levels[-1], rng)
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


def _save_npy(path: Path, a: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, a)
    os.replace(tmp, path)  # atomic: a killed run leaves the old file or the new one, never half


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _save_level(root: Path, i: int, lv: KMeansResult) -> None:
    d = root / f"level{i}"
    d.mkdir(parents=True, exist_ok=True)
    _save_npy(d / "centroids.npy", lv.centroids.cpu().numpy().astype(np.float32))
    _save_npy(d / "assignment.npy", lv.assignment.astype(np.int64))
    _save_npy(d / "dist2.npy", lv.dist2.astype(np.float32))


def write_meta(levels: Sequence[KMeansResult], out: str | Path, meta: dict) -> None:
    """<out>/meta.json, which makes the levels in <out> a finished clustering (`load_levels`)."""
    _write_json(Path(out) / "meta.json",
                {**meta, "levels": len(levels),
                 "clusters": [int(lv.centroids.shape[0]) for lv in levels],
                 "inertia": [lv.inertia for lv in levels]})


def save_levels(levels: Sequence[KMeansResult], out: str | Path, meta: dict) -> None:
    """<out>/level{l}/{centroids,assignment,dist2}.npy + <out>/meta.json."""
    root = Path(out)
    for i, lv in enumerate(levels, 1):
        _save_level(root, i, lv)
    write_meta(levels, root, meta)


def load_levels(path: str | Path) -> tuple[list[KMeansResult], dict]:
    root = Path(path)
    if not (root / "meta.json").is_file():
        if (root / PROGRESS).is_file():  # (was "holds no meta.json" for a killed run's --out)
            raise FileNotFoundError(f"{path} is not fully clustered yet: rerun the same "
                                    "`fastdino curate cluster` command to finish it")
        raise FileNotFoundError(f"{str(path)!r} holds no meta.json: give the --out folder of "
                                "`fastdino curate cluster`")
    meta = json.loads((root / "meta.json").read_text())
    levels = [_load_level(root, i, meta["inertia"][i - 1], 0)
              for i in range(1, meta["levels"] + 1)]
    return levels, meta


def _load_level(root: Path, i: int, inertia: float, n_iters: int) -> KMeansResult:
    d = root / f"level{i}"
    return KMeansResult(torch.from_numpy(np.load(d / "centroids.npy")),
                        np.load(d / "assignment.npy"), np.load(d / "dist2.npy"), inertia, n_iters)


# in --out: what is done, and the arguments it was done with (not "progress.json", the name of
# `curate embed`'s: an --out that is the embeddings folder lost it to --overwrite)
PROGRESS = "cluster_progress.json"
SAVE_EVERY_S = 300.0  # within a level, the k-means progress is saved at most this often
SAVE_SHARE = 0.1  # and at most this share of the time goes to such saves
# key entries that are options (the other entries describe the embeddings clustered)
OPTIONS = {"clusters": "--clusters", "resampling_steps": "--resampling-steps",
           "sample_sizes": "--sample-size", "iters": "--iters", "strategy": "--strategy",
           "seed": "--seed"}


def _writable_folder(out: Path) -> None:
    """Raise now, not hours later, where `out` could not be made or written (nothing made)."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise NotADirectoryError(f"--out {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {p} is not writable")


LOCK = ".cluster.lock"  # in --out: held by the run writing it (the pid, host and start in it)


def _lock(root: Path):
    """An exclusive flock on <root>/.cluster.lock, held (the open file) while this run writes
    --out: two runs writing one --out (two terminals, a job queued twice) mixed their levels.
    It ends with its process however that ends (runlock.lock_file). None where nothing can be
    locked."""
    from fastdino.runlock import lock_file

    def refused(holder: str) -> ValueError:
        return ValueError(f"--out {root} is being written by another `curate cluster` "
                          f"({holder}): wait for it to end, stop it, or give another --out")

    return lock_file(root / LOCK, refused, "`curate cluster`")


class ClusterStore:
    """The --out folder of `curate cluster` while it fills, so that a killed run (preemption,
    Ctrl-C, out of memory) keeps its finished levels and, within a level, the k-means progress
    saved at the first point past SAVE_EVERY_S since the last save (after the k-means++ init,
    a Lloyd iteration or a resampling step; and at least a save's duration / SAVE_SHARE
    later, so that millions of centroids, gigabytes, cost at most 10% of the time):

        <out>/cluster_progress.json {"key": the arguments and embeddings, "levels": per finished
                                    level its inertia and the random generator's state after it,
                                    "partial": where the current level's k-means is}
        <out>/level{l}/*.npy       each finished level (as save_levels)
        <out>/level{l}.partial.npy the current level's centroids at "partial"
        <out>/meta.json            written last: the clustering is finished (load_levels)

    Every file is written to a temporary name and renamed; progress.json, renamed last, is what
    counts. A rerun with the same key continues from it, exactly as the uninterrupted run
    (the generator's state is restored, and a resampling step's assignment is recomputed from
    its centroids); another key is refused. The writer holds a lock on --out (.cluster.lock)
    until `close()`: a second run on the same --out is refused. Only the main process writes
    (`write`); every rank reads, so under torchrun --out must be a folder every rank sees."""

    def __init__(self, out: str | Path, key: dict, state: dict | None = None,
                 write: bool = True, source: str | None = None) -> None:
        self.root, self.key, self.write = Path(out), key, write
        self.state = state or {"key": key, "levels": [], "partial": None}
        self.state["embeddings"] = source  # where they are now (not in the key: may move)
        self.last_save = time.monotonic()
        self.save_s = 0.0  # how long the last partial save took
        self.lock = None  # (open: the writer's lock on --out)

    @classmethod
    def open(cls, out: str | Path, key: dict, overwrite: bool = False, write: bool = True,
             source: str | None = None) -> ClusterStore:
        """The store of `out`: its progress when made with `key`; refused (ValueError) when made
        otherwise, unless `overwrite` (its clustering files are then deleted, others kept).
        `source`: the embeddings folder, named in the refusal (the key identifies it by its
        content: a folder moved, e.g. another mount after a preemption, continues)."""
        root = Path(out)
        _writable_folder(root)
        lock = _lock(root) if write else None  # (before reading: another run may be writing)
        try:
            store = cls._open(root, key, overwrite, write, source)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        store.lock = lock
        return store

    @classmethod
    def _open(cls, root: Path, key: dict, overwrite: bool, write: bool,
              source: str | None) -> ClusterStore:
        progress = root / PROGRESS
        if overwrite:
            if write:
                cls._clear(root)
            return cls(root, key, write=write, source=source)
        if progress.is_file():
            state = json.loads(progress.read_text())
            cls._check_key(root, state.get("key") or {}, key, state.get("embeddings"), source)
            return cls(root, key, state, write, source)
        if (root / "meta.json").is_file() or any(root.glob("level[0-9]*")):
            raise ValueError(f"--out {root} holds a clustering without {PROGRESS} (made before "
                             "clustering was resumable, or by other means): start over with "
                             "--overwrite, or give a new --out")
        return cls(root, key, write=write, source=source)

    def close(self) -> None:
        """Release --out for another run (the lock)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @staticmethod
    def _check_key(out: str | Path, old: dict, new: dict, was: str | None,
                   now: str | None) -> None:
        differ = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        if not differ:
            return
        options = [k for k in differ if k in OPTIONS]
        if options:
            what = ", ".join(f"{OPTIONS[k]} {_flag(old.get(k))} (now {_flag(new.get(k))})"
                             for k in options)
        else:  # another folder, or the same one embedded again since
            where = was if was == now else f"{was} (now {now})"
            what = (f"the embeddings of {where} as they were then ("
                    + ", ".join(_change(k, old.get(k), new.get(k)) for k in differ) + ")")
        raise ValueError(f"--out {out} holds clustering progress made with {what}: rerun with "
                         "the same arguments to resume, or start over with --overwrite or a new "
                         "--out")

    @staticmethod
    def _clear(root: Path) -> None:
        """What a clustering writes into `root` (the user's other files stay)."""
        import shutil

        for d in root.glob("level[0-9]*"):
            if d.is_dir() and d.name[5:].isdigit():
                shutil.rmtree(d)
        for f in [root / "meta.json", root / PROGRESS, *root.glob("level*.partial.npy"),
                  *root.glob(".level*.partial.npy.tmp"), root / f".{PROGRESS}.tmp",
                  root / ".meta.json.tmp"]:
            f.unlink(missing_ok=True)

    def position(self) -> tuple[int, int, int]:
        """(levels done, 0 / 1 / 2: no partial / Lloyd / resampling, its `done`)."""
        p = self.state["partial"]
        stage = 0 if p is None else 1 + (p["stage"] == "resampling")
        return len(self.state["levels"]), stage, 0 if p is None else p["done"]

    def describe(self) -> str | None:
        """The one line a resumed run prints, None for a fresh start."""
        n_done, p = len(self.state["levels"]), self.state["partial"]
        if n_done == 0 and p is None:
            return None
        n_levels = len(self.key["clusters"])
        parts = []
        if n_done:
            parts.append(f"level{'s 1-' if n_done > 1 else ' '}{n_done} of {n_levels} done")
        if p is not None and p["stage"] == "lloyd" and p["done"] == 0:
            parts.append(f"level {p['level']} after its k-means++ init")
        elif p is not None:
            what = "Lloyd iteration" if p["stage"] == "lloyd" else "resampling step"
            total = (self.key["iters"] if p["stage"] == "lloyd"
                     else self.key["resampling_steps"][p["level"] - 1])
            parts.append(f"level {p['level']} at {what} {p['done']}/{total}")
        left = "" if n_done < n_levels else ": nothing left to cluster"
        return f"resuming: {', '.join(parts)}{left}"

    def restore(self, device: torch.device, rng: np.random.Generator) -> list[KMeansResult]:
        """The finished levels (centroids on `device`); `rng` set to its state at the point
        saved."""
        levels = []
        for i, lv in enumerate(self.state["levels"], 1):
            r = _load_level(self.root, i, lv["inertia"], lv["n_iters"])
            r.centroids = r.centroids.to(device)
            levels.append(r)
        p = self.state["partial"]
        if p is None and self.write:  # left by a run killed between progress.json and its unlink
            for f in self.root.glob("level*.partial.npy"):
                f.unlink(missing_ok=True)
        saved = p["rng"] if p is not None else (self.state["levels"] or [{}])[-1].get("rng")
        if saved is not None:
            rng.bit_generator.state = saved
        return levels

    def partial(self, level: int) -> dict | None:
        p = self.state["partial"]
        return p if p is not None and p["level"] == level else None

    def partial_centroids(self, device: torch.device) -> torch.Tensor:
        p = self.root / f"level{self.state['partial']['level']}.partial.npy"
        return torch.from_numpy(np.load(p)).to(device)

    def _commit(self) -> None:
        _write_json(self.root / PROGRESS, self.state)
        self.last_save = time.monotonic()

    def saver(self, level: int, rng: np.random.Generator):
        """save(stage, done, centroids, n_iters): the level's progress, at most every
        SAVE_EVERY_S (stage "lloyd": `done` updates of the first k-means; "resampling": `done`
        steps finished)."""
        def save(stage: str, done: int, centroids: torch.Tensor, n_iters: int) -> None:
            # (millions of centroids are gigabytes)
            every = max(SAVE_EVERY_S, self.save_s / SAVE_SHARE)
            if not self.write or time.monotonic() - self.last_save < every:
                return
            t0 = time.monotonic()
            self.root.mkdir(parents=True, exist_ok=True)
            _save_npy(self.root / f"level{level}.partial.npy",
                      centroids.cpu().numpy().astype(np.float32))
            self.state["partial"] = {"level": level, "stage": stage, "done": done,
                                     "n_iters": n_iters, "rng": rng.bit_generator.state}
            self._commit()
            self.save_s = time.monotonic() - t0
        return save

    def save_level(self, level: int, res: KMeansResult, rng: np.random.Generator) -> None:
        self.state["levels"].append({"inertia": res.inertia, "n_iters": res.n_iters,
                                     "rng": rng.bit_generator.state})
        self.state["partial"] = None
        if not self.write:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        _save_level(self.root, level, res)
        self._commit()
        (self.root / f"level{level}.partial.npy").unlink(missing_ok=True)


def _change(k: str, old, new) -> str:
    if k == "content":  # (digests say nothing to a user)
        return "other content"
    if k == "embedded_with":  # `curate embed`'s key: its entries that differ
        old, new = old or {}, new or {}
        return ", ".join(f"{e} {old.get(e)}, now {new.get(e)}" for e in {**old, **new}
                         if old.get(e) != new.get(e))
    return f"{k} {old}, now {new}"


def _flag(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)
