"""Worker of tests/e2e/test_zero_stages.py, started as
    deepspeed --num_gpus 2 tests/e2e/zero_check_worker.py --out DIR [config overrides...]

Runs the real Trainer on configs/smoke.yaml for a few steps and checks, on every rank:
- EMA: after k steps the teacher equals the EMA of the student's successive *full* parameters,
  read independently of the trainer through DeepSpeed's `safe_get_full_fp32_param` (the fp32
  master copy held by the ZeRO optimizer, all-reduced from the partitions) rather than the
  `GatheredParameters` path the trainer uses;
- clipping: the per-module norms the engine reports equal the norms of the full gradients
  (`safe_get_full_grad`), and after clipping each module's full gradient norm is
  min(norm, max_norm);
- continued pretraining, when configured: the frozen layers (`optim.frozen_blocks`) keep their
  initial values in the student (read gathered) and the teacher, bit for bit, and the trainable
  backbone does not move during the head warm-up (`optim.freeze_backbone_epochs`).
Writes DIR/result_rank<r>.json with the measured errors and the losses.
"""

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from fastdino.config import load_config
from fastdino.train import Trainer

REPO = Path(__file__).resolve().parents[2]


def full_grad_norms(engine) -> dict[str, float]:
    return {n: math.sqrt(sum(float(safe_get_full_grad(p).double().pow(2).sum()) for p in ps))
            for n, ps in engine.module_params().items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(REPO / "configs/smoke.yaml", [
        "data.num_workers=0", "train.log_every=1", "train.checkpoint_every=1000",
        "train.resume=none", f"train.output_dir={args.out}/run", *args.overrides])
    trainer = Trainer(cfg)
    engine, arch = trainer.engine, trainer.arch
    rank = trainer.info.rank

    clip_errors, n_clipped = [], [0]
    orig_clip = engine.clip_grad_norms

    def checked_clip(max_norm, *args, **kwargs):
        before = full_grad_norms(engine)
        norms = orig_clip(max_norm, *args, **kwargs)
        after = full_grad_norms(engine)
        for n in norms:
            clip_errors.append(abs(norms[n] - before[n]) / before[n])
            clip_errors.append(abs(after[n] - min(before[n], max_norm)) / max_norm)
            n_clipped[0] += before[n] > max_norm
        return norms

    engine.clip_grad_norms = checked_clip

    def full_params() -> dict[str, torch.Tensor]:  # the optimizer's (frozen: none there)
        return {n: safe_get_full_fp32_param(p).detach().clone()
                for n, p in engine.module.named_parameters() if p.requires_grad}

    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]

    def frozen_values() -> dict[str, torch.Tensor]:  # the module's own, gathered under ZeRO-3
        with deepspeed.zero.GatheredParameters([p for _, p in frozen]) if engine.zero_stage == 3 \
                else contextlib.nullcontext():
            return {n: p.detach().float().clone() for n, p in frozen}

    ref = full_params()  # teacher starts equal to the student
    frozen0 = frozen_values()
    teacher0 = {n: p.detach().clone() for n, p in arch.teacher.named_parameters()}
    init_err = max((teacher0[n] - ref[n]).abs().max().item() for n in ref)
    loader_cfg = trainer.cfg
    from fastdino.data import build_train_loader

    loader = build_train_loader(loader_cfg, rank, trainer.info.world_size, 0)
    losses, warmup_moved = [], []
    n_steps = trainer.max_it
    for it in range(n_steps):
        before = full_params()
        values = trainer.step(it, next(loader))
        assert values is not None, f"step {it} skipped (non-finite)"
        losses.append(float(values["total_loss"]))
        m = trainer.sched.at(it).momentum
        after = full_params()
        if values["backbone_lr"] == 0.0:  # head warm-up step: the backbone stays
            warmup_moved.append(max((after[n] - before[n]).abs().max().item()
                                    for n in after if n.startswith("backbone.")))
        for n, s in after.items():  # independent EMA of the full student params
            ref[n].mul_(m).add_(s, alpha=1 - m)
    teacher = dict(arch.teacher.named_parameters())
    ema_err = max((teacher[n].detach() - ref[n]).abs().max().item() for n in ref)
    frozen_err = max([(v - frozen0[n]).abs().max().item() for n, v in frozen_values().items()]
                     + [(teacher[n].detach() - teacher0[n]).abs().max().item() for n in frozen0],
                     default=0.0)
    moved = max((p.detach() - teacher0[n]).abs().max().item()
                for n, p in arch.teacher.named_parameters())
    result = {"rank": rank, "stage": cfg.deepspeed.zero_stage, "losses": losses,
              "init_err": init_err, "ema_err": ema_err, "teacher_moved": moved,
              "n_frozen": len(frozen), "frozen_err": frozen_err, "warmup_moved": warmup_moved,
              "clip_rel_err": max(clip_errors), "n_clip_checks": len(clip_errors),
              "n_clipped": n_clipped[0],
              "momentum": [trainer.sched.at(i).momentum for i in range(n_steps)]}
    Path(args.out, f"result_rank{rank}.json").write_text(json.dumps(result))
    from fastdino.parallel import shutdown_distributed

    shutdown_distributed()  # barrier, destroy the group, release DeepSpeed's CPU shm buffer
    return 0


if __name__ == "__main__":
    sys.exit(main())
