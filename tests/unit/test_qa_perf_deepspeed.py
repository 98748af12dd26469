"""DeepSpeed's own per-step gradient checks, off where they duplicate fastdino's clip
(parallel.py `with_step_defaults`): ZeRO-1/2 bf16 no longer run `bf16.check_grad_overflow` (an
inf/NaN pass over the owned gradients, an all-reduce, a host read) nor the global norm
(`zero_optimization.compute_grad_norm`: an fp64 copy and norm of every owned gradient, an
all-reduce, a host read); the same parameters bit for bit; bf16 gradients are reduced in fp32
(the official reduce_dtype); a user's json still decides; and the
configurations where DeepSpeed refuses the switch (ZeRO-3, ZeRO-1's BF16_Optimizer, optimizer
offload) never get it.

Also the worker of the 2-rank test: `deepspeed --num_gpus 2 <this file> --out DIR`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]


def _ds(stage: int, bf16: bool = True, **extra) -> dict:
    return {"zero_optimization": {"stage": stage, **extra.pop("zero", {})},
            "bf16": {"enabled": bf16}, "fp16": {"enabled": False}, "gradient_clipping": 0.0,
            **extra}


def _accepted(ds: dict) -> None:
    """DeepSpeed's own config models take it (their validators refuse a switch where it is not
    supported)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**ds["zero_optimization"])
    DeepSpeedBF16Config(**ds["bf16"])


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_skip_deepspeeds_overflow_check_and_global_norm(stage):
    from fastdino.parallel import with_step_defaults

    ds = _ds(stage)
    got = with_step_defaults(ds)
    assert got["bf16"]["check_grad_overflow"] is False
    assert got["zero_optimization"]["compute_grad_norm"] is False
    assert ds == _ds(stage)  # the input is left alone
    _accepted(got)
    fp32 = with_step_defaults(_ds(stage, bf16=False))  # (fp32 checks no overflow anyway)
    assert fp32["zero_optimization"]["compute_grad_norm"] is False
    assert "check_grad_overflow" not in fp32["bf16"]


@pytest.mark.parametrize("ds", [
    _ds(3),  # ZeRO-3: DeepSpeed refuses compute_grad_norm=false
    _ds(1, data_types={"grad_accum_dtype": "fp32"}),  # ZeRO-1's BF16_Optimizer
    _ds(1, data_types={"grad_accum_dtype": "float32"}),
    _ds(2, zero={"offload_optimizer": {"device": "cpu"}}),
    _ds(2, zero={"cpu_offload": True}),  # (DeepSpeed's old spelling of the same)
    _ds(0),
], ids=["zero3", "bf16-optimizer", "bf16-optimizer-float32", "offload", "cpu_offload", "zero0"])
def test_the_norm_is_kept_where_deepspeed_refuses_to_skip_it(ds):
    from fastdino.parallel import with_step_defaults

    got = with_step_defaults(ds)
    assert "compute_grad_norm" not in got["zero_optimization"]
    assert got["bf16"]["check_grad_overflow"] is False  # bf16 only checks it in ZeRO-1/2
    _accepted(got)
    if ds["zero_optimization"]["stage"] == 3:  # why: DeepSpeed's own validator
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        with pytest.raises(ValueError, match="compute_grad_norm=false"):
            DeepSpeedZeroConfig(stage=3, compute_grad_norm=False)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_are_reduced_in_fp32_as_the_official(stage):
    """SPEC.md §3.5: FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); DeepSpeed
    reduces bf16 gradients in bf16 unless told otherwise."""
    from fastdino.parallel import with_step_defaults

    assert with_step_defaults(_ds(stage))["communication_data_type"] == "fp32"
    assert "communication_data_type" not in with_step_defaults(_ds(stage, bf16=False))
    from deepspeed.runtime.config import get_communication_data_type

    assert get_communication_data_type(with_step_defaults(_ds(stage))) == torch.float32


def test_a_users_json_decides(tmp_path):
    """The user's json keys win over these defaults (they are not the yaml's)."""
    from fastdino.config import load_config
    from fastdino.parallel import build_ds_config, with_step_defaults

    user = {"zero_optimization": {"compute_grad_norm": True}, "bf16": {"check_grad_overflow":
                                                                       True},
            "communication_data_type": "bf16"}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    cfg = load_config(None, ["deepspeed.zero_stage=2", f"deepspeed.config_file={tmp_path}/ds.json"])
    got = with_step_defaults(build_ds_config(cfg, 2, torch.bfloat16))
    assert got["zero_optimization"]["compute_grad_norm"] is True
    assert got["bf16"]["check_grad_overflow"] is True
    assert got["communication_data_type"] == "bf16"


# ------------------------------------------------------------------------ 2 DeepSpeed CPU ranks
SCENARIOS = {  # name: (stage, user json)
    "zero2": (2, {}),
    "zero2_checks_on": (2, {"zero_optimization": {"compute_grad_norm": True},
                            "bf16": {"check_grad_overflow": True}}),
    "zero1_bf16_optimizer": (1, {"data_types": {"grad_accum_dtype": "fp32"}}),
    "zero3": (3, {}),
    "zero2_bf16_reduce": (2, {"communication_data_type": "bf16"}),
}


@pytest.mark.slow
def test_deepspeed_steps_without_its_checks_give_the_same_parameters(tmp_path):
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run([exe, "--num_gpus", "2", "--master_port", str(port), __file__, "--out",
                        str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    for r in (0, 1):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        on, off = res["zero2_checks_on"], res["zero2"]
        assert off["flags"] == [False, False] and on["flags"] == [True, True]
        assert off["checks"] == 0 and on["checks"] > 0  # DeepSpeed's passes, gone
        for a, b in zip(on["values"], off["values"], strict=True):  # an exact no-op
            assert torch.equal(a, b)
        assert not torch.equal(on["values"][0], res["initial"][0])  # (it trained)
        for name in ("zero1_bf16_optimizer", "zero3"):  # built and stepped as before
            assert len(res[name]["values"]) == len(on["values"]), name
        assert res["zero1_bf16_optimizer"]["optimizer"] == "BF16_Optimizer"
        for name in ("zero2", "zero2_checks_on", "zero3"):  # reduced in fp32, as the official
            assert res[name]["reduce_dtype"] == [torch.float32] * 2, name
        assert res["zero1_bf16_optimizer"]["reduce_dtype"][0] == torch.float32
        assert res["zero2_bf16_reduce"]["reduce_dtype"] == [torch.bfloat16] * 2  # the user's


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = nn.Linear(9, 7), nn.Linear(7, 5), \
            nn.Linear(7, 3)

    def forward(self, x):
        h = self.backbone(x.to(self.backbone.weight.dtype))
        return self.dino_head(h).float().pow(2).mean() + self.ibot_head(h).float().mean()


def _worker(out: Path) -> None:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from fastdino import dist as fdist
    from fastdino.config import load_config
    from fastdino.parallel import build_engine, init_distributed, shutdown_distributed

    counts = {"n": 0}
    for cls, name in [(DeepSpeedZeroOptimizer, "has_overflow"),
                      (DeepSpeedZeroOptimizer, "scaled_global_norm")]:
        real = getattr(cls, name)

        def counted(self, *a, _real=real, **k):
            counts["n"] += 1
            return _real(self, *a, **k)

        setattr(cls, name, counted)
    info = init_distributed()
    res = {}
    for name, (stage, user) in SCENARIOS.items():
        f = out / f"{name}.json"
        if fdist.is_main_process():
            f.write_text(json.dumps(user))
        fdist.barrier()
        cfg = load_config(REPO / "configs/smoke.yaml", [
            f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16",
            "data.batch_size_per_gpu=2", f"deepspeed.config_file={f}",
            f"train.output_dir={out}/run"])
        torch.manual_seed(0)
        student = _Student()
        groups = [{"params": list(student.parameters()), "lr": 0.05, "weight_decay": 0.04}]
        engine = build_engine(student, groups, cfg, info)
        params = list(engine.module.parameters())
        with engine.full_values(params) as vals:
            initial = [v.detach().clone() for v in vals]
        g = torch.Generator().manual_seed(1 + fdist.get_rank())
        counts["n"] = 0
        for _ in range(3):
            engine.set_accumulation_boundary(True)
            loss = engine(torch.randn(4, 9, generator=g))
            engine.backward(loss)
            engine.clip_grad_norms(0.05, finite_check=loss.detach()[None])
            engine.step()
        with engine.full_values(params) as vals:
            values = [v.detach().clone() for v in vals]
        opt = engine.engine.optimizer
        res[name] = {"values": values, "checks": counts["n"], "optimizer": type(opt).__name__,
                     "reduce_dtype": [engine.engine.communication_data_type,
                                      getattr(opt, "communication_data_type", None)],
                     "flags": [getattr(opt, "check_grad_overflow", None),
                               getattr(opt, "compute_grad_norm", None)]}
        res["initial"] = initial
        assert not isinstance(opt, DeepSpeedZeroOptimizer_Stage3) or stage == 3
    torch.save(res, out / f"rank{fdist.get_rank()}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    _worker(Path(ap.parse_args().out))
