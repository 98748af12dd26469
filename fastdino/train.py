"""DINOv3 training: `deepspeed --num_gpus N fastdino/train.py --config configs/smoke.yaml [k=v ...]`
or `python fastdino/train.py ...` (one process, plain torch engine; see parallel.py).

The step (DESIGN.md "One training step"), in `Trainer.step`:
    schedules -> for each of the gas micro-batches (deepspeed.gradient_accumulation_steps):
        teacher forward (no grad) -> student forward -> DINO + iBOT + KoLeo + Gram -> backward
    -> per-module clip -> engine.step -> EMA (+ softmax centers) -> Gram refresh
`Trainer.train` adds around it: data, NaN/Inf guard, metrics and health warnings (health.py), kNN
probe, checkpoints, a graceful stop on SIGTERM / SIGUSR1 / Ctrl-C (stop.py: a checkpoint after the
current step, exit code 128 + the signal's number), and at the end the teacher backbone exported to
<output_dir>/teacher_backbone.{pth,safetensors}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a script: drop fastdino/ from sys.path (its profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse
import contextlib
import logging
import math
import os
import shutil
import time

import torch

# DeepSpeed's logger writes to stdout, from its import on (accelerator detection): stdout is
# --print-config's yaml. Its handler keeps the stream it finds here: its logs go to stderr,
# with fastdino's.
with contextlib.redirect_stdout(sys.stderr):
    from fastdino import dist as fdist
    from fastdino import rank_logging
    from fastdino.checkpoint import (
        STATE_FILE,
        CheckpointWriteError,
        load_checkpoint,
        resolve_resume,
        save_checkpoint,
        set_rng_state,
    )
    from fastdino.config import Config, ConfigError, config_changes, load_config, save_config
    from fastdino.data import build_train_loader
    from fastdino.data.collate import Batch
    from fastdino.export import backbone_targets, export_backbone
    from fastdino.health import HealthMonitor
    from fastdino.meta_arch import SSLMetaArch
    from fastdino.metrics import MAX_OVER_RANKS, MetricsLogger, peak_memory_gib
    from fastdino.parallel import CLIP_EPS, build_engine, init_distributed, shutdown_distributed
    from fastdino.param_groups import build_param_groups
    from fastdino.schedules import apply_to_param_groups, build_schedules, scaled_momenta
    from fastdino.stop import NonFiniteLossError, StopOnSignal, exit_code
    from fastdino.timing import NullTimer

logger = logging.getLogger("fastdino")


def same_checkpoint_on_every_rank(resume: Path | None) -> Path | None:
    """The checkpoint rank 0 resolved, on every rank. Each rank reads `latest` itself; on a shared
    filesystem with stale client caches (NFS attribute caching) one rank could read an older
    pointer and load another iteration than the others: a silently diverged run. Rank 0's choice
    is broadcast; a rank that cannot see that checkpoint stops, naming it."""
    chosen = fdist.broadcast_object(None if resume is None else str(resume))
    if chosen != (None if resume is None else str(resume)):
        logger.warning("rank %d resolved the checkpoint to %s, rank 0 to %s: using rank 0's",
                       fdist.get_rank(), resume, chosen, extra=rank_logging.EVERY_RANK)
    if chosen is not None and not (Path(chosen) / STATE_FILE).is_file():
        raise FileNotFoundError(f"rank {fdist.get_rank()} cannot read the checkpoint rank 0 "
                                f"resumes from, {chosen}: the checkpoint folder must be on a "
                                "filesystem every rank sees")
    return None if chosen is None else Path(chosen)


def check_rank_count(cfg: Config, world_size: int) -> None:
    """The config rules that only the rank count decides, before any work (the yaml check sees the
    per-rank batch only): distributed KoLeo splits the gathered batch into groups of
    koleo.group_size, so that batch must be a multiple of it. The high-res presets (8 images per
    GPU, groups of 16) stopped with a traceback at the first step on 1, 3, 5 or 7 GPUs."""
    k, B = cfg.koleo, cfg.data.batch_size_per_gpu
    gathered = B * world_size
    if k.distributed and k.loss_weight > 0 and gathered % k.group_size:
        fits = [g for g in range(max(2, B), gathered + 1, B) if gathered % g == 0]
        raise ConfigError(
            f"koleo.group_size = {k.group_size} does not divide the gathered batch of {gathered} "
            f"images (data.batch_size_per_gpu={B} x {world_size} ranks): allowed here are "
            f"{', '.join(map(str, fits)) or 'none (one image in all: koleo.loss_weight=0)'}, or "
            f"a rank count that makes {gathered // world_size} x ranks a multiple of "
            f"{k.group_size}")


class Trainer:
    def __init__(self, cfg: Config, timer=None, *, distillation_teacher=None,
                 name: str | None = None, resume_from: Path | None = None,
                 run_config: Config | None = None):
        """`distillation_teacher` / `name` / `resume_from` / `run_config`: a student of a
        co-distillation run (codistill.py): the frozen teacher it shares with the other students,
        its name in log lines, the checkpoint all students resume from (instead of
        train.resume's), the config.yaml to write when it is not `cfg` (the run's, for the main
        student of a run that gives it its own per-rank batch)."""
        self.cfg, self.timer = cfg, timer or NullTimer()
        self.log_prefix = f"[{name}] " if name else ""
        self.info = init_distributed(cfg.deepspeed.timeout_minutes)
        self.out = Path(cfg.train.output_dir)
        kept, fresh = None, False
        if fdist.is_main_process():  # the resolved config first, before anything derived
            self.out.mkdir(parents=True, exist_ok=True)
            fresh = not (self.out / "config.yaml").exists()
            kept = _keep_previous_config(run_config or cfg, self.out / "config.yaml")
            save_config(run_config or cfg, self.out / "config.yaml")
        try:
            self._build(cfg, distillation_teacher, resume_from)
        except BaseException:
            # a start that fails (a resume whose checkpoint does not fit the changed config)
            # leaves the run's config.yaml as it was: export and eval read the run by it; a
            # first start leaves none (the next start would keep it as a previous config)
            if kept is not None:
                os.replace(kept, self.out / "config.yaml")
                logger.error("the run did not start: %s restored from %s",
                             self.out / "config.yaml", kept.name)
            elif fresh:
                (self.out / "config.yaml").unlink(missing_ok=True)
            raise

    def _build(self, cfg: Config, distillation_teacher, resume_from: Path | None) -> None:
        """__init__ after the config is written: the model, engine, schedules and resume."""
        check_rank_count(cfg, fdist.get_world_size())
        self.ckpt_dir = self.out / "checkpoints"
        # before the model and engine are built: a wrong train.resume path stops at once
        resume = resume_from or resolve_resume(cfg.train.resume, self.ckpt_dir)
        resume = same_checkpoint_on_every_rank(resume)
        self.pca_inputs = _pca_inputs(cfg.train.pca_images)  # checked before any work
        self.knn_samples = _knn_samples(cfg)  # listed and checked before any work, too
        from fastdino.loggers import build_sinks, check_sinks_available

        check_sinks_available(cfg)  # every rank: a missing TensorBoard / W&B stops all alike
        self.sinks = build_sinks(cfg, self.out) if fdist.is_main_process() else []
        self.arch = SSLMetaArch(cfg, self.info.device, distillation_teacher)
        groups = build_param_groups(self.arch.student, self.arch.student.backbone.n_blocks,
                                    cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.engine = build_engine(self.arch.student, groups, cfg, self.info)
        self.arch.attach(self.engine)
        # drop-path / RoPE jitter stream per rank, seeded after DeepSpeed's setup (which may draw)
        torch.manual_seed(cfg.train.seed + 1 + self.info.rank)
        B, self.gas = cfg.data.batch_size_per_gpu, cfg.deepspeed.gradient_accumulation_steps
        self.global_batch = B * self.info.world_size * self.gas
        if self.gas > 1:
            logger.info("gradient accumulation: %d micro-batches of %d images per rank per "
                        "optimizer step, global batch %d", self.gas, B, self.global_batch)
        self.sched = build_schedules(cfg, self.global_batch)
        if cfg.schedules.momentum_reference_batch is not None:
            s = cfg.schedules
            m0, m1 = scaled_momenta(cfg, self.global_batch)
            logger.info("EMA scaling rule: global batch %d vs %d, teacher momentum %g -> %.6g, "
                        "final %g -> %.6g", self.global_batch, s.momentum_reference_batch,
                        s.momentum_teacher, m0, s.final_momentum_teacher, m1)
        self.total = cfg.train.total_iterations
        self.max_it = min(self.total, cfg.train.max_iterations or self.total)
        # start_iteration: optimizer steps done; start_micro_batch: this rank's loader position
        # (micro-batches consumed, = steps x gas); consecutive_nonfinite: skipped steps in a row
        self.start_iteration = self.start_micro_batch = self.consecutive_nonfinite = 0
        self.resume_rng, self._gram_state = None, None
        self.resume_num_images = None  # the images the checkpoint's data position counts in
        self.num_images = None
        self.resume_path = resume  # (finish: a missing export is redone from it)
        if resume is not None:
            try:
                st = load_checkpoint(resume, self.engine)
                self.arch.load_from_checkpoint(st)
            except (RuntimeError, ValueError) as e:
                unfit = _unfit_checkpoint(e, resume)
                if unfit is None:
                    raise
                raise unfit from e
            self.start_iteration, self.resume_rng = st["iteration"], st["rng"]
            self.start_micro_batch = _step_aligned(st["data_iteration"], self.gas, resume)
            self.consecutive_nonfinite = st.get("consecutive_nonfinite", 0)
            self.resume_num_images = st.get("num_images")  # (None: an older checkpoint)
            same_ranks = st.get("world_size", self.info.world_size) == self.info.world_size
            same_batch = st.get("micro_batch_size") in (None, cfg.data.batch_size_per_gpu)
            # (another rank count or per-rank batch: load_checkpoint remapped the data position
            # and logged it)
            same_gas = self.start_micro_batch == self.start_iteration * self.gas
            if not (same_ranks and same_batch and same_gas) \
                    and cfg.data.homogeneous_root is not None:
                # the remap keeps the global image count of one stream; the mixed loader's two
                # sources advance by which steps drew them (data/mixing.py), and the remapped
                # step index has another history of draws
                logger.warning("checkpoint %s: with data.homogeneous_root the remapped data "
                               "position is approximate: each source continues near, not at, "
                               "its position (off by about batch x ranks x sqrt(ratio x steps) "
                               "images, seen again or skipped; the steps that drew each source "
                               "depend on the rank count, batch and gradient accumulation); "
                               "resume with the writer's ranks, data.batch_size_per_gpu and "
                               "deepspeed.gradient_accumulation_steps to continue it exactly",
                               resume)
            if same_ranks and same_batch and not same_gas:
                logger.warning("checkpoint %s: %d optimizer steps over %d micro-batches, this run "
                               "accumulates %d per step: the data continues at micro-batch %d "
                               "(not bit-exactly the run that wrote it)", resume,
                               self.start_iteration, self.start_micro_batch, self.gas,
                               self.start_micro_batch)
            logger.info("%sresumed from %s at iteration %d", self.log_prefix, resume,
                        self.start_iteration)
        self.micro_batch = self.start_micro_batch
        self.data_wait_s = 0.0  # host time blocked on the loader since the last log line
        # stop.py: this rank's signal (while train() runs), and what the ranks agreed in the
        # last step's reduction; stopped_by: the signal that ended train() early, if one did
        self.stop: StopOnSignal | None = None
        self.stop_agreed = self.stop_on_main = False
        self.stopped_by: str | None = None

    # ---------------------------------------------------------------------------------- the step
    def step(self, it: int, batches) -> dict | None:
        """Optimizer step `it` on `batches`: the `gas` micro-batches of this rank (a `Batch` when
        gas = 1). Returns the logged values, or None if the step was skipped (non-finite loss or
        gradients: parameters, teachers and centers unchanged).

        Gradient accumulation (gas = deepspeed.gradient_accumulation_steps; USERS.md §2, §13):
        one iteration = one optimizer step = gas micro-batches of B images per rank, global batch
        B·world·gas (the lr scaling's batch). The schedules are read once, at `it`.
        - per micro-batch: teacher forward and its normalisation (Sinkhorn-Knopp over that
          micro-batch, or softmax centering with the center of the previous step: the center
          does not move inside a step), student forward, losses (KoLeo within the micro-batch,
          as at that per-GPU batch), backward of loss/gas (DeepSpeed's engine.backward divides
          by gas, scale_wrt_gas; the torch engine does the same), gradients accumulate;
        - once per step: per-module clip and the finiteness check of every micro-batch's loss
          (all ranks: a non-finite micro-batch anywhere discards the whole step), optimizer
          step, EMA teacher, the softmax centers (EMA of the mean over all micro-batches' teacher
          outputs), Gram-teacher load / refresh, logged values averaged over micro-batches.
        With the official v3 settings (Sinkhorn-Knopp, per-rank KoLeo) gas micro-batches are not
        one big batch: SK and KoLeo see B images at a time, as on a gas-times-smaller machine."""
        cfg, arch, engine, timer = self.cfg, self.arch, self.engine, self.timer
        gas = self.gas
        if isinstance(batches, Batch):
            batches = [batches]
        if isinstance(batches, (list, tuple)) and len(batches) != gas:  # before any work
            raise ValueError(f"step {it}: {len(batches)} micro-batches given, deepspeed."
                             f"gradient_accumulation_steps={gas} expected")
        v = self.sched.at(it)
        apply_to_param_groups(engine.param_groups, v)
        self._log_gram_state(it, v)
        losses, sums, n = [], {}, 0
        for batch in batches:
            if n == gas:
                raise ValueError(f"step {it}: more than deepspeed.gradient_accumulation_steps="
                                 f"{gas} micro-batches given")
            engine.set_accumulation_boundary(n == gas - 1)
            with timer("teacher_forward"):
                t = arch.teacher_output(batch, v.teacher_temp, need_gram=v.gram_weight > 0)
            with timer("student_forward"):
                s = engine(batch.global_crops, batch.local_crops, arch.student_masks(batch),
                           batch.mask_indices)
            with timer("losses"):
                loss, terms = arch.compute_losses(s, t, batch, v)
            with timer("backward"):
                # no host read of the loss here: its finiteness (all ranks) comes back with the
                # clip norms, the step's single sync; a non-finite step is discarded below
                engine.backward(loss)  # gradients of loss / gas, accumulated
            del s, t
            losses.append(loss.detach())
            for k, x in terms.items():  # tensors summed on device; schedule floats kept
                sums[k] = x if k not in sums else (sums[k] + x if torch.is_tensor(x) else x)
            n += 1
        if n != gas:
            raise ValueError(f"step {it}: {n} micro-batches given, deepspeed."
                             f"gradient_accumulation_steps={gas} expected")
        # a stop signal on any rank rides on the same reduction (stop.py), and whether rank 0
        # had one (then its line names the signal, and the other ranks need not say theirs)
        mine = self.stop is not None and self.stop.requested is not None
        flags = {"stop": mine, "stop_on_main": mine and fdist.is_main_process()}
        norms = engine.clip_grad_norms(cfg.optim.clip_grad, finite_check=torch.stack(losses),
                                       flags=flags)
        self.stop_agreed, self.stop_on_main = flags["stop"], flags["stop_on_main"]
        ok = all(math.isfinite(x) for x in norms.values())
        if ok:
            with timer("optimizer"):
                engine.step()
        else:
            engine.discard_step()  # parameters unchanged, gradients cleared
        with timer("ema"):
            if ok:
                arch.update_teacher(v.momentum)
                arch.update_centers()  # softmax centering; no-op under Sinkhorn-Knopp
            else:
                arch.discard_center_updates()
            # the Gram load / refresh is due by iteration (official train.py), skipped or not
            arch.update_gram_teacher(it)
        if not ok:
            return None
        terms = sums if gas == 1 else {k: x / gas if torch.is_tensor(x) else x
                                       for k, x in sums.items()}
        clip = cfg.optim.clip_grad  # the norms are pre-clip; what the optimizer used is logged too
        return {"lr": v.lr, "wd": v.wd, "mom": v.momentum, "last_layer_lr": v.last_layer_lr,
                "backbone_lr": v.backbone_lr,
                "teacher_temp": v.teacher_temp, **terms,
                **{f"{name}_grad_norm": x for name, x in norms.items()},
                **{f"{name}_grad_norm_clipped": x * min(1.0, clip / (x + CLIP_EPS)) if clip > 0
                   else x for name, x in norms.items()}}

    def _log_gram_state(self, it: int, v) -> None:
        """Say once, and again when it changes, why gram_loss is logged as 0."""
        g = self.cfg.gram
        if not g.use:
            return
        if not self.arch.gram_ready:
            # (config.validate: without gram.ckpt / ema_teacher, it_load_ema_teacher >= 0)
            state = ("gram_loss is logged as 0: the Gram teacher is not loaded yet (copied "
                     "from the EMA teacher after iteration "
                     f"{g.it_load_ema_teacher - 1}, gram.it_load_ema_teacher)")
        elif v.gram_weight == 0:
            state = (f"gram_loss is logged as 0: its weight is 0 at iteration {it} (gram."
                     f"start_iteration={g.start_iteration}); the Gram teacher does not run")
        else:
            state = "gram_loss enters the objective"
        if state != self._gram_state:
            logger.info("%s", state)
            self._gram_state = state

    # -------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict]:
        loader = self.build_loader()
        self.open_run(loader.num_images)
        path = None
        try:
            with StopOnSignal(self.cfg.train.stop_signals) as self.stop:
                it = self.start_iteration
                while it < self.max_it and self.stopped_by is None:
                    values = self.step(it, self.micro_batches(loader))
                    it += 1
                    path = self.after_step(it, values) or path
        finally:
            self.stop = None
            self.metrics.close()  # flush the TensorBoard / W&B sinks, also on an error
        return self.finish(path)

    # ---------------------------------------------------------------------------------- the run
    # train() = build_loader, open_run, then step + after_step per iteration, then finish; a
    # co-distillation run (codistill.py) drives several trainers over one loader the same way.
    def build_loader(self, cfg: Config | None = None, rank: int | None = None,
                     world_size: int | None = None):
        """This rank's loader from the resume position. Built in a forked torch RNG: whatever it
        draws does not shift the training stream (drop-path, RoPE jitter), which is then the same
        whether this trainer owns the loader or shares another's (co-distillation). `cfg`,
        `rank`, `world_size`: another loader than this trainer's own (co-distillation with the
        students on their own ranks: the run's, over all ranks)."""
        info = self.info
        cfg = cfg or self.cfg
        rank = info.rank if rank is None else rank
        world_size = info.world_size if world_size is None else world_size
        with torch.random.fork_rng(devices=[]):
            try:
                loader = build_train_loader(cfg, rank, world_size, self.start_micro_batch)
            except (FileNotFoundError, NotADirectoryError, ValueError) as e:
                # data.root / data.file_list: missing, not a folder, a bad pattern, no images
                raise ConfigError(str(e)) from e
        self.micro_batch = self.start_micro_batch  # loader position, saved as data_iteration
        return loader

    def open_run(self, num_images: int) -> None:
        """Metrics, health monitor and history of the run about to start; the resumed RNG last."""
        cfg = self.cfg
        self.num_images = num_images
        if self.resume_num_images not in (None, num_images):
            # the data position is an index into the sorted listing: over another listing (files
            # added or removed, a new image type listed) it names other images
            logger.warning("%sthe checkpoint's data position counts %d images, the data now lists "
                           "%d: the run continues at the same position in the new listing (the "
                           "current pass may repeat or miss some images; the passes after it are "
                           "whole)", self.log_prefix, self.resume_num_images, num_images)
        logger.info("%s%s", self.log_prefix, schedule_in_data_passes(
            cfg, self.max_it, self.global_batch, num_images))
        self.metrics = MetricsLogger(self.out, self.max_it, self.start_iteration,
                                     self.global_batch, fdist.is_main_process(),
                                     printer=self._print, sinks=self.sinks)
        self.health = HealthMonitor.from_config(cfg)
        self.history: list[dict] = []
        if self.resume_rng is not None:
            set_rng_state(self.resume_rng)

    def finish(self, path: Path | None) -> list[dict]:
        """After the last step: the teacher backbone exported (official keys, fastdino export),
        unless the run stopped early (it comes at the end of the resumed run)."""
        if self.stopped_by is not None:
            return self.history
        out = self.out / "teacher_backbone"
        if self.start_iteration >= self.max_it:
            logger.info("%snothing to do: the checkpoint is at iteration %d, train.max_iterations "
                        "/ the schedule end is %d", self.log_prefix, self.start_iteration,
                        self.max_it)
            # the run that reached it was stopped or failed during its export: export it now
            if all(t.is_file() for t in backbone_targets(out)):
                return self.history
            path = self.resume_path
        if fdist.is_main_process():
            for f in self._export(path, out):
                logger.info("%sexported the teacher backbone to %s", self.log_prefix, f)
        return self.history

    def _export(self, ckpt: Path, out: Path) -> list[Path]:
        """The teacher backbone of checkpoint `ckpt` exported to `out` (.pth, .safetensors), each
        file whole or absent: written in a hidden folder beside it, then renamed into place (a
        stop or a crash half-way leaves no truncated file that a rerun would take as the export;
        the rerun, "nothing to do", exports it again). A failure is one CheckpointWriteError."""
        partial = out.parent / ".teacher_backbone.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)  # an earlier export cut short
            written = export_backbone(ckpt, partial / out.name)
            final = [out.parent / f.name for f in written]
            for f, g in zip(written, final, strict=True):
                os.replace(f, g)
            shutil.rmtree(partial, ignore_errors=True)
            return final
        except Exception as e:  # noqa: BLE001 - torch.save's disk-full error is a RuntimeError
            shutil.rmtree(partial, ignore_errors=True)  # (what may have filled the disk)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointWriteError(
                f"the teacher backbone could not be exported to {out}.*: {type(e).__name__}: "
                f"{first}; the checkpoint {ckpt} is complete: the same command exports it again "
                f"(or fastdino export --run {ckpt} --out {out})") from e

    def after_step(self, it: int, values: dict | None) -> Path | None:
        """Everything after optimizer step `it` - 1 (`it` steps done): the non-finite count,
        metrics, health, kNN probe, teacher snapshot, checkpoint and the agreed stop (which sets
        `stopped_by`). Returns the checkpoint written, if one was."""
        cfg, path = self.cfg, None
        if values is None:
            self.consecutive_nonfinite += 1
            bad = self.consecutive_nonfinite  # persisted in checkpoints: survives a resume
            logger.warning("%siteration %d: non-finite loss or gradients, step skipped (%d in a "
                           "row)", self.log_prefix, it - 1, bad)
            if bad >= cfg.train.max_consecutive_nan:
                path = self.save(it)
                raise NonFiniteLossError(
                    f"{self.log_prefix}{bad} consecutive non-finite steps (iterations "
                    f"{it - bad}..{it - 1}, train.max_consecutive_nan="
                    f"{cfg.train.max_consecutive_nan}): stopping. The parameters of the last good "
                    f"step are saved in {path}. Try a lower optim.lr, a lower teacher "
                    "temperature, or check the data.")
        else:
            self.consecutive_nonfinite = 0
        knn = {} if self.stop_agreed else self._knn(it)  # collective; {} unless due
        if values is not None and (knn or it % cfg.train.log_every == 0 or it == self.max_it):
            values["data_wait_s"] = self.data_wait_s  # averaged over ranks below
            self.data_wait_s = 0.0
            peak = peak_memory_gib(self.info.device)  # GPU: the peak since the last line
            if peak is not None:
                values["max_mem_gib"] = peak
            self.history.append(self.metrics.log(it, {**self._average(values), **knn}))
            if fdist.is_main_process():  # fastdino/health.py: collapse, stalls, spikes
                for f in self.health.update(it, self.history[-1]):
                    (logger.info if f.cleared else logger.warning)("%s%s", self.log_prefix,
                                                                   f.message)
        every = cfg.train.teacher_snapshot_every
        if every and it % every == 0 and fdist.is_main_process():
            self._teacher_snapshot(it)
        if it % cfg.train.checkpoint_every == 0 or it == self.max_it or self.stop_agreed:
            path = self.save(it)
            if not self.stop_agreed:  # a stop must fit the launcher's grace period
                self._pca(it)
        if self.stop_agreed and it < self.max_it:
            self.stopped_by = (self.stop.requested if self.stop is not None else None) or "SIGTERM"
            who = (self.stop.requested if self.stop is not None and self.stop.requested
                   else "a stop signal on another rank")
            # rank 0 always says it; a rank that had the signal rank 0 did not have says which
            # one it was (under Slurm every rank has it: one line, not one per rank)
            own = self.stop is not None and self.stop.requested and not self.stop_on_main
            logger.warning("%sstopped by %s at iteration %d of %d: checkpoint %s; the same "
                           "command continues from it (train.resume=auto)", self.log_prefix, who,
                           it, self.max_it, path, extra=rank_logging.EVERY_RANK if own else None)
        return path

    def _print(self, line: str) -> None:
        logger.info("%s%s", self.log_prefix, line)

    def micro_batches(self, loader):
        """The next `gas` batches of `loader`, moved to the device one at a time (lazily: the
        step consumes them one after the other)."""
        for _ in range(self.gas):
            # host time waiting for the batch, unsynchronised: the host blocks here only when the
            # loader is behind (it runs ahead of the GPU otherwise), so this is the data stall
            t0 = time.perf_counter()
            with self.timer("data_wait"), torch.random.fork_rng(devices=[]):
                batch = next(loader).to(self.info.device)  # (fork: as in build_loader)
            self.data_wait_s += time.perf_counter() - t0
            self.micro_batch += 1
            yield batch

    def save(self, it: int) -> Path:
        state = {**self.arch.state_for_checkpoint(), "data_iteration": self.micro_batch,
                 "consecutive_nonfinite": self.consecutive_nonfinite,
                 "num_images": self.num_images}
        return save_checkpoint(self.ckpt_dir, it, self.engine, state,
                               self.cfg.train.keep_checkpoints)

    def _teacher_snapshot(self, it: int) -> Path:
        """<output_dir>/eval/training_<it>/teacher_checkpoint.pth, the official eval snapshot
        layout ({"teacher": EMA teacher with backbone. / dino_head. / ibot_head. keys}), written
        atomically (rank 0: the teacher is replicated)."""
        out = self.out / "eval" / f"training_{it}"
        tmp = out / "teacher_checkpoint.pth.tmp"
        try:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"teacher": self.arch.teacher.state_dict()}, tmp)
            os.replace(tmp, out / "teacher_checkpoint.pth")
        except Exception as e:  # noqa: BLE001 - torch.save's disk-full error is a RuntimeError
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # (what may have filled the disk)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointWriteError(
                f"teacher snapshot {out / 'teacher_checkpoint.pth'} could not be written: "
                f"{type(e).__name__}: {first}; {_resume_point(self)}") from e
        logger.info("teacher snapshot %s written", out / "teacher_checkpoint.pth")
        return out / "teacher_checkpoint.pth"

    def _pca(self, it: int) -> None:
        """train.pca_images: the teacher's PCA and token-norm maps of iteration `it` (rank 0). A
        failure is logged, never fatal: it is a picture, not the run."""
        if not self.pca_inputs or not fdist.is_main_process():
            return
        from fastdino.eval.pca import write_pca_images

        backbone = self.arch.teacher.backbone
        was_training = backbone.training
        out = self.out / "pca" / f"iter_{it:07d}"
        try:
            write_pca_images(backbone, self.pca_inputs, out, shared=True, norms=True,
                             resolution=self.cfg.train.pca_resolution,
                             white_level=self.cfg.data.white_level)
            logger.info("PCA maps of the teacher written to %s", out)
        except Exception as e:  # noqa: BLE001 - e.g. an image removed since the start
            logger.warning("PCA maps at iteration %d failed: %s: %s", it, type(e).__name__, e)
        finally:
            backbone.train(was_training)

    def _average(self, values: dict) -> dict:
        keys = sorted(values)
        # one device-side stack and one read (the all-reduce's), not a host sync per logged term
        vec = torch.stack([torch.as_tensor(values[k], device=self.info.device).to(torch.float64)
                           .reshape(()) for k in keys])
        peaks = [i for i, k in enumerate(keys) if k in MAX_OVER_RANKS]
        if peaks:  # the largest rank's peak (the one that runs out of memory), not the mean
            top = fdist.all_reduce_max(vec[peaks].clone())
        vec = fdist.all_reduce_mean(vec)
        if peaks:
            vec[peaks] = top
        out = dict(zip(keys, vec.tolist(), strict=True))
        out.update(local_batch_size=self.cfg.data.batch_size_per_gpu,
                   global_batch_size=self.global_batch)
        return out

    def _knn(self, it: int) -> dict:
        cfg = self.cfg
        if not (cfg.train.knn_every and cfg.train.knn_data and it % cfg.train.knn_every == 0):
            return {}
        res = {}
        if fdist.is_main_process():
            from fastdino.eval.knn import knn_probe

            try:  # a probe is a measurement, not the run (and the other ranks wait below)
                res = knn_probe(self.arch.teacher.backbone, cfg.train.knn_data,
                                cfg.crops.global_crops_size, ks=cfg.eval.knn_k,
                                temperature=cfg.eval.knn_temperature,
                                batch_size=cfg.eval.batch_size, mean=cfg.crops.mean,
                                std=cfg.crops.std, val=cfg.train.knn_val_data,
                                samples=self.knn_samples, white_level=cfg.data.white_level,
                                jpeg_draft=cfg.data.jpeg_draft)
            except Exception as e:  # noqa: BLE001 - e.g. an image of the probe set unreadable
                logger.warning("%skNN probe at iteration %d failed, skipped: %s: %s",
                               self.log_prefix, it, type(e).__name__, e)
        fdist.barrier()
        return res


def schedule_in_data_passes(cfg: Config, iterations: int, global_batch: int,
                            num_images: int) -> str:
    """The run's length in images seen and passes over the data (USERS.md §1: the official
    "epoch" is train.epoch_length iterations, not a pass over the data)."""
    seen = iterations * global_batch
    per_epoch = cfg.train.epoch_length * global_batch / max(num_images, 1)
    span = cfg.train.total_iterations
    stop = (f"; train.max_iterations stops it, the schedules span {span}" if iterations < span
            else "")
    return (f"schedule: {iterations} iterations x {global_batch} images = {seen:,} images seen "
            f"= {seen / max(num_images, 1):.2f} passes over the {num_images:,} images (an "
            f"'epoch' is train.epoch_length={cfg.train.epoch_length} iterations = "
            f"{per_epoch:.3g} passes{stop})")


def _step_aligned(micro_batch: int, gas: int, resume: Path) -> int:
    """The resumed loader position (micro-batches of this rank) moved back to an optimizer
    step's boundary. The loaders draw per optimizer step (micro_batch // gas: the
    crops.resolution_mix size, data/loader.py), so a position that is not a multiple of gas (a
    resume with another deepspeed.gradient_accumulation_steps, or a position remapped for
    another rank count or per-rank batch) would make every later step straddle two draws: two
    sizes in one optimizer step. Up to gas - 1 micro-batches are seen again instead."""
    aligned = micro_batch - micro_batch % gas
    if aligned != micro_batch:
        logger.warning("checkpoint %s: data position %d micro-batches is not a multiple of "
                       "deepspeed.gradient_accumulation_steps=%d: the data continues at "
                       "micro-batch %d, an optimizer step's boundary (%d micro-batches are seen "
                       "again), so that each step's micro-batches share one draw of the loader",
                       resume, micro_batch, gas, aligned, micro_batch - aligned)
    return aligned


def _unfit_checkpoint(e: Exception, resume: Path) -> ValueError | None:
    """A resume whose checkpoint does not fit this run: one line saying which and what may have
    changed (the config changes are logged just before); None for any other error."""
    msg = str(e)
    if "Error(s) in loading state_dict" in msg:  # the model's parameters (torch's message)
        what = "model (a changed model.* or head key?)"
    elif "parameter group" in msg:  # the optimizer's (torch's messages)
        what = ("trainable parameters (a changed optim.frozen_blocks, optim.lora_* or "
                "distillation.enabled? such a change is a new run: another train.output_dir "
                "with model.pretrained_weights=<this run>)")
    else:
        return None
    lines = msg.splitlines()
    return ValueError(f"checkpoint {resume} does not fit this run's {what}; the config changes "
                      f"are logged above: " + " ".join(x.strip() for x in lines[:4])
                      + (f" ... ({len(lines) - 4} more lines)" if len(lines) > 4 else ""))


def _keep_previous_config(cfg: Config, path: Path) -> Path | None:
    """A run continued with another config (the next DINOv3 stage, a changed lr): the previous
    config.yaml is kept as config.<date-time>.yaml (returned) and the changed keys are logged."""
    if not path.is_file():
        return None
    import yaml

    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    old_model = old.get("model") if isinstance(old, dict) else None
    if isinstance(old_model, dict) and "pos_embed_rope_dtype" not in old_model \
            and cfg.model.pos_embed_rope_dtype != "fp32":
        # (config.yaml of a run started before the key existed: RoPE was computed in fp32)
        logger.warning("this run started with fp32 RoPE (its config.yaml predates "
                       "model.pos_embed_rope_dtype); it continues with %s RoPE, the training "
                       "default now; model.pos_embed_rope_dtype=fp32 continues it as it was",
                       cfg.model.pos_embed_rope_dtype)
    changes = config_changes(old, cfg.to_dict())
    if not changes:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    kept = path.with_name(f"config.{stamp}.yaml")
    while kept.exists():  # two starts within a second
        n += 1
        kept = path.with_name(f"config.{stamp}-{n}.yaml")
    os.replace(path, kept)
    shown = "; ".join(changes[:20]) + (f"; ... {len(changes) - 20} more" if len(changes) > 20
                                       else "")
    logger.info("config changed since the last start of this output_dir (previous one kept as "
                "%s): %s", kept.name, shown)
    return kept


def _knn_samples(cfg: Config) -> tuple[list, list] | None:
    """train.knn_data's (train, query) samples, listed on every rank at the start, so that a
    missing or unlabelled folder stops every rank before the first step rather than rank 0 at
    the first probe; kept on rank 0 (the one that runs the probe)."""
    t = cfg.train
    if not (t.knn_every and t.knn_data):
        return None
    from fastdino.eval.knn import knn_samples

    try:
        samples = knn_samples(t.knn_data, t.knn_val_data)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"train.knn_data={t.knn_data!r}"
                          + (f" / train.knn_val_data={t.knn_val_data!r}" if t.knn_val_data
                             else "") + f": {e}") from None
    return samples if fdist.is_main_process() else None


def _pca_inputs(spec: tuple[str, ...] | None) -> list[Path]:
    """The image files train.pca_images names ("sample": the embedded photos), or []."""
    if not spec:
        return []
    from fastdino.data.sample_data import sample_images_dir
    from fastdino.eval.pca import expand_inputs

    items = [sample_images_dir() if s == "sample" else s for s in spec]
    try:
        return expand_inputs(items)
    except FileNotFoundError as e:
        raise ConfigError(f"config key 'train.pca_images' = {list(spec)!r} is invalid: {e}; "
                          "allowed are image files, folders of them, or 'sample'") from None


def _resume_point(trainer) -> str:
    """Where `train.resume=auto` would continue this run from, in words."""
    from fastdino.checkpoint import latest_checkpoint

    ckpt_dir = getattr(trainer, "ckpt_dir", None)  # (a co-distillation run: one per student)
    if ckpt_dir is None:
        return "the same command continues from the run's last checkpoint (train.resume=auto)"
    try:
        last = latest_checkpoint(ckpt_dir)
    except OSError:
        last = None
    if last is None:
        return "no checkpoint was written yet: the same command starts over"
    return f"the same command continues from the last checkpoint, {last} (train.resume=auto)"


def _out_of_memory(e: BaseException, cfg: Config, trainer=None) -> str:
    """One error line for a GPU out-of-memory: torch's first line (what it tried to allocate,
    what the GPU holds) and the settings that trade memory for time, with their values now."""
    d, m = cfg.deepspeed, cfg.model
    what = (str(e).splitlines() or ["out of memory"])[0]
    tips = [f"lower data.batch_size_per_gpu (now {cfg.data.batch_size_per_gpu}) and raise "
            f"deepspeed.gradient_accumulation_steps (now {d.gradient_accumulation_steps}) to keep "
            "the global batch"]
    if not m.activation_checkpointing:
        tips.append("model.activation_checkpointing=true (recomputes each block in backward)")
    if d.zero_stage < 3:
        tips.append(f"deepspeed.zero_stage=3 (now {d.zero_stage}: it shards the parameters "
                    "too)")
    tips.append("`fastdino profile` shows the step's peak memory")
    where = _resume_point(trainer) if trainer is not None else "the run did not start"
    return f"out of GPU memory: {what} To fit: {'; '.join(tips)}. {where}"


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """`prog`: the name usage lines give (`fastdino train` from the console script; default
    argparse's, the script's file name)."""
    p = argparse.ArgumentParser(prog=prog, description="DINOv3 training (fastdino)")
    p.add_argument("--config", default=None,
                   help="a yaml file (e.g. configs/smoke.yaml) or a preset's name in configs/ "
                        "(e.g. smoke, vitl16)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (the LOCAL_RANK env var is what is used)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (presets, base: chains and overrides applied, "
                        "every key) as yaml and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/imgs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from fastdino.runlock import RunLocks

    with RunLocks() as locks:  # train.output_dir, for as long as this call runs (runlock.py)
        return _main(argv, prog, locks)


def _main(argv: list[str] | None, prog: str | None, locks) -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rank_logging.install()  # rank 0's lines once; a rank's own warnings and errors tagged
    try:  # a bad key, value or teacher run: its message, not a traceback (same on every rank)
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        locks.hold(cfg.train.output_dir)  # before config.yaml: a second run changes nothing
        if cfg.distillation.students:  # several students, one teacher forward (codistill.py)
            from fastdino.codistill import CoDistillation
            trainer = CoDistillation(cfg)
        else:
            trainer = Trainer(cfg)
    # The error paths below end the process group without its barrier: the error may be this
    # rank's alone (a file missing on one node), the others then wait in a collective of the
    # start or of the first step, never in the barrier, and all would hang until the backend's
    # timeout; this rank exits with 2 and the launcher ends the others.
    except ConfigError as e:
        logger.error("config error: %s", e)
        shutdown_distributed(barrier=False)  # no-op unless the process group had started
        return 2
    except (FileNotFoundError, ValueError) as e:  # weights the config names: missing, unfit
        logger.error("%s", e)
        logger.debug("where it was raised", exc_info=True)
        shutdown_distributed(barrier=False)
        return 2
    except torch.cuda.OutOfMemoryError as e:  # the model, optimizer or teacher do not fit
        logger.error("%s", _out_of_memory(e, cfg))
        logger.debug("where it was raised", exc_info=True)
        shutdown_distributed(barrier=False)
        return 1
    try:
        trainer.train()
        rc = 0 if trainer.stopped_by is None else exit_code(trainer.stopped_by)
    except NonFiniteLossError as e:  # every rank takes this decision together
        logger.error("%s", e)
        rc = 2
    except ConfigError as e:  # the data the config names (every rank lists it, maybe not alike)
        logger.error("config error: %s", e)
        shutdown_distributed(barrier=False)
        return 2
    except CheckpointWriteError as e:  # disk full, read-only: the folder, the resume point
        logger.error("%s", e)
        shutdown_distributed(barrier=False)
        return 1
    except torch.cuda.OutOfMemoryError as e:  # a step does not fit: what to change, where to
        logger.error("%s", _out_of_memory(e, cfg, trainer))  # continue from
        logger.debug("where it was raised", exc_info=True)
        shutdown_distributed(barrier=False)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C (stop.py): what is left to resume from
        logger.error("%s; %s", e or "interrupted", _resume_point(trainer))
        shutdown_distributed(barrier=False)
        return 128 + 2  # the shell's code for SIGINT
    shutdown_distributed()  # barrier, destroy the group, release DeepSpeed's CPU shm buffer
    return rc


if __name__ == "__main__":
    sys.exit(main())
