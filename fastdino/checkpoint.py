"""Training checkpoints: atomic, rotated, exactly resumable (SPEC.md §4, issue 3 item 6).

    <output_dir>/checkpoints/
        iter_0000100/                   one checkpoint ("tag")
            <DeepSpeed files>           student + optimizer (ZeRO partitions), or torch_engine.pt
            trainer_state.pt            teacher, Gram teacher, loss state (centers), iteration,
                                        data position, Gram refresh count; the ranks, images per
                                        rank per micro-batch and engine layout (ZeRO stage,
                                        precision) that wrote it (rank 0)
            rng_rank<r>.pt              python / numpy / torch / cuda RNG states of rank r
            files.json                  every file above with its size (rank 0, last): a resume
                                        checks them before it trusts the folder
            universal/                  only after a resume with another rank count, ZeRO stage,
                                        precision or engine: DeepSpeed's universal form
                                        (parallel.universal_checkpoint)
        latest                          text file naming the newest complete tag (written last)

Atomicity: everything is written into `checkpoints/.partial/<tag>/`, fsync'ed, then renamed to
`checkpoints/<tag>` (one rename on one filesystem), and only then `latest` is replaced through a
temp file + os.replace. A kill at any point leaves either the previous `latest` (pointing to a
complete checkpoint) or the new one; a stale `.partial` is deleted at the next save.
What a rename cannot guard against, a node or filesystem crash that leaves files of a published
checkpoint cut short, empty or missing (data not yet on disk on a network filesystem), a resume
finds through `files.json` (`checkpoint_problem`): `train.resume=auto` then continues from the
newest whole checkpoint before it, with a warning, and an explicit `train.resume=<folder>` is a
one-line error naming the file.
Every file we read back is loaded with `torch.load(..., weights_only=True)` (tensors, numbers,
strings, lists, dicts only: the numpy RNG state is stored as a tensor for that reason).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from fastdino import dist as fdist

logger = logging.getLogger("fastdino")

TAG_RE = re.compile(r"^iter_(\d+)$")
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "files.json"  # {relative path: size in bytes} of every file a save wrote


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or vanished folder): the message
    is one line naming the folder, what failed, the free space there and the checkpoint a
    resume continues from (the previous one: a failed save never touches it). Also raised for
    the run's other outputs (metrics.jsonl, the teacher snapshots, the final export): train.py
    ends the run with that one line, exit 1."""


def save_checkpoint(ckpt_dir: str | Path, iteration: int, engine, trainer_state: dict,
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. Any failure
    (on this rank) is a CheckpointWriteError."""
    ckpt_dir = Path(ckpt_dir)
    try:
        return _save(ckpt_dir, iteration, engine, trainer_state, keep)
    except Exception as e:  # noqa: BLE001 - torch.save's disk-full error is a RuntimeError
        try:
            free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "its free space unknown"
        try:
            previous = latest_checkpoint(ckpt_dir)
        except OSError:
            previous = None
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointWriteError(
            f"checkpoint {tag_for(iteration)} could not be written in {ckpt_dir} (rank "
            f"{fdist.get_rank()}): {type(e).__name__}: {first} ({free}); "
            + (f"the previous checkpoint {previous} is intact: train.resume=auto continues from "
               "it" if previous is not None else "no earlier checkpoint")) from e


def _save(ckpt_dir: Path, iteration: int, engine, trainer_state: dict, keep: int) -> Path:
    tag = tag_for(iteration)
    partial_root = ckpt_dir / ".partial"
    partial = partial_root / tag
    if fdist.is_main_process():
        # a save killed or failed half-way left its files here (of any tag): they may be what
        # filled the disk
        if partial_root.is_dir() and any(partial_root.iterdir()):
            _discard(ckpt_dir, partial_root, "an earlier save's unfinished files")
        partial.mkdir(parents=True)
    fdist.barrier()
    engine.save_checkpoint(str(partial_root), tag)
    rank = fdist.get_rank()
    torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    # this rank's own files durable before the barrier: rank 0's fsync below reaches only what
    # its own node caches; a shared filesystem that caches writes on the writer's node (Lustre,
    # GPFS) would lose another node's shard in a crash after rank 0 published the checkpoint
    # and rotated the previous one away
    for f in (partial / f"rng_rank{rank}.pt", *partial.glob(f"*zero_pp_rank_{rank}_*")):
        _fsync_path(f)
    if fdist.is_main_process():
        # what a resume needs to read the engine files and continue the data: the ranks, the
        # images per rank per micro-batch, and the engine's on-disk layout (ZeRO stage,
        # precision, optimizer; parallel.checkpoint_format)
        torch.save({**trainer_state, "iteration": iteration, "world_size": fdist.get_world_size(),
                    "micro_batch_size": getattr(engine, "micro_batch_size", None),
                    "engine_layout": getattr(engine, "checkpoint_layout", None)},
                   partial / STATE_FILE)
    fdist.barrier()
    final = ckpt_dir / tag
    if fdist.is_main_process():
        _write_manifest(partial)
        fsync_tree(partial)
        old = partial_root / (tag + ".replaced")
        if final.exists():  # an earlier run's (train.resume=none): moved aside, deleted after
            os.rename(final, old)  # (no rmtree while `latest` may name a missing folder)
        os.rename(partial, final)
        _fsync_path(ckpt_dir)
        _discard(ckpt_dir, old, f"an earlier run's {tag}")
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag + "\n")
        _fsync_path(tmp)
        os.replace(tmp, ckpt_dir / "latest")
        _fsync_path(ckpt_dir)
        _rotate(ckpt_dir, keep, iteration)
        logger.info("checkpoint %s written", final)
    fdist.barrier()
    return final


def _write_manifest(folder: Path) -> None:
    """files.json: the size of every file the save wrote (all ranks' files: after the barrier)."""
    sizes = {f.relative_to(folder).as_posix(): f.stat().st_size
             for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps(sizes, indent=0) + "\n")


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, found without reading its tensors; None
    when it looks whole. A file its save listed in files.json missing or of another size (a node
    or filesystem crash before the data reached the disk, an interrupted copy, a file deleted);
    in a checkpoint written before files.json, a .pt file that is not a whole zip archive
    (torch.save's format: a file cut short or empty has no end record)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    listed = path / MANIFEST_FILE
    if listed.exists():
        try:
            sizes = json.loads(listed.read_text())
            if not isinstance(sizes, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError) as e:
            return f"{MANIFEST_FILE} unreadable ({e})"
        for name, size in sizes.items():
            try:
                got = (path / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if got != size:
                return f"{name} has {got} bytes, the save wrote {size}"
        return None
    for f in sorted(path.glob("*.pt")):
        if not zipfile.is_zipfile(f):
            return f"{f.name} is cut short or not a torch file ({f.stat().st_size} bytes)"
    return None


def checkpoint_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, directory) of every iter_N checkpoint in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                  if p.is_dir() and (m := TAG_RE.match(p.name)))


def _rotate(ckpt_dir: Path, keep: int, iteration: int) -> None:
    """Keep the checkpoint just written at `iteration` and the keep - 1 before it. Checkpoints
    beyond it (an earlier run in this folder that went further: train.resume=none) are not this
    run's to delete; it replaces each when it reaches its iteration."""
    if keep <= 0:
        return
    mine = [p for it, p in checkpoint_dirs(ckpt_dir) if it <= iteration]
    for p in mine[:-keep]:
        _discard(ckpt_dir, p, f"checkpoint {p.name} (train.keep_checkpoints={keep})")


TRASH = ".deleted"  # in checkpoints/: folders being deleted (never taken for a checkpoint)


def _discard(ckpt_dir: Path, folder: Path, what: str) -> None:
    """Delete `folder` (a rotated checkpoint, a stale .partial, a replaced earlier one): renamed
    into checkpoints/.deleted/ first, so that what a failed delete leaves (files held open on a
    network filesystem, a read-only subfolder) is never taken for a checkpoint, then removed.
    A delete that fails is a warning naming the folder and the cause, not an error: the run goes
    on (the checkpoints are written), and the next save tries again."""
    trash = ckpt_dir / TRASH
    if trash.is_dir():
        for left in trash.iterdir():  # what an earlier delete could not remove
            shutil.rmtree(left, ignore_errors=True)
    if not folder.exists():
        return
    target = folder
    try:
        trash.mkdir(exist_ok=True)
        target = trash / f"{folder.name}.{time.time_ns()}"
        os.rename(folder, target)
    except OSError:
        target = folder  # deleted where it is (a half-deleted checkpoint fails checkpoint_problem)
    errors: list[tuple[str, BaseException]] = []

    def failed(func, path, exc):  # onerror passes sys.exc_info(), onexc the exception
        errors.append((path, exc[1] if isinstance(exc, tuple) else exc))

    kw = {"onexc": failed} if sys.version_info >= (3, 12) else {"onerror": failed}
    shutil.rmtree(target, **kw)
    with contextlib.suppress(OSError):
        trash.rmdir()  # (only when empty)
    if errors:
        _, e = errors[0]
        logger.warning("could not delete %s: %s: %s (%d path(s) left in %s); the run goes on, the "
                       "next checkpoint tries again; delete it by hand if it stays", what,
                       type(e).__name__, e, len(errors), target)


def complete_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """checkpoint_dirs that a resume can continue from: whole (`checkpoint_problem`)."""
    return [(it, p) for it, p in checkpoint_dirs(ckpt_dir) if checkpoint_problem(p) is None]


def _no_complete_checkpoint(ckpt_dir: Path) -> None:
    """Raise if `ckpt_dir` holds checkpoint folders but none a resume can continue from: starting
    over would replace them one by one, so the user decides (train.resume=none)."""
    found = checkpoint_dirs(ckpt_dir)
    if found:
        newest = found[-1][1]
        raise FileNotFoundError(
            f"{ckpt_dir}: no complete checkpoint to resume from ({len(found)} incomplete, the "
            f"newest {newest.name}: {checkpoint_problem(newest)}); train.resume=none starts over "
            "and replaces them, another train.output_dir keeps them")


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; without a `latest` pointer (iter_N folders copied without
    it), the newest complete iter_N, with a warning; None if there is none. A `latest` naming a
    missing, incomplete or damaged folder (`checkpoint_problem`): the newest complete one up to
    it, with a warning. Checkpoint folders none of which is complete: FileNotFoundError."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    m = TAG_RE.match(named) if named is not None else None
    if m is None:  # no pointer, or an empty / damaged one (a filesystem crash)
        found = complete_checkpoints(ckpt_dir)
        if found:
            logger.warning("%s: %s, taking the newest complete checkpoint %s", ckpt_dir,
                           "no 'latest' pointer" if named is None else
                           f"'latest' holds {named[:40]!r}, not a checkpoint name",
                           found[-1][1].name)
            return found[-1][1]
        _no_complete_checkpoint(ckpt_dir)
        return None
    path = ckpt_dir / named
    problem = checkpoint_problem(path)
    if problem is not None:
        # deleted by hand, cut short by a node crash, or a save killed between replacing an
        # earlier run's folder of that name and updating `latest`: the newest complete one up
        # to it
        found = [(it, p) for it, p in complete_checkpoints(ckpt_dir) if it <= int(m.group(1))]
        if not found:
            raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or "
                                    f"incomplete ({problem}), and no complete checkpoint up to "
                                    "it is there; train.resume=none starts over")
        logger.warning("%s names %s, which is missing or incomplete (%s): taking the newest "
                       "complete checkpoint up to it, %s", pointer, path.name, problem,
                       found[-1][1].name)
        return found[-1][1]
    return path


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """train.resume: auto (latest in output_dir, if any) | none | a checkpoint directory, a folder
    of them (checkpoints/: its latest, or its newest complete one) or a run's output_dir."""
    if resume == "none":
        found = checkpoint_dirs(ckpt_dir)
        if found:
            logger.warning("train.resume=none: starting from scratch in a folder holding "
                           "checkpoints (%s ... %s); this run replaces each of them when it "
                           "reaches its iteration. Another train.output_dir keeps them.",
                           found[0][1].name, found[-1][1].name)
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    path = _explicit_resume(resume, ckpt_dir)
    m = TAG_RE.match(path.name)
    later = [p for it, p in complete_checkpoints(ckpt_dir) if m is None or it > int(m.group(1))]
    if later and path.resolve() != later[-1].resolve():
        # the same command started again (a requeued job, a restart after a crash) goes back to
        # that checkpoint each time: the run's own later checkpoints and metrics lines are
        # replaced as it redoes them, progress lost without a word
        logger.warning("train.resume = %r (%s): this output_dir holds later checkpoints (up to "
                       "%s), which this run replaces as it reaches their iterations; "
                       "train.resume=auto continues from them", resume, path, later[-1].name)
    return path


def _explicit_resume(resume: str, ckpt_dir: str | Path) -> Path:
    """resolve_resume's checkpoint for a train.resume naming a folder."""
    path = Path(resume)
    if not (path / "latest").is_file() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # a run's output_dir: its newest checkpoint
    if (path / "latest").is_file() or checkpoint_dirs(path):  # a folder of iter_N checkpoints
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume = {resume!r}: no {STATE_FILE} there; give a "
                                "checkpoint directory (…/checkpoints/iter_N), its parent "
                                "checkpoints/, a run's output_dir, auto or none")
    problem = checkpoint_problem(path)
    if problem is not None:
        others = [p.name for _, p in complete_checkpoints(path.parent) if p != path]
        raise FileNotFoundError(
            f"train.resume = {resume!r}: that checkpoint is incomplete or damaged ({problem}: "
            "a save or copy cut short); "
            + (f"complete ones beside it: {', '.join(others[-3:])}" if others else
               "no complete checkpoint beside it"))
    return path


def load_checkpoint(path: Path, engine) -> dict:
    """Collective. Loads the engine state; returns the trainer state, with this rank's RNG states
    under "rng" (None if the world size changed). The caller restores them with `set_rng_state`
    as the very last thing before the first step (building a DataLoader iterator draws from the
    global torch RNG, so restoring earlier would shift the stream).

    Another number of ranks than the writer's (USERS.md §5), or another engine layout (ZeRO
    stage, precision, the plain torch engine): the engine re-partitions the ZeRO state
    (parallel.py: DeepSpeed universal checkpoint; student weights, AdamW moments and step count
    carry over), the teachers and loss state are replicated anyway. Another number of ranks or
    another per-rank batch (data.batch_size_per_gpu): the data position is remapped by
    `remap_data_position` to the same global image count. Not restored on another number of
    ranks: the RNG streams (per rank) — the run continues correctly but not bit-exactly as any
    run of fixed size would."""
    with _damaged_files(path, STATE_FILE):
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    saved, world = state.get("world_size"), fdist.get_world_size()
    with _damaged_files(path, "the student / optimizer files"):
        engine.load_checkpoint(str(path.parent), path.name, saved_world_size=saved,
                               saved_layout=state.get("engine_layout"))
    rng_file = path / f"rng_rank{fdist.get_rank()}.pt"
    state["rng"] = None
    if saved == world and rng_file.is_file():
        with _damaged_files(path, rng_file.name):
            state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=True)
    else:
        logger.warning("checkpoint %s was written by %s ranks, this run has %d: RNG states not "
                       "restored (the run continues, but not bit-exactly)", path, saved, world)
    if "data_iteration" in state:
        batch = getattr(engine, "micro_batch_size", None)
        if needs_data_remap(saved, state.get("micro_batch_size"), world, batch, path):
            state["data_iteration"] = remap_data_position(
                state["data_iteration"], saved, state.get("micro_batch_size"), world, batch, path)
    return state


@contextlib.contextmanager
def _damaged_files(path: Path, what: str):
    """A torch file of checkpoint `path` that cannot be read (damaged with its size intact, or a
    checkpoint from before files.json): one line naming the checkpoint and the file, a
    ValueError, instead of torch's traceback. Other errors (a checkpoint that does not fit the
    model) pass through."""
    try:
        yield
    except (EOFError, RuntimeError, zipfile.BadZipFile) as e:
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is damaged: {what} cannot be read "
                         f"({type(e).__name__}: {first}); resume from an earlier checkpoint "
                         "(train.resume=<its folder>) or start over (train.resume=none)") from e


def needs_data_remap(saved_world: int | None, saved_batch: int | None, world: int,
                     batch: int | None, path: Path | str = "checkpoint") -> bool:
    """Whether the loader position (micro-batches of this rank) must be converted: the ranks or
    the images per rank per micro-batch differ from the writer's. A checkpoint without the
    world size (the oldest) or without the per-rank batch (written before it was recorded,
    or by the plain torch engine before it recorded it) is taken as written by this run's
    batch, as before, with a warning when that assumption decides the position."""
    if saved_world is None:
        return False
    if saved_batch is None and batch is not None:
        logger.warning("%s does not record the images per rank per micro-batch (an older "
                       "checkpoint): the data position assumes it was data.batch_size_per_gpu = "
                       "%d, this run's; if it was not, images are repeated or skipped", path,
                       batch)
        return saved_world != world
    return saved_world != world or (batch is not None and saved_batch != batch)


def remap_data_position(micro_batches: int, saved_world: int, saved_batch: int | None,
                        world: int, batch: int | None, path: Path | str = "checkpoint") -> int:
    """This rank's loader position (micro-batches) that continues a run of `saved_world` ranks
    x `saved_batch` images at `micro_batches`, on `world` ranks x `batch` images.

    The loader's image stream does not depend on the world size (data/loader.py: epoch
    permutations seeded by (data.seed, epoch); rank r of W reads global positions k*W + r, so
    after s micro-batches of B images the W ranks together have read exactly positions
    0 .. s*B*W - 1). Continuing at the same global image count G = s*B*W is therefore exact
    when B'*W' divides G: every image is seen as often as in an uninterrupted run. Otherwise the
    run restarts at the micro-batch boundary before G, and up to B'*W' - 1 images of the last
    global batch are seen a second time. What cannot carry over: which rank / micro-batch an image
    lands in (batch composition for Sinkhorn-Knopp, KoLeo, iBOT masks), and the global batch
    B'*W'*gas (the lr scaling uses the new one; schedules stay indexed by iteration)."""
    if saved_batch is None:  # checkpoints written before the field existed
        saved_batch = batch
    if batch is None:
        batch = saved_batch
    if batch is None:
        raise ValueError(f"{path}: cannot remap the data position from {saved_world} to {world} "
                         "ranks without the micro-batch size")
    images = micro_batches * saved_batch * saved_world
    per_step = batch * world
    new, rest = divmod(images, per_step)
    if rest:
        logger.warning("%s: %d images seen by %d ranks x %d per micro-batch is not a multiple of "
                       "%d ranks x %d: the data continues at global image %d (%d images of the "
                       "last global batch are seen again)", path, images, saved_world, saved_batch,
                       world, batch, new * per_step, rest)
    logger.info("%s: data position %d micro-batches x %d ranks x %d images -> %d micro-batches "
                "x %d ranks x %d images (global image %d)", path, micro_batches, saved_world,
                saved_batch, new, world, batch, new * per_step)
    return new
