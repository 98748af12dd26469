"""Co-distillation: several students distilled from one frozen teacher in one run (SPEC.md §1.8;
the official MultiDistillationMetaArch, which distils the ViT-S/B/L/H+ family from the 7B
teacher at once).

    distillation.enabled: true
    distillation.teacher: runs/vit7b
    distillation.students: [students/vitb16.yaml, students/vitl16.yaml]

The main config's own student is the first ("main", in <train.output_dir>). Each entry of
`distillation.students` is a yaml (a path, or a preset name) of the keys in which another student
differs, applied onto the main config: its model, heads, optimizer, schedules, KoLeo, kernels,
ZeRO stage, probes and metric sinks (STUDENT_KEYS; anything else is shared and an error there).
Each student writes its own run folder, <train.output_dir>/students/<yaml stem>/ (its resolved
config.yaml, checkpoints, metrics, TensorBoard files, exported backbone): that config trains the
same student alone. A W&B run (train.wandb_project) is the main student's only.

What is shared, and why it saves compute: the batches (one loader: every student sees the same
crops and masks) and the teacher's forward on them (backbone and heads, once per micro-batch,
served to every student: for a 7B teacher the largest cost of a distillation step). Each student
normalises the targets itself (Sinkhorn-Knopp at its own teacher temperature) and has its own
engine, optimizer, EMA teacher, schedules, metrics and RNG stream (drop-path, RoPE jitter), so
each student's run is the run its config would give alone, step for step (tested bit for bit).

Two layouts. By default every rank holds every student and runs them one after the other on
its batch: the same FLOPs as the official layout (the teacher once per image, each student once
per image), no exchange between ranks and no split of the GPUs between students to balance, at
the memory cost of holding all students (and their ZeRO-partitioned optimizer states) on every
rank. The teacher's outputs of a step's micro-batches are held until every student has taken them
(gradient accumulation: all of them). With `distillation.student_ranks` each student trains on its
own ranks, as the official MultiDistillationMetaArch does (codistill_ranks.py): a rank holds one
student, the teacher's forward is spread over all ranks and its outputs are sent to the students.

Checkpoints are written together (the same iterations); `train.resume=auto` continues every
student from the latest iteration they all have. A stop signal checkpoints every student; so does
a student stopping on non-finite steps (train.max_consecutive_nan), which stops the run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from fastdino import dist as fdist
from fastdino.checkpoint import checkpoint_dirs, checkpoint_problem, rng_state, set_rng_state
from fastdino.config import Config, ConfigError, merge_mapping, resolve_preset

logger = logging.getLogger("fastdino")

# dotted keys (or prefixes ending in ".") a student's yaml may set; everything else is the run's:
# the data, crops and masks (one loader), the teacher, the schedule length, checkpoints, seeds
STUDENT_KEYS = (
    "model.", "dino.", "ibot.loss_weight", "ibot.head.", "koleo.", "optim.", "schedules.",
    "kernels.", "deepspeed.zero_stage", "deepspeed.config_file", "train.log_every",
    "train.knn_every", "train.knn_data", "train.knn_val_data", "train.teacher_snapshot_every",
    "train.pca_images", "train.pca_resolution", "train.tensorboard",
)
# keys a student may set but must keep equal to the main student's: the main config was checked
# against the teacher on them (the losses compare the teacher's and the student's prototypes on
# the same patch grid)
TEACHER_BOUND = ("model.patch_size", "dino.head.n_prototypes", "ibot.head.n_prototypes")


def _dotted(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys += _dotted(v, key + ".") if isinstance(v, dict) and v else [key]
    return keys


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in STUDENT_KEYS)


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def student_configs(cfg: Config) -> list[tuple[str, Config]]:
    """(name, config) of every student: ("main", cfg) first, then one per distillation.students
    entry, each with its own train.output_dir and no students of its own."""
    out: list[tuple[str, Config]] = [("main", cfg)]
    root = Path(cfg.train.output_dir)
    for spec in cfg.distillation.students:
        path = resolve_preset(spec, "distillation.students")
        name = path.stem
        if name in (n for n, _ in out):
            raise ConfigError(f"distillation.students: two students are named {name!r} (the "
                              "yaml file's stem names a student's folder): rename one")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a student's yaml holds a mapping of sections, got "
                              f"{data!r}")
        shared = [k for k in _dotted(data) if not _allowed(k)]
        if shared:
            raise ConfigError(
                f"{path}: {', '.join(shared)} is shared by all students of a co-distillation run "
                "(set it in the main config); a student's yaml may set only "
                + ", ".join(a + ("*" if a.endswith(".") else "") for a in STUDENT_KEYS))
        scfg = copy.deepcopy(cfg)
        merge_mapping(scfg, data)
        scfg.distillation.students = scfg.distillation.student_ranks = ()
        scfg.train.output_dir = str(root / "students" / name)
        scfg.train.wandb_project = None  # one W&B run per process: the main student's
        scfg.validate()
        for key in TEACHER_BOUND:
            if _get(scfg, key) != _get(cfg, key):
                raise ConfigError(f"{path}: {key}={_get(scfg, key)} but the teacher (and the main "
                                  f"student) have {_get(cfg, key)}: every student must match the "
                                  "teacher there")
        out.append((name, scfg))
    return out


def _iterations(ckpt_dir: Path, damaged: list[str]) -> set[int]:
    """The iterations of the complete checkpoints in `ckpt_dir` (checkpoint.checkpoint_problem);
    the incomplete ones (a crash while one was written) are appended to `damaged`, described."""
    whole = set()
    for it, path in checkpoint_dirs(ckpt_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            whole.add(it)
        else:
            damaged.append(f"{path} ({problem})")
    return whole


def common_resume(students: list[tuple[str, Config]]) -> list[Path | None]:
    """train.resume=auto for all: the checkpoint of each student at the latest iteration that
    every student has a complete one of; None for all when no student has any (a fresh start).
    Incomplete checkpoints are passed over with a warning; only incomplete ones: an error, as a
    single run's resume (starting over would replace them)."""
    resume = students[0][1].train.resume
    fresh: list[Path | None] = [None] * len(students)
    if resume == "none":
        return fresh
    if resume != "auto":
        raise ConfigError(f"train.resume={resume!r}: a co-distillation run resumes with auto (the "
                          "latest iteration every student has) or none")
    damaged: list[str] = []
    have = {name: _iterations(Path(c.train.output_dir) / "checkpoints", damaged)
            for name, c in students}
    if not any(have.values()):
        if damaged:
            raise ConfigError(f"train.resume=auto: no complete checkpoint to resume from "
                              f"({len(damaged)} incomplete: {damaged[-1]}); train.resume=none "
                              "starts over and replaces them")
        return fresh
    common = set.intersection(*have.values())
    if not common:
        raise ConfigError(
            "train.resume=auto: the students have no checkpoint of a common iteration ("
            + "; ".join(f"{n}: {sorted(its) or 'none'}" for n, its in have.items())
            + "): remove the students' checkpoints to start over, or train.resume=none")
    it = max(common)
    if damaged:
        logger.warning("incomplete checkpoints passed over: %s; the students resume from "
                       "iteration %d", "; ".join(damaged), it)
    return [Path(c.train.output_dir) / "checkpoints" / f"iter_{it:07d}" for _, c in students]


class SharedTeacher(nn.Module):
    """The frozen distillation teacher with its outputs kept for the students: `teacher_forward`
    on the same (global_crops, mask_indices) tensors returns the first call's result. Holds the
    last `capacity` micro-batches' outputs (a step's gradient accumulation); `clear` after the
    step. `forwards` counts the real forwards."""

    def __init__(self, teacher: nn.Module, capacity: int):
        super().__init__()
        self.teacher, self.capacity, self.forwards = teacher, capacity, 0
        self._cache: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor, mask_indices: torch.Tensor) -> dict:
        for crops, idx, out in self._cache:  # identity: the very tensors of the shared batch
            if crops is global_crops and idx is mask_indices:
                return out
        out = self.teacher.teacher_forward(global_crops, mask_indices)
        self.forwards += 1
        self.put(global_crops, mask_indices, out)
        return out

    def put(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, out: dict) -> None:
        """Keep `out` as the teacher's outputs on these tensors (computed elsewhere: the ranks
        layout's exchange, codistill_ranks.py)."""
        self._cache = [*self._cache, (global_crops, mask_indices, out)][-self.capacity:]

    def clear(self) -> None:
        self._cache = []


class RngStream:
    """A private copy of the global RNG states (python, numpy, torch, CUDA: what checkpoints
    save), made global while `active`, so that several trainers in one process each draw their
    own stream, as each would alone."""

    def __init__(self):
        self.state = rng_state()

    @contextlib.contextmanager
    def active(self):
        set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = rng_state()


class StepTimer:
    """The time of the enclosed student steps when `on`: CUDA events on a GPU (device time; read
    once, by `seconds`, which waits for them), wall time on the CPU; None when off."""

    def __init__(self, on: bool):
        self.on, self.total = on, 0.0
        self.cuda = on and torch.cuda.is_available()
        self.events: list = []

    def __enter__(self):
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        elif self.on:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()
        elif self.on:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float | None:
        if not self.on:
            return None
        if self.cuda:
            self.events[-1].synchronize()
            return sum(a.elapsed_time(b) for a, b in zip(self.events[::2], self.events[1::2],
                                                         strict=True)) / 1000
        return self.total


def balance_report(names: list[str], sizes: list[int], seconds: list[float],
                   tolerance: float = 0.1) -> str | None:
    """A log line when the students' step times on their own ranks differ by more than
    `tolerance`: every step waits for the slowest student (the teacher outputs' exchange), so the
    others idle. Suggests rank counts in proportion to each student's work (time x ranks); they
    must still split the global batch evenly (codistill_ranks.check_layout)."""
    slow = max(seconds)
    if slow <= 0 or min(seconds) >= slow * (1 - tolerance):
        return None
    world, work = sum(sizes), [t * n for t, n in zip(seconds, sizes, strict=True)]
    ideal = [world * w / sum(work) for w in work]
    suggest = [max(1, int(x)) for x in ideal]
    for k in sorted(range(len(ideal)), key=lambda k: int(ideal[k]) - ideal[k]):
        if sum(suggest) >= world:
            break
        suggest[k] += 1
    while sum(suggest) > world:  # the max(1, .) floors overshot: take from the largest
        suggest[suggest.index(max(suggest))] -= 1
    times = ", ".join(f"{n} {t:.3f} s on {r} rank{'s' * (r > 1)}"
                      for n, t, r in zip(names, seconds, sizes, strict=True))
    idle = 1 - sum(work) / (slow * world)
    advice = (f"in proportion to the work: about {suggest}" if suggest != sizes else
              f"the counts already follow the work as closely as {world} ranks allow")
    return (f"co-distillation step times: {times}; each step waits for the slowest "
            f"({names[seconds.index(slow)]}): {100 * idle:.0f}% of the ranks' time idles. "
            f"distillation.student_ranks={sizes}: {advice}")


class CoDistillation:
    """Several Trainers over one loader and one teacher forward (module docstring); `train()`
    and `stopped_by` as a Trainer's. With `distillation.student_ranks` this rank trains one of
    them, on its own ranks (codistill_ranks.py); without, every student."""

    def __init__(self, cfg: Config, timer=None):
        from fastdino.codistill_ranks import TeacherExchange, check_layout
        from fastdino.distillation import build_distillation_teacher
        from fastdino.parallel import init_distributed, resolve_precision
        from fastdino.train import Trainer

        students = student_configs(cfg)
        resume = common_resume(students)
        info = init_distributed(cfg.deepspeed.timeout_minutes)
        self.cfg, self.names = cfg, [n for n, _ in students]
        self.teacher = SharedTeacher(build_distillation_teacher(cfg, info.device),
                                     cfg.deepspeed.gradient_accumulation_steps)
        here = list(range(len(students)))  # the students this rank trains
        self.exchange, sizes = None, list(cfg.distillation.student_ranks)
        if sizes:
            batch = check_layout(students, sizes, cfg.data.batch_size_per_gpu, info.world_size)
            self.world_rank, self.world_size = info.rank, info.world_size
            self.index = fdist.split(sizes)  # from here on fdist works over this student's ranks
            here = [self.index]
            name, scfg = students[self.index]
            scfg = copy.deepcopy(scfg)  # alone on its n ranks at G / n images per rank
            scfg.data.batch_size_per_gpu = batch[self.index]
            scfg.distillation.students, scfg.distillation.student_ranks = (), ()
            students[self.index] = (name, scfg)
            amp = resolve_precision(cfg, info.device) == torch.bfloat16
            self.exchange = TeacherExchange(self.teacher, sizes, cfg.data.batch_size_per_gpu,
                                            amp)
            logger.info("co-distillation: student %s on ranks %d-%d of %d, %d images per rank "
                        "per micro-batch", name, sum(sizes[:self.index]),
                        sum(sizes[:self.index + 1]) - 1, info.world_size, batch[self.index])
        self.trainers, self.streams, self._balance_advice = [], [], None
        for k in here:
            name, scfg = students[k]
            run_cfg = cfg if k == 0 and scfg is not cfg else None  # the run's config.yaml
            try:
                self.trainers.append(Trainer(scfg, timer, distillation_teacher=self.teacher,
                                             name=name, resume_from=resume[k],
                                             run_config=run_cfg))
            except (ConfigError, FileNotFoundError, ValueError) as e:
                if k == 0:
                    raise
                # a student inherits the main config's keys its yaml does not set (e.g.
                # model.pretrained_weights): which student, and where to change it
                yaml_file = cfg.distillation.students[k - 1]
                raise type(e)(f"student {name} ({yaml_file}; keys it does not set are the main "
                              f"config's): {e}") from e
            self.streams.append(RngStream())  # its stream as seeded by its own __init__
        self.local = [self.names[k] for k in here]
        starts = {(t.start_iteration, t.start_micro_batch) for t in self.trainers}
        if len(starts) != 1:  # common_resume chose one iteration: a checkpoint disagrees
            raise RuntimeError(f"co-distillation students resumed at different positions "
                               f"{sorted(starts)} (iteration, micro-batch)")
        logger.info("co-distillation: %d students (%s) share the batches and the teacher's "
                    "forward", len(self.names), ", ".join(self.names))

    @property
    def stopped_by(self) -> str | None:
        """The signal that ended train() early (the students stop together), as a Trainer's."""
        return self.trainers[0].stopped_by

    def train(self) -> list[list[dict]]:
        """The metrics history of every student this rank trains, in student order."""
        from fastdino.stop import StopOnSignal

        lead, pairs = self.trainers[0], list(zip(self.trainers, self.streams, strict=True))
        loader = self._build_loader(lead)
        for tr, stream in pairs:
            with stream.active():
                tr.open_run(loader.num_images)
        paths: list[Path | None] = [None] * len(pairs)
        try:
            with StopOnSignal(lead.cfg.train.stop_signals) as stop:
                for tr in self.trainers:
                    tr.stop = stop
                it = lead.start_iteration
                while it < lead.max_it and self.stopped_by is None:
                    waited = lead.data_wait_s
                    batches = self._batches(lead, loader)  # gas batches on the device
                    waited = lead.data_wait_s - waited
                    values = []
                    timer = StepTimer(self.exchange is not None and self._reports(it + 1))
                    for tr, stream in pairs:
                        with stream.active(), timer:
                            values.append(tr.step(it, batches))
                    self.teacher.clear()
                    it += 1
                    stop_agreed, failed = self._agree(values, timer.seconds())
                    for tr in self.trainers:
                        tr.micro_batch, tr.stop_agreed = lead.micro_batch, stop_agreed
                        if tr is not lead:
                            tr.data_wait_s += waited
                    if failed:
                        self._stop_nonfinite(it, values, failed)  # raises
                    for k, ((tr, stream), v) in enumerate(zip(pairs, values, strict=True)):
                        with stream.active():
                            paths[k] = tr.after_step(it, v) or paths[k]
        finally:
            for tr in self.trainers:
                tr.stop = None
                tr.metrics.close()
        histories = []
        for (tr, stream), path in zip(pairs, paths, strict=True):
            with stream.active():
                histories.append(tr.finish(path))
        return histories

    def _build_loader(self, lead):
        """The shared loader: the lead trainer's, or (students on their own ranks) one over all
        ranks at the run's per-rank batch, from the students' common position."""
        if self.exchange is None:
            return lead.build_loader()
        with fdist.world():
            return lead.build_loader(self.cfg, self.world_rank, self.world_size)

    def _batches(self, lead, loader) -> list:
        local = list(lead.micro_batches(loader))
        if self.exchange is None:
            return local
        with fdist.world():  # the teacher on this rank's batch; this student's slice back
            return [self.exchange(b) for b in local]

    def _reports(self, it: int) -> bool:
        """Whether iteration `it` (steps done) reports the students' step times (ranks layout:
        at the main config's log iterations)."""
        return it % self.cfg.train.log_every == 0 or it == self.trainers[0].max_it

    def _agree(self, values: list[dict | None],
               seconds: float | None = None) -> tuple[bool, list[str]]:
        """Whether the students stop after this step (a signal on any rank), and the students
        stopping the run on non-finite steps (train.max_consecutive_nan reached now). Students
        on their own ranks: with `seconds` (this rank's step time, on report iterations) every
        student's step time is gathered too and the balance logged (balance_report)."""
        stop = any(tr.stop_agreed for tr in self.trainers)  # same on every rank of a student
        failing = [v is None and tr.consecutive_nonfinite + 1 >= tr.cfg.train.max_consecutive_nan
                   for tr, v in zip(self.trainers, values, strict=True)]
        if self.exchange is None:  # every student here: the flags are already the run's
            return stop, [n for n, f in zip(self.names, failing, strict=True) if f]
        S = len(self.names)
        flags = torch.zeros(1 + 2 * S, dtype=torch.float64, device=self.trainers[0].info.device)
        flags[0], flags[1 + self.index] = float(stop), float(failing[0])
        flags[1 + S + self.index] = seconds or 0.0  # a student's slowest rank
        with fdist.world():  # the students on other ranks: one small reduction per step
            flags = fdist.all_reduce_max(flags).tolist()
            if seconds is not None and fdist.get_rank() == 0:
                line = balance_report(self.names, list(self.cfg.distillation.student_ranks),
                                      flags[1 + S:])
                advice = line and line[line.index("distillation.student_ranks="):]
                if line and advice != self._balance_advice:  # again when the advice changes
                    logger.info("%s", line)
                self._balance_advice = advice
        return flags[0] > 0, [n for n, f in zip(self.names, flags[1:1 + S], strict=True) if f > 0]

    def _stop_nonfinite(self, it: int, values: list[dict | None], failed: list[str]) -> None:
        """Students stop the run on non-finite steps: each saves its state of this iteration
        (all students together: checkpoints are collective), then the run stops with the first
        failing student's error (or, on ranks without one, an error naming them)."""
        from fastdino.stop import NonFiniteLossError

        errors, path = [], None
        for tr, stream, v, name in zip(self.trainers, self.streams, values, self.local,
                                       strict=True):
            with stream.active():
                if name not in failed:
                    path = tr.save(it)
                    continue
                try:
                    tr.after_step(it, v)  # saves the last good step, then raises
                except NonFiniteLossError as e:
                    errors.append(e)
        raise errors[0] if errors else NonFiniteLossError(
            f"[{self.local[0]}] stopped at iteration {it} with the co-distillation run (student "
            f"{', '.join(failed)} stopped on non-finite steps); its state is saved in {path}")
