"""DINOv3 training: `deepspeed --num_gpus N fastdino/train.py --config configs/smoke.yaml [k=v ...]`
or `python fastdino/train.py ...` (one process, plain torch engine; see parallel.py).

The step (DESIGN.md "One training step"), in `Trainer.step`:
    schedules -> teacher forward (no grad) -> student forward -> DINO + iBOT + KoLeo + Gram
    -> engine.backward -> per-module clip -> engine.step -> EMA -> Gram refresh
`Trainer.train` adds around it: data, NaN/Inf guard, metrics, kNN probe, checkpoints, and at the
end the teacher backbone exported to <output_dir>/teacher_backbone.{pth,safetensors}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a script: drop fastdino/ from sys.path (its profile.py would shadow the stdlib's)
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse
import logging
import math

import torch

from fastdino import dist as fdist
from fastdino.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_state
from fastdino.config import Config, load_config, save_config
from fastdino.data import build_train_loader
from fastdino.export import export_backbone
from fastdino.meta_arch import SSLMetaArch
from fastdino.metrics import MetricsLogger
from fastdino.parallel import build_engine, init_distributed
from fastdino.param_groups import build_param_groups
from fastdino.schedules import apply_to_param_groups, build_schedules
from fastdino.timing import NullTimer

logger = logging.getLogger("fastdino")


class NonFiniteLossError(RuntimeError):
    """Raised after `train.max_consecutive_nan` consecutive non-finite steps."""


class Trainer:
    def __init__(self, cfg: Config, timer=None):
        self.cfg, self.timer = cfg, timer or NullTimer()
        self.info = init_distributed()
        self.out = Path(cfg.train.output_dir)
        if fdist.is_main_process():  # the resolved config first, before anything derived
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.arch = SSLMetaArch(cfg, self.info.device)
        groups = build_param_groups(self.arch.student, self.arch.student.backbone.n_blocks,
                                    cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
        self.engine = build_engine(self.arch.student, groups, cfg, self.info)
        self.arch.attach(self.engine)
        # drop-path / RoPE jitter stream per rank, seeded after DeepSpeed's setup (which may draw)
        torch.manual_seed(cfg.train.seed + 1 + self.info.rank)
        B = cfg.data.batch_size_per_gpu
        self.global_batch = B * self.info.world_size * cfg.deepspeed.gradient_accumulation_steps
        self.sched = build_schedules(cfg, self.global_batch)
        self.total = cfg.train.total_iterations
        self.max_it = min(self.total, cfg.train.max_iterations or self.total)
        self.ckpt_dir = self.out / "checkpoints"
        self.start_iteration, self.resume_rng = 0, None
        resume = resolve_resume(cfg.train.resume, self.ckpt_dir)
        if resume is not None:
            st = load_checkpoint(resume, self.engine)
            self.arch.load_from_checkpoint(st)
            self.start_iteration, self.resume_rng = st["data_iteration"], st["rng"]
            logger.info("resumed from %s at iteration %d", resume, self.start_iteration)

    # ---------------------------------------------------------------------------------- the step
    def step(self, it: int, batch) -> dict | None:
        """One iteration on `batch`; returns the logged values, or None if the step was skipped
        (non-finite loss or gradients: parameters and teachers unchanged)."""
        cfg, arch, engine, timer = self.cfg, self.arch, self.engine, self.timer
        v = self.sched.at(it)
        apply_to_param_groups(engine.param_groups, v)
        with timer("teacher_forward"):
            t = arch.teacher_output(batch, v.teacher_temp, need_gram=v.gram_weight > 0)
        with timer("student_forward"):
            s = engine(batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices)
        with timer("losses"):
            loss, terms = arch.compute_losses(s, t, batch, v)
        with timer("backward"):
            # no host read of the loss here: its finiteness (all ranks) comes back with the
            # clip norms, the step's single sync; a non-finite step is discarded below
            engine.backward(loss)
        norms = engine.clip_grad_norms(cfg.optim.clip_grad, finite_check=loss)
        ok = all(math.isfinite(n) for n in norms.values())
        if ok:
            with timer("optimizer"):
                engine.step()
        else:
            engine.discard_step()  # parameters unchanged
        with timer("ema"):
            if ok:
                arch.update_teacher(v.momentum)
            # the Gram load / refresh is due by iteration (official train.py), skipped or not
            arch.update_gram_teacher(it)
        if not ok:
            return None
        return {"lr": v.lr, "wd": v.wd, "mom": v.momentum, "last_layer_lr": v.last_layer_lr,
                "teacher_temp": v.teacher_temp, **terms,
                **{f"{name}_grad_norm": n for name, n in norms.items()}}

    # -------------------------------------------------------------------------------- the loop
    def train(self) -> list[dict]:
        cfg, info = self.cfg, self.info
        loader = build_train_loader(cfg, info.rank, info.world_size, self.start_iteration)
        metrics = MetricsLogger(self.out, self.max_it, self.start_iteration, self.global_batch,
                                fdist.is_main_process(), printer=logger.info)
        if self.resume_rng is not None:  # last: the DataLoader iterator above draws a seed
            set_rng_state(self.resume_rng)
        history, bad = [], 0
        it = self.start_iteration
        while it < self.max_it:
            with self.timer("data_wait"):
                batch = next(loader).to(info.device)
            values = self.step(it, batch)
            it += 1
            if values is None:
                bad += 1
                logger.warning("iteration %d: non-finite loss or gradients, step skipped (%d in a "
                               "row)", it - 1, bad)
                if bad >= cfg.train.max_consecutive_nan:
                    path = self.save(it)
                    raise NonFiniteLossError(
                        f"{bad} consecutive non-finite steps (iterations {it - bad}..{it - 1}, "
                        f"train.max_consecutive_nan={cfg.train.max_consecutive_nan}): stopping. "
                        f"The parameters of the last good step are saved in {path}. Try a lower "
                        "optim.lr, a lower teacher temperature, or check the data.")
            else:
                bad = 0
            knn = self._knn(it)  # collective; {} unless due
            if values is not None and (knn or it % cfg.train.log_every == 0 or it == self.max_it):
                history.append(metrics.log(it, {**self._average(values), **knn}))
            if it % cfg.train.checkpoint_every == 0 or it == self.max_it:
                path = self.save(it)
        if self.start_iteration >= self.max_it:
            logger.info("nothing to do: the checkpoint is at iteration %d, train.max_iterations / "
                        "the schedule end is %d", self.start_iteration, self.max_it)
        elif fdist.is_main_process():  # the teacher backbone, official keys (fastdino export)
            for f in export_backbone(path, self.out / "teacher_backbone"):
                logger.info("exported the teacher backbone to %s", f)
        return history

    def save(self, it: int) -> Path:
        state = {**self.arch.state_for_checkpoint(), "data_iteration": it}
        return save_checkpoint(self.ckpt_dir, it, self.engine, state,
                               self.cfg.train.keep_checkpoints)

    def _average(self, values: dict) -> dict:
        keys = sorted(values)
        vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                           device=self.info.device)
        vec = fdist.all_reduce_mean(vec).tolist()
        out = dict(zip(keys, vec, strict=True))
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

            res = knn_probe(self.arch.teacher.backbone, cfg.train.knn_data,
                            cfg.crops.global_crops_size, ks=cfg.eval.knn_k,
                            temperature=cfg.eval.knn_temperature,
                            batch_size=cfg.eval.batch_size, mean=cfg.crops.mean, std=cfg.crops.std)
        fdist.barrier()
        return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DINOv3 training (fastdino)")
    p.add_argument("--config", default=None, help="yaml preset, e.g. configs/smoke.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (the LOCAL_RANK env var is what is used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/imgs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    if not fdist.is_main_process():
        logger.setLevel(logging.WARNING)
    try:
        trainer.train()
        rc = 0
    except NonFiniteLossError as e:  # every rank takes this decision together
        logger.error("%s", e)
        rc = 2
    if fdist.is_enabled():  # ZeRO-3 can abort at exit without this (DESIGN.md)
        fdist.barrier()
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
