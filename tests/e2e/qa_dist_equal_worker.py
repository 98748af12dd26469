"""Worker of tests/e2e/test_qa_dist_equal.py: the same optimizer steps on the same images, as
2 DeepSpeed ranks x B images (`deepspeed --num_gpus 2 qa_dist_equal_worker.py --out DIR`) or as
1 process x 2B images (`python qa_dist_equal_worker.py --out DIR`: the plain torch engine).

Rank r of the 2-rank run trains on its own loader's batches (configs/smoke.yaml, B images, rank r
of 2); the 1-process run on each pair of them concatenated (rank 0's images, then rank 1's, crop
by crop), so both see the same images, crops and iBOT masks. Where the algorithm couples the
images of a batch, the 2 ranks must agree with the 1 process because the coupling is
all-reduced: Sinkhorn-Knopp's sums, the softmax centers' batch mean, and KoLeo when the 2-rank run
uses distributed KoLeo over both ranks (koleo.distributed, group = 2B) where the 1-process run
uses its per-rank KoLeo over its 2B. Drop-path and the RoPE rescale draw per rank: both off.

Each scenario (SCENARIOS) is a Trainer stepped STEPS times; DIR/<mode>_<scenario>.pt holds the
logged values of each step (averaged over the ranks as the trainer logs them), the student's full
fp32 trainable parameters before the first step and after the last, and the teacher's after it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
B = 2  # images per rank per micro-batch
STEPS = 3
COMMON = ["data.num_workers=0", "data.loader=torch", "model.depth=2", "kernels.impl=torch",
          "model.drop_path_rate=0", "model.rope_rescale=null", "optim.warmup_epochs=0",
          "optim.lr=0.01", "schedules.momentum_teacher=0.6",
          "schedules.final_momentum_teacher=0.6", "train.resume=none", "koleo.loss_weight=0"]
# name: overrides of both runs. A small clip (most module gradients are clipped) and a high lr
# make the parameter comparison see the clip and several steps.
SCENARIOS = {
    "zero0_gas2_clip": ["deepspeed.zero_stage=0", "deepspeed.gradient_accumulation_steps=2",
                        "optim.clip_grad=0.05"],
    "zero1_gas2_softmax": ["deepspeed.zero_stage=1", "deepspeed.gradient_accumulation_steps=2",
                           "dino.centering=softmax", "optim.clip_grad=0.05"],
    "zero2_frozen_gram": ["deepspeed.zero_stage=2", "optim.frozen_blocks=1", "gram.use=true",
                          "gram.ema_teacher=true", "optim.clip_grad=0.05"],
    "zero3_lora_gas2": ["deepspeed.zero_stage=3", "optim.lora_rank=4",
                        "deepspeed.gradient_accumulation_steps=2", "optim.clip_grad=0.05"],
}
KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
        "koleo_loss", "gram_loss", "backbone_grad_norm", "dino_head_grad_norm",
        "ibot_head_grad_norm")


def _full_params(engine) -> dict[str, torch.Tensor]:
    """The student's trainable parameters in full fp32, read through DeepSpeed's own getter (the
    fp32 master assembled from the partitions; collective) or, for ZeRO-0 fp32 and the torch
    engine, the replicated module parameters."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if getattr(engine, "zero_stage", -1) > 0:
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in named}
    return {n: p.detach().float().clone() for n, p in named}


def _scenario(name: str, out: Path, rank: int, world: int) -> dict:
    from fastdino.config import load_config
    from fastdino.data import build_train_loader
    from fastdino.train import Trainer

    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_train_grad_accum import concat

    over = [*COMMON, *SCENARIOS[name]]
    gas = next((int(o.split("=")[1]) for o in over
                if o.startswith("deepspeed.gradient_accumulation_steps=")), 1)
    # the 2-rank run: distributed KoLeo over both ranks' images; 1 process: its own 2B
    mine = ([f"data.batch_size_per_gpu={B}", "koleo.distributed=true",
             f"koleo.group_size={2 * B}"] if world == 2 else [f"data.batch_size_per_gpu={2 * B}"])
    trainer = Trainer(load_config(SMOKE, [*over, *mine,
                                          f"train.output_dir={out / (name + str(world))}"]))
    loader_cfg = load_config(SMOKE, [*over, f"data.batch_size_per_gpu={B}"])
    loaders = [build_train_loader(loader_cfg, r, 2, 0) for r in ((rank,) if world == 2 else (0, 1))]
    values, student0 = [], _full_params(trainer.engine)
    for it in range(STEPS):
        mbs = []
        for _ in range(gas):
            parts = [next(ld) for ld in loaders]
            mbs.append(parts[0] if world == 2 else concat(parts))
        v = trainer.step(it, mbs)
        assert v is not None, f"{name}: step {it} skipped (non-finite)"
        v = {k: float(x) for k, x in v.items() if k in KEYS}
        values.append(trainer._average(v) if world == 2 else v)
    return {"values": values, "student0": student0, "student": _full_params(trainer.engine),
            "teacher": {n: p.detach().clone() for n, p in trainer.arch.teacher.named_parameters()},
            "lr": float(trainer.sched.at(0).lr)}


def _zero0_bf16_ema(out: Path) -> dict:
    """ZeRO-0 bf16 (DeepSpeed's FP16_UnfusedOptimizer keeps fp32 masters beside the bf16
    module): after each of STEPS steps the teacher must be the EMA of the fp32 masters, read here
    from the optimizer's own groups, as under ZeRO-1/2/3 (before: of the bf16 module weights)."""
    from fastdino.config import load_config
    from fastdino.data import build_train_loader
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*COMMON, f"data.batch_size_per_gpu={B}", "deepspeed.zero_stage=0",
                              "deepspeed.precision=bf16", f"train.output_dir={out / 'bf16'}"])
    trainer = Trainer(cfg)
    opt = trainer.engine.engine.optimizer
    names = {p: n for n, p in trainer.engine.module.named_parameters()}

    def masters() -> dict[str, torch.Tensor]:
        return {names[p]: m.detach().float().clone()
                for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for p, m in zip(g16, g32, strict=True)}

    teacher = dict(trainer.arch.teacher.named_parameters())
    ref = {n: teacher[n].detach().clone() for n in masters()}
    teacher0 = {n: v.clone() for n, v in ref.items()}
    loader = build_train_loader(cfg, trainer.info.rank, trainer.info.world_size, 0)
    for it in range(STEPS):
        assert trainer.step(it, next(loader)) is not None
        m = trainer.sched.at(it).momentum
        for n, v in masters().items():
            ref[n].mul_(m).add_(v, alpha=1 - m)
    module = {n: p.detach().float() for n, p in trainer.engine.module.named_parameters()}
    return {"optimizer": type(opt).__name__,
            "ema_err": max((teacher[n].detach() - ref[n]).abs().max().item() for n in ref),
            "teacher_moved": max((teacher[n].detach() - teacher0[n]).abs().max().item()
                                 for n in ref),
            "bf16_rounding": max((module[n] - v).abs().max().item()
                                 for n, v in masters().items())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=list(SCENARIOS))
    args = ap.parse_args()
    out = Path(args.out)
    from fastdino.parallel import init_distributed, shutdown_distributed

    info = init_distributed()
    mode = "dist" if info.world_size == 2 else "ref"
    for name in args.only:
        res = _scenario(name, out, info.rank, info.world_size)
        if info.rank == 0:
            torch.save(res, out / f"{mode}_{name}.pt")
    if mode == "dist":
        res = _zero0_bf16_ema(out)
        if info.rank == 0:
            torch.save(res, out / "dist_zero0_bf16_ema.pt")
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
