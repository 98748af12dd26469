"""The EMA's read of the student's fp32 masters under DeepSpeed bf16 ZeRO-1/2/3
(parallel.py `_gathered_masters`): one all-gather of each flat fp32 partition instead of an
all-reduce of a zero-filled buffer of the whole model (half the bytes, no memset), the same
numbers bit for bit; and the EMA's chunks never split a gathered unit."""

import json

import pytest
import torch
from torch import nn
from trainer_helpers import REPO, run_ds

from fastdino.ema import EMAPlan, ema_update

WORKER = REPO / "tests" / "e2e" / "qa_ema_gather_worker.py"


@pytest.mark.slow
def test_gathered_masters_equal_the_allreduce_path_bit_for_bit(tmp_path):
    """2 CPU ranks, bf16, ZeRO-1, 2, 3 (persistent and partitioned small parameters) and ZeRO-1's
    BF16_Optimizer; odd sizes, a frozen layer, a LoRA adapter (qa_ema_gather_worker.py)."""
    from qa_ema_gather_worker import SCENARIOS

    run_ds(WORKER, ["--out", str(tmp_path)])
    for r in (0, 1):
        results = json.loads((tmp_path / f"result_rank{r}.json").read_text())
        assert [s["name"] for s in results] == list(SCENARIOS)
        for s in results:
            assert s["layout"], s["name"]  # the all-gather path, not the fallback
            if s["name"] == "zero1_bf16_optimizer":
                assert s["optimizer"] == "BF16_Optimizer"
            assert len(s["checks"]) == 16  # 4 parameter lists x (init + 3 steps)
            for c in s["checks"]:
                assert c["dtype"] == [] and c["bf16"] == [], (s["name"], c)
                assert c["old"] == [] and c["ds"] == [], (s["name"], c)
                assert c["all_reduce"] == 0, (s["name"], c)  # no all-reduce any more
                assert c["all_gather"] == c["units"] > 0, (s["name"], c)  # one per unit
            assert s["n_units"] == 3 and s["split_units"] == 0, s["name"]
            assert s["plain_split_units"] > 0  # the plain chunking would split one


class _Engine:
    """A full_values owner that gathers by units, as DeepSpeedStudent under bf16 ZeRO."""

    def __init__(self, units: dict):
        self.units, self.calls = units, []

    def value_units(self, params):
        return [self.units[p] for p in params]

    def full_values(self, params):
        self.calls.append(list(params))
        from fastdino.ema import module_values

        return module_values(params)


def test_ema_chunks_keep_each_unit_whole():
    """Units interleaved in parameter order (a param group holds weights of several blocks):
    every unit is read in exactly one chunk, in first-seen order, and the EMA is unchanged."""
    torch.manual_seed(0)
    student = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])  # 8 params of 16 / 4
    teacher = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    ref = [t.detach().clone() for t in teacher.parameters()]
    params = list(student.parameters())
    units = {p: i % 3 for i, p in enumerate(params)}  # 0 1 2 0 1 2 0 1
    engine = _Engine(units)
    plan = EMAPlan(teacher, student, chunk_numel=20)
    ema_update(teacher, student, 0.9, full_values=engine.full_values, plan=plan)
    seen = [{units[p] for p in call} for call in engine.calls]
    assert sum(len(s) for s in seen) == 3  # no unit in two chunks
    assert sorted(p for call in engine.calls for p in map(id, call)) == sorted(map(id, params))
    for t, r, s in zip(teacher.parameters(), ref, params, strict=True):
        torch.testing.assert_close(t, r.lerp(s, 0.1), rtol=0, atol=1e-7)
    assert len(plan.chunks) > len(engine.calls)  # the plain chunking (no units) splits them


def test_all_gather_into_one_process():
    from fastdino import dist as fdist

    out = torch.empty(6)
    assert torch.equal(fdist.all_gather_into(out, torch.arange(6.0).view(2, 3)), torch.arange(6.0))
    with pytest.raises(ValueError, match="out holds 5 elements, 1 ranks x 6 needed"):
        fdist.all_gather_into(torch.empty(5), torch.zeros(6))


def test_round_robin_gradients_refused(tmp_path):
    """DeepSpeed 0.19.8 under zero_optimization.round_robin_gradients lays the flat buffers out
    in round-robin order but maps each parameter's fp32 master (`_hp_mapping`) in group order:
    the old EMA read (and safe_get_full_fp32_param, the clip's gradient fragments, universal
    checkpoints) took other parameters' values (on the toy of qa_ema_gather_worker.py under
    ZeRO-2, 28 parameter reads over 4 steps differed from the fp32 masters whose bf16 rounding
    DeepSpeed writes into the module). A one-line error instead."""
    from fastdino.config import ConfigError, load_config
    from fastdino.parallel import build_ds_config

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"round_robin_gradients": True}}))
    cfg = load_config(REPO / "configs/smoke.yaml", ["deepspeed.zero_stage=2",
                                                    f"deepspeed.config_file={f}"])
    with pytest.raises(ConfigError, match="round_robin_gradients' = true is not supported"):
        build_ds_config(cfg, 2, torch.bfloat16)
    f.write_text(json.dumps({"zero_optimization": {"round_robin_gradients": False}}))
    assert build_ds_config(cfg, 2, torch.bfloat16)["zero_optimization"]["stage"] == 2
