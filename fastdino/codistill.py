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

How this differs from the official layout: there each student trains on its own subgroup of
ranks, the teacher's inference is sharded over all ranks and its outputs broadcast to the
subgroups. Here every rank holds every student and runs them one after the other on its batch:
the same FLOPs (the teacher once per image, each student once per image), no subgroup broadcast
and no split of the GPUs between students to balance, at the memory cost of holding all students
(and their ZeRO-partitioned optimizer states) on every rank. The teacher's outputs of a step's
micro-batches are held until every student has taken them (gradient accumulation: all of them).

Checkpoints are written together (the same iterations); `train.resume=auto` continues every
student from the latest iteration they all have. A stop signal checkpoints every student.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from fastdino.checkpoint import STATE_FILE, checkpoint_dirs, rng_state, set_rng_state
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
        scfg.distillation.students = ()
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


def _iterations(ckpt_dir: Path) -> set[int]:
    """The iterations of the complete checkpoints (trainer state written) in `ckpt_dir`."""
    return {it for it, p in checkpoint_dirs(ckpt_dir) if (p / STATE_FILE).is_file()}


def common_resume(students: list[tuple[str, Config]]) -> list[Path | None]:
    """train.resume=auto for all: the checkpoint of each student at the latest iteration that
    every student has one of; None for all when no student has any (a fresh start)."""
    resume = students[0][1].train.resume
    fresh: list[Path | None] = [None] * len(students)
    if resume == "none":
        return fresh
    if resume != "auto":
        raise ConfigError(f"train.resume={resume!r}: a co-distillation run resumes with auto (the "
                          "latest iteration every student has) or none")
    have = {name: _iterations(Path(c.train.output_dir) / "checkpoints") for name, c in students}
    if not any(have.values()):
        return fresh
    common = set.intersection(*have.values())
    if not common:
        raise ConfigError(
            "train.resume=auto: the students have no checkpoint of a common iteration ("
            + "; ".join(f"{n}: {sorted(its) or 'none'}" for n, its in have.items())
            + "): remove the students' checkpoints to start over, or train.resume=none")
    it = max(common)
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
        self._cache = [*self._cache, (global_crops, mask_indices, out)][-self.capacity:]
        return out

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


class CoDistillation:
    """Several Trainers over one loader and one teacher forward (module docstring); `train()`
    and `stopped_by` as a Trainer's."""

    def __init__(self, cfg: Config, timer=None):
        from fastdino.distillation import build_distillation_teacher
        from fastdino.parallel import init_distributed
        from fastdino.train import Trainer

        students = student_configs(cfg)
        resume = common_resume(students)
        info = init_distributed()
        self.teacher = SharedTeacher(build_distillation_teacher(cfg, info.device),
                                     cfg.deepspeed.gradient_accumulation_steps)
        self.names = [n for n, _ in students]
        self.trainers, self.streams = [], []
        for (name, scfg), path in zip(students, resume, strict=True):
            self.trainers.append(Trainer(scfg, timer, distillation_teacher=self.teacher,
                                         name=name, resume_from=path))
            self.streams.append(RngStream())  # its stream as seeded by its own __init__
        starts = {(t.start_iteration, t.start_micro_batch) for t in self.trainers}
        if len(starts) != 1:  # common_resume chose one iteration: a checkpoint disagrees
            raise RuntimeError(f"co-distillation students resumed at different positions "
                               f"{sorted(starts)} (iteration, micro-batch)")
        logger.info("co-distillation: %d students (%s) share the batches and the teacher's "
                    "forward", len(self.trainers), ", ".join(self.names))

    @property
    def stopped_by(self) -> str | None:
        """The signal that ended train() early (the students stop together), as a Trainer's."""
        return self.trainers[0].stopped_by

    def train(self) -> list[list[dict]]:
        """Every student's metrics history, in student order."""
        from fastdino.stop import StopOnSignal

        lead, pairs = self.trainers[0], list(zip(self.trainers, self.streams, strict=True))
        loader = lead.build_loader()
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
                    batches = list(lead.micro_batches(loader))  # gas batches on the device
                    waited = lead.data_wait_s - waited
                    values = []
                    for tr, stream in pairs:
                        with stream.active():
                            values.append(tr.step(it, batches))
                    self.teacher.clear()
                    it += 1
                    stop_agreed = any(tr.stop_agreed for tr in self.trainers)  # same on all ranks
                    for k, ((tr, stream), v) in enumerate(zip(pairs, values, strict=True)):
                        tr.micro_batch, tr.stop_agreed = lead.micro_batch, stop_agreed
                        if tr is not lead:
                            tr.data_wait_s += waited
                        with stream.active():
                            paths[k] = self._after_step(tr, it, v) or paths[k]
        finally:
            for tr in self.trainers:
                tr.stop = None
                tr.metrics.close()
        histories = []
        for (tr, stream), path in zip(pairs, paths, strict=True):
            with stream.active():
                histories.append(tr.finish(path))
        return histories

    def _after_step(self, tr, it: int, values: dict | None) -> Path | None:
        from fastdino.train import NonFiniteLossError

        try:
            return tr.after_step(it, values)
        except NonFiniteLossError:
            # this student stops the run: the others keep their state of this iteration too
            for other, stream in zip(self.trainers, self.streams, strict=True):
                if other is not tr:
                    with stream.active():
                        other.save(it)
            raise
