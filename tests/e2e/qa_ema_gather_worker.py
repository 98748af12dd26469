"""Worker of tests/e2e/test_qa_ema_gather.py, started as
    deepspeed --num_gpus 2 tests/e2e/qa_ema_gather_worker.py --out DIR

For each scenario (DeepSpeed bf16 under ZeRO-1, 2, 3 (small
parameters persistent, or all partitioned) and ZeRO-1's BF16_Optimizer): a toy student with odd
parameter sizes (no multiple of the world size nor of DeepSpeed's alignment), a frozen layer,
a LoRA adapter over a frozen base, and param groups of odd totals, trained 3 AdamW steps. At the
init and after every step, on every rank, `engine.full_values` (all-gather of the fp32 master
partitions) must equal bit for bit both the old all-reduce path (`_master_values_allreduce`) and
DeepSpeed's own `safe_get_full_fp32_param` (frozen: the module's value), for all parameters at
once and for sub-lists that split param groups; no all-reduce may run, one all-gather per
unit; `EMAPlan.chunks_for` never splits a unit. Writes DIR/result_rank<r>.json.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from fastdino import dist as fdist
from fastdino.config import load_config
from fastdino.ema import EMAPlan
from fastdino.layers.lora import LoRALinear
from fastdino.parallel import build_engine, init_distributed, shutdown_distributed

REPO = Path(__file__).resolve().parents[2]
COUNTS = {"all_reduce": 0, "all_gather": 0}  # fdist collectives called (wrapped in main)

SCENARIOS = {  # name: (zero stage, extra DeepSpeed json)
    "zero1": (1, {}),
    "zero2": (2, {}),
    "zero3": (3, {}),
    "zero3_partitioned": (3, {"zero_optimization": {"stage3_param_persistence_threshold": 0}}),
    "zero1_bf16_optimizer": (1, {"data_types": {"grad_accum_dtype": "fp32"}}),
}


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 13)  # 91 + 13
        self.frozen = nn.Linear(13, 13).requires_grad_(False)  # optim.frozen_blocks
        self.lora = LoRALinear(nn.Linear(13, 11), rank=3, alpha=3.0)  # A 39, B 33; base frozen
        self.norm = nn.LayerNorm(11)
        self.odd = nn.Parameter(torch.randn(5))

    def forward(self, x):
        x = self.frozen(self.embed(x)).relu()
        return self.norm(self.lora(x)) + self.odd.sum()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.dino_head = nn.Linear(11, 3)

    def forward(self, x):
        return self.dino_head(self.backbone(x.to(self.compute_dtype)))


def groups_of(student: Toy) -> list[dict]:
    b = student.backbone
    def group(params, wd):
        return {"params": params, "lr": 0.05, "weight_decay": wd}
    # totals 109, 94, 36 elements: odd, and not multiples of 2·world or of 8 (bf16 alignment)
    return [group([b.embed.weight, b.embed.bias, b.odd], 0.04),
            group([b.lora.lora_A, b.norm.weight, b.lora.lora_B, b.norm.bias], 0.0),
            group(list(student.dino_head.parameters()), 0.04)]


def snapshot(ctx) -> list[torch.Tensor]:
    with ctx as vals:
        return [v.detach().clone() for v in vals]


def module_values(engine, params) -> list[torch.Tensor]:
    """The module's own (bf16) values, gathered under ZeRO-3."""
    with deepspeed.zero.GatheredParameters(params) if engine.zero_stage == 3 \
            else contextlib.nullcontext():
        return [p.detach().clone() for p in params]


def check(engine, params) -> dict:
    """The new path against the old one, DeepSpeed's own full masters and the module's bf16
    weights (DeepSpeed writes bf16(master) there at every step: an independent check), bit for
    bit."""
    COUNTS.update(all_reduce=0, all_gather=0)
    new = snapshot(engine.full_values(params))
    new_counts = dict(COUNTS)
    old = snapshot(engine._master_values_allreduce(params))
    bf16 = module_values(engine, params)
    res = {"old": [], "ds": [], "bf16": [], "dtype": []}
    for p, a, b, w in zip(params, new, old, bf16, strict=True):
        if a.dtype != torch.float32 or a.shape != w.shape:
            res["dtype"].append(list(p.shape))
        if not torch.equal(a, b):
            res["old"].append(list(p.shape))
        if not torch.equal(a.to(w.dtype), w):
            res["bf16"].append(list(p.shape))
        want = safe_get_full_fp32_param(p) if p.requires_grad else w.float()
        if not torch.equal(a, want.view(a.shape)):
            res["ds"].append(list(p.shape))
    layout = engine._master_layout()
    units = {layout.slots[p].unit for p in params if p.requires_grad} if layout else set()
    return {**res, "all_reduce": new_counts["all_reduce"],
            "all_gather": new_counts["all_gather"], "units": len(units)}


def run(name: str, stage: int, extra: dict, out: Path, info) -> dict:
    torch.manual_seed(0)  # same init on every rank
    cfg_file = out / f"{name}.json"
    if fdist.is_main_process():
        cfg_file.write_text(json.dumps(extra))
    fdist.barrier()
    cfg = load_config(REPO / "configs/smoke.yaml", [
        f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", "data.batch_size_per_gpu=2",
        f"deepspeed.config_file={cfg_file}", f"train.output_dir={out}/run"])
    student = Toy()
    engine = build_engine(student, groups_of(student), cfg, info)
    all_params = list(engine.module.parameters())
    trainable = [p for p in all_params if p.requires_grad]
    # sub-lists as EMA chunks cut them: across param groups, one param alone, frozen + trainable
    subsets = [all_params, trainable[1:4], trainable[-1:], all_params[2:7]]
    results, g = [], torch.Generator().manual_seed(1 + fdist.get_rank())
    for step in range(4):
        if step:
            x = torch.randn(2, 7, generator=g)
            engine.set_accumulation_boundary(True)
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        results += [check(engine, s) for s in subsets]
    # the EMA's chunks never split a unit (one all-gather of each unit per step)
    toy_teacher = Toy()
    plan = EMAPlan(toy_teacher, engine.module, chunk_numel=50)
    chunks = plan.chunks_for(engine.full_values)
    units = engine.value_units([s for _, s in plan.pairs])

    def split_units(chunks) -> int:  # units read in more than one chunk
        where = {}
        for i, (_, ss) in enumerate(chunks):
            for u in engine.value_units(ss) or []:
                where.setdefault(u, set()).add(i)
        return sum(len(v) > 1 for v in where.values())

    return {"name": name, "optimizer": type(engine.optimizer).__name__,
            "layout": engine._master_layout() is not None, "checks": results,
            "n_units": len(set(units or [])), "split_units": split_units(chunks),
            "plain_split_units": split_units(plan.chunks)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    info = init_distributed()
    real_reduce, real_gather = fdist.all_reduce_sum, fdist.all_gather_into

    def all_reduce_sum(x):
        COUNTS["all_reduce"] += 1
        return real_reduce(x)

    def all_gather_into(o, x):
        COUNTS["all_gather"] += 1
        return real_gather(o, x)

    fdist.all_reduce_sum, fdist.all_gather_into = all_reduce_sum, all_gather_into
    results = [run(name, stage, extra, out, info) for name, (stage, extra) in SCENARIOS.items()]
    rank = fdist.get_rank()
    Path(out, f"result_rank{rank}.json").write_text(json.dumps(results))
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
