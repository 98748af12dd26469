"""Worker of tests/e2e/test_resume_world_size.py, started as
    deepspeed --num_gpus N tests/e2e/resume_world_size_worker.py --out DIR [--dump-at-load]
        [config overrides...]
or with `python` instead of `deepspeed --num_gpus N` (the plain torch engine, one process).

Runs the real Trainer (configs/smoke.yaml) and writes what the optimizer holds, read through
DeepSpeed's own collective getters (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`:
the full fp32 master / AdamW moment of each parameter, assembled from every rank's partition),
independently of the checkpoint code under test:
- with --dump-at-load: DIR/at_load.pt right after `Trainer(cfg)` (i.e. after the resume);
- always: DIR/at_end.pt after `trainer.train()` (the state of the run's last checkpoint).
Each file: {"master", "exp_avg", "exp_avg_sq", "module": {param name: tensor}, "steps": (min, max)
of the AdamW step counts over every rank's param groups, "groups": the param groups' settings other
than lr / weight_decay (multipliers, betas, ...), "start_iteration", "start_micro_batch", "world"}.
"""

import argparse
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from fastdino import dist as fdist
from fastdino.config import load_config
from fastdino.train import Trainer

REPO = Path(__file__).resolve().parents[2]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW: under the ZeRO optimizer (ZeRO-1/2/3), DeepSpeed's own (ZeRO-0 fp32), or
    the plain torch engine's."""
    if not hasattr(engine, "engine"):  # TorchStudent
        return engine.optimizer
    opt = engine.engine.optimizer
    return getattr(opt, "optimizer", opt)


def _steps(engine) -> list[float]:
    """The AdamW step count of every param group this rank's base optimizer holds state for."""
    base = _base_optimizer(engine)
    return [float(st["step"]) for st in base.state.values() if "step" in st]


def dump(trainer, path: Path) -> None:
    """Collective (every rank calls the getters); rank 0 writes."""
    engine = trainer.engine
    zero = getattr(getattr(engine, "engine", None), "optimizer", None)
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 (DeepSpeed 0.19.8): the first optimizer step links every param's moment
        # fragments right after stepping param group 0, when the other groups' AdamW state is
        # still empty, so `safe_get_full_optimizer_state` finds no exp_avg for them. Relink now
        # that every group has stepped (read-only bookkeeping: training is not affected).
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}, "module": {}}
    base = _base_optimizer(engine)
    for n, p in named:
        master = safe_get_full_fp32_param(p)  # None: ZeRO-0 / torch engine, replicated fp32 params
        out["master"][n] = (p if master is None else master).detach().cpu().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            v = base.state[p][k] if master is None else safe_get_full_optimizer_state(p, k)
            out[k][n] = v.detach().cpu().clone()
    with engine.full_values([p for _, p in named]) as vals:
        out["module"] = {n: v.detach().float().cpu().clone()
                         for (n, _), v in zip(named, vals, strict=True)}
    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    with engine.full_values([p for _, p in frozen]) as vals:  # optim.frozen_blocks
        out["frozen"] = {n: v.detach().float().cpu().clone()
                         for (n, _), v in zip(frozen, vals, strict=True)}
    steps = _steps(engine) or [float("nan")]  # (min, max) over all ranks' groups
    lo = -fdist.all_reduce_max(torch.tensor([-min(steps)], dtype=torch.float64)).item()
    hi = fdist.all_reduce_max(torch.tensor([max(steps)], dtype=torch.float64)).item()
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "weight_decay")}
              for g in engine.param_groups]  # lr / wd: rewritten from the schedules each step
    out.update(steps=[lo, hi], groups=groups, start_iteration=trainer.start_iteration,
               start_micro_batch=trainer.start_micro_batch, world=fdist.get_world_size())
    if fdist.is_main_process():
        torch.save(out, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dump-at-load", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(REPO / "configs/smoke.yaml", [
        "data.num_workers=0", "train.log_every=1", "optim.warmup_epochs=0",
        f"train.output_dir={out / 'run'}", *args.overrides])
    trainer = Trainer(cfg)
    if args.dump_at_load:
        dump(trainer, out / "at_load.pt")
    trainer.train()
    dump(trainer, out / "at_end.pt")
    from fastdino.parallel import shutdown_distributed

    shutdown_distributed()  # barrier, destroy the group, release DeepSpeed's CPU shm buffer
    return 0


if __name__ == "__main__":
    sys.exit(main())
