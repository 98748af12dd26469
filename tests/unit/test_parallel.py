"""parallel.py without launching ranks: the DeepSpeed json merge / conflict rules, and the
per-module clipping of the plain torch engine against torch.nn.utils.clip_grad_norm_."""

import json

import pytest
import torch
from torch import nn

from fastdino.config import ConfigError, load_config
from fastdino.parallel import DistInfo, TorchStudent, build_ds_config


def _cfg(tmp_path, user: dict | None, *over):
    extra = []
    if user is not None:
        (tmp_path / "ds.json").write_text(json.dumps(user))
        extra = [f"deepspeed.config_file={tmp_path / 'ds.json'}"]
    return load_config(None, ["data.batch_size_per_gpu=8", "deepspeed.zero_stage=2", *extra,
                              *over])


def test_ds_config_from_yaml(tmp_path):
    ds = build_ds_config(_cfg(tmp_path, None), world_size=4, dtype=torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 32
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.0 and "optimizer" not in ds


def test_user_json_is_merged(tmp_path):
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
            "train_micro_batch_size_per_gpu": 8, "comms_logger": {"enabled": False}}
    ds = build_ds_config(_cfg(tmp_path, user), world_size=2, dtype=torch.float32)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}
    assert ds["comms_logger"] == {"enabled": False} and ds["bf16"] == {"enabled": False}


@pytest.mark.parametrize("user,names", [
    ({"zero_optimization": {"stage": 3}}, ("zero_optimization.stage", "3", "deepspeed.zero_stage",
                                           "2")),
    ({"train_micro_batch_size_per_gpu": 16}, ("train_micro_batch_size_per_gpu", "16",
                                              "data.batch_size_per_gpu", "8")),
    ({"bf16": {"enabled": True}}, ("bf16.enabled", "True", "deepspeed.precision", "False")),
    ({"gradient_clipping": 1.0}, ("gradient_clipping", "1.0", "optim.clip_grad")),
    ({"optimizer": {"type": "Adam"}}, ("optimizer", "not allowed")),
])
def test_conflicting_user_json_names_both_values(tmp_path, user, names):
    with pytest.raises(ConfigError) as e:
        build_ds_config(_cfg(tmp_path, user), world_size=2, dtype=torch.float32)
    for n in names:
        assert n in str(e.value), (n, str(e.value))


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = nn.Linear(6, 5), nn.Linear(5, 4), \
            nn.Linear(5, 3)

    def forward(self, x):
        h = self.backbone(x)
        return self.dino_head(h).pow(2).sum() * 10 + self.ibot_head(h).sum() * 1e-3


def test_torch_engine_per_module_clip_matches_torch():
    torch.manual_seed(0)
    m = _Student()
    ref = _Student()
    ref.load_state_dict(m.state_dict())
    groups = [{"params": list(m.parameters()), "lr": 0.0, "weight_decay": 0.0,
               "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False,
               "is_backbone": False}]
    eng = TorchStudent(m, groups, load_config(None, []),
                       DistInfo(0, 1, 0, torch.device("cpu"), False), torch.float32)
    x = torch.randn(7, 6)
    eng.backward(eng(x))
    ref(x).backward()
    norms = eng.clip_grad_norms(0.5)
    for name in ("backbone", "dino_head", "ibot_head"):
        mod = getattr(ref, name)
        n = torch.nn.utils.clip_grad_norm_(mod.parameters(), 0.5)
        assert norms[name] == pytest.approx(float(n), rel=1e-6)
        for a, b in zip(getattr(m, name).parameters(), mod.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert norms["dino_head"] > 0.5 > norms["ibot_head"]  # one clipped, one left alone


def _frozen_first_checkpoint(tmp_path, dtype=None):
    """A _Student with its first parameter frozen, and a torch-engine checkpoint of it (its
    module state cast to `dtype`, as a run of that precision saves it)."""
    from fastdino.parallel import TORCH_ENGINE_FILE

    torch.manual_seed(0)
    m = _Student()
    first = next(m.parameters())
    first.requires_grad_(False)
    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    module = {k: v if dtype is None else v.to(dtype) for k, v in m.state_dict().items()}
    torch.save({"module": module, "optimizer": {}}, ckpt / TORCH_ENGINE_FILE)
    return m, first, ckpt


def test_check_frozen_params_refuses_a_run_built_from_other_weights(tmp_path):
    """A resume through the universal form keeps the frozen layers' built values
    (optim.frozen_blocks): they must be the checkpoint's, else the run mixes two models."""
    from fastdino.parallel import check_frozen_params

    m, first, ckpt = _frozen_first_checkpoint(tmp_path)
    check_frozen_params(m, ckpt)  # same values: fine
    with torch.no_grad():
        list(m.parameters())[1].add_(1e-3)  # a trained one differs: its value comes from the
    check_frozen_params(m, ckpt)            # optimizer's universal state, not checked
    with torch.no_grad():
        first.mul_(2)
    name = next(n for n, p in m.named_parameters() if p is first)
    with pytest.raises(ValueError, match=rf"frozen parameter '{name}'.*pretrained_weights"):
        check_frozen_params(m, ckpt)


# ------------------------------------------------- checkpoint layouts (which loader reads which)


def _touch(d, *names):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"")


def test_checkpoint_format_from_the_files(tmp_path):
    """Checkpoints written before the layout was recorded in the trainer state: the files say
    which (ZeRO-3 writes per-rank model files; bf16 names the partitions bf16_zero_pp_rank_*;
    ZeRO-0 keeps the whole optimizer in the model file, inside FP16_UnfusedOptimizer's dict in
    bf16)."""
    from fastdino.parallel import TORCH_ENGINE_FILE, checkpoint_format

    cases = {
        "torch": [TORCH_ENGINE_FILE],
        "zero1-2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
        "zero1-2-bf16": ["mp_rank_00_model_states.pt",
                         "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "zero3": ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                  "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "zero3-bf16": ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                       "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"],
    }
    for fmt, files in cases.items():
        _touch(tmp_path / fmt, *files)
        assert checkpoint_format(tmp_path / fmt) == fmt
    w = torch.zeros(2)
    for fmt, opt in (("zero0", {"state": {}, "param_groups": []}),
                     ("zero0-bf16", {"optimizer_state_dict": {}, "fp32_groups": [[w]]})):
        (tmp_path / fmt).mkdir()
        torch.save({"module": {}, "optimizer": opt}, tmp_path / fmt / "mp_rank_00_model_states.pt")
        assert checkpoint_format(tmp_path / fmt) == fmt
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither DeepSpeed checkpoint files"):
        checkpoint_format(tmp_path / "empty")


def test_torch_engine_reads_zero0_bf16_masters_not_the_bf16_module(tmp_path):
    """A bf16 ZeRO-0 DeepSpeed checkpoint holds the bf16 module and, in its optimizer
    (FP16_UnfusedOptimizer), the fp32 masters and the AdamW state over them: a run continuing it
    takes the masters (the bf16 module is their rounding)."""
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    names = [n for n, _ in m.named_parameters()]
    masters = [p.detach().clone() + 1e-4 for p in m.parameters()]  # not bf16-representable
    adam = {i: {"step": torch.tensor(2.0), "exp_avg": torch.full_like(v, 0.1),
                "exp_avg_sq": torch.full_like(v, 0.01)} for i, v in enumerate(masters)}
    group = {"lr": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
             "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
             "differentiable": False, "fused": None, "decoupled_weight_decay": True,
             "names": names, "params": [0, 1]}
    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    torch.save({"module": {n: v.bfloat16() for n, v in zip(names, masters, strict=True)},
                "optimizer": {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 2,
                              "optimizer_state_dict": {"state": adam, "param_groups": [group]},
                              "fp32_groups": [masters]}},
               ckpt / "mp_rank_00_model_states.pt")
    reader = nn.Linear(3, 2)
    eng = TorchStudent(reader, [{"params": list(reader.parameters()), "names": names}],
                       load_config(None, []), DistInfo(0, 1, 0, torch.device("cpu"), False),
                       torch.float32)
    eng.load_checkpoint(str(tmp_path), ckpt.name)
    for p, want in zip(reader.parameters(), masters, strict=True):
        assert torch.equal(p.detach(), want)
        assert torch.equal(eng.optimizer.state[p]["exp_avg"], torch.full_like(want, 0.1))
        assert float(eng.optimizer.state[p]["step"]) == 2.0


def test_check_frozen_params_across_precisions(tmp_path):
    """A bf16 run saves its frozen layers in bf16: a fp32 run resumed from it (built from the
    same weights) holds them unrounded, and is the same model."""
    from fastdino.parallel import check_frozen_params

    m, first, ckpt = _frozen_first_checkpoint(tmp_path, torch.bfloat16)
    check_frozen_params(m, ckpt)  # equal in bf16
    with torch.no_grad():
        first.add_(0.5)  # another model: differs in bf16 too
    with pytest.raises(ValueError, match="frozen parameter"):
        check_frozen_params(m, ckpt)


@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_other_ranks_wait_for_the_universal_conversion_on_the_filesystem(tmp_path, monkeypatch,
                                                                         outcome):
    """A rank other than 0 waits for rank 0's universal conversion by polling its marks, and
    enters the closing all-reduce only after it: a 7B conversion outlasts the process group's
    timeout (DeepSpeed's 10 min), and ranks waiting inside the collective were killed."""
    import threading

    import fastdino.dist as fdist
    import fastdino.parallel as par

    ckpt = tmp_path / "iter_0000010"
    (ckpt / par.UNIVERSAL_DIR).mkdir(parents=True)
    entered = []
    monkeypatch.setattr(fdist, "is_main_process", lambda: False)
    monkeypatch.setattr(fdist, "barrier", lambda: None)

    def all_reduce_max(x):  # the collective: what rank 0 has written by then
        entered.append(sorted(p.name for p in ckpt.rglob("*")))
        return x + (1.0 if outcome == "failed" else 0.0)

    monkeypatch.setattr(fdist, "all_reduce_max", all_reduce_max)

    def rank0():
        if outcome == "done":
            (ckpt / par.UNIVERSAL_DIR / par.ANY_STAGE_MARK).write_text("")
        else:
            (ckpt / ".universal.failed").write_text("OSError: disk full")

    timer = threading.Timer(0.5, rank0)
    timer.start()
    if outcome == "done":
        assert par.universal_checkpoint(ckpt, torch.device("cpu")) == ckpt / par.UNIVERSAL_DIR
        assert par.ANY_STAGE_MARK in entered[0]
    else:
        with pytest.raises(RuntimeError, match="could not convert"):
            par.universal_checkpoint(ckpt, torch.device("cpu"))
        assert ".universal.failed" in entered[0]
    timer.join()


def test_deepspeed_timeout_minutes_reaches_the_process_group(monkeypatch):
    """deepspeed.timeout_minutes is the process group's collective timeout (DeepSpeed's own
    default, 10 min, killed ranks waiting on rank 0's long kNN probe or export)."""
    import datetime

    import fastdino.parallel as par

    seen = []
    monkeypatch.setattr(par, "launched_distributed", lambda: True)
    monkeypatch.setattr(par.fdist, "is_enabled", lambda: False)
    monkeypatch.setattr(par.deepspeed, "init_distributed", lambda **kw: seen.append(kw))
    par.init_distributed(45)
    par.init_distributed(None)
    assert seen[0]["timeout"] == datetime.timedelta(minutes=45) and "timeout" not in seen[1]
    assert load_config(None, ["deepspeed.timeout_minutes=45"]).deepspeed.timeout_minutes == 45
    with pytest.raises(ConfigError, match="deepspeed.timeout_minutes"):
        load_config(None, ["deepspeed.timeout_minutes=0"])
