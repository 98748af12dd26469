"""gram.teacher_dtype (SPEC.md §1.6): in a bf16 run the frozen Gram teacher holds its Linear /
Conv weights and biases in bf16, the values bf16 autocast casts them to at every forward, so its
outputs under autocast are bit-identical to an fp32 copy's at about half the memory; norms,
LayerScale gammas, tokens and buffers stay as they were. Every path that writes into it (EMA
refresh, checkpoint resume, including an fp32 Gram teacher of an older checkpoint) rounds as
autocast does."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastdino.config import ConfigError, load_config
from fastdino.ema import copy_params
from fastdino.meta_arch import SSLMetaArch

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
BF16 = ["gram.use=true", "gram.it_load_ema_teacher=0", "deepspeed.precision=bf16",
        "model.depth=2", "dino.head.n_prototypes=128", "ibot.head.n_prototypes=128"]
CPU = torch.device("cpu")
# The Linear / Conv weights and biases of the backbone, by name (not by the code's own rule):
# the patch embedding's conv, qkv / proj, both FFN kinds (a LoRA layer's base included)
MATMUL = re.compile(r"(^patch_embed\.proj|\.(qkv|proj|fc1|fc2|w1|w2|w3)(\.base)?)\.(weight|bias)$")

VARIANTS = {
    "vit_test": [],
    "vit_test_fused": ["kernels.impl=triton", "kernels.fuse_pointwise=true"],
    "swiglu_registers": ["model.ffn_layer=swiglu", "model.n_storage_tokens=2"],
    "swiglu_fused": ["model.ffn_layer=swiglu", "kernels.impl=triton",
                     "kernels.fuse_pointwise=true"],
    "lora": ["optim.lora_rank=4"],
}


def _arch(*overrides: str) -> SSLMetaArch:
    return SSLMetaArch(load_config(SMOKE, [*BF16, *overrides]), CPU)


def _randomize(m: nn.Module, seed: int) -> None:
    """Values off the bf16 grid everywhere (the init's zero biases and constant gammas would
    make an fp32 and a bf16 copy trivially alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _patches(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return backbone.forward_features(x)["x_norm_patchtokens"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_gram_teacher_bit_identical_under_autocast(variant, monkeypatch):
    """The bf16-held Gram teacher gives exactly the patches an fp32 copy of the same weights
    gives under bf16 autocast: plain, fused pointwise / Triton RoPE, SwiGLU + registers, LoRA."""
    arch = _arch(*VARIANTS[variant])
    _randomize(arch.teacher.backbone, 0)
    arch.update_gram_teacher(-1)  # it_load_ema_teacher=0: loaded from the EMA teacher
    fp32_copy = copy.deepcopy(arch.teacher.backbone)  # what the Gram teacher was before
    assert {p.dtype for p in fp32_copy.parameters()} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in arch.gram_teacher.parameters())
    fused = []
    if "kernels.fuse_pointwise=true" in VARIANTS[variant]:  # the fused kernels really run
        import fastdino.kernels.layernorm_residual as lnr
        import fastdino.kernels.swiglu as sw

        for mod, name in ((lnr, "layernorm_residual"), (sw, "swiglu")):
            real = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **k: (fused.append(_n),
                                                                               _r(*a, **k))[1])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    got = _patches(arch.gram_teacher, x)
    want = _patches(fp32_copy, x)
    assert torch.equal(got, want)
    if "kernels.fuse_pointwise=true" in VARIANTS[variant]:
        assert "layernorm_residual" in fused
        assert ("swiglu" in fused) == ("model.ffn_layer=swiglu" in VARIANTS[variant])


def test_parameter_dtypes_and_memory():
    """bf16: the patch embedding conv, qkv / proj and the FFN linears (weights and biases);
    fp32: cls / storage / mask tokens, LayerNorms, LayerScale gammas; buffers (RoPE periods, the
    qkv bias mask) keep their dtype. The parameters + buffers take about half the bytes."""
    arch = _arch()
    ref = SSLMetaArch(load_config(SMOKE, [*BF16, "gram.teacher_dtype=fp32"]), CPU)
    got = dict(arch.gram_teacher.named_parameters())
    bf16 = sorted(n for n, p in got.items() if p.dtype == torch.bfloat16)
    assert bf16 == sorted(n for n in got if MATMUL.search(n))
    assert "patch_embed.proj.bias" in bf16 and "blocks.1.mlp.fc2.weight" in bf16
    for n in ("cls_token", "storage_tokens", "mask_token", "blocks.0.norm1.weight",
              "blocks.0.ls1.gamma", "norm.bias"):
        assert got[n].dtype == torch.float32, n
    assert not any(p.requires_grad for p in got.values())
    want_buffers = {n: b.dtype for n, b in arch.teacher.backbone.named_buffers()}
    assert {n: b.dtype for n, b in arch.gram_teacher.named_buffers()} == want_buffers
    assert {p.dtype for p in ref.gram_teacher.parameters()} == {torch.float32}

    def nbytes(m):
        return sum(t.nbytes for t in (*m.parameters(), *m.buffers()))

    assert nbytes(arch.gram_teacher) < 0.55 * nbytes(ref.gram_teacher)


@pytest.mark.parametrize("setting, precision, want", [
    ("auto", "bf16", torch.bfloat16), ("auto", "fp32", torch.float32),
    ("fp32", "bf16", torch.float32), ("bf16", "fp32", torch.bfloat16)])
def test_teacher_dtype_setting(setting, precision, want):
    """auto = the run's precision; fp32 / bf16 as named. An fp32 run with a bf16 Gram teacher
    computes the Gram forward under bf16 autocast (no dtype clash with fp32 crops), and so does
    a CPU bf16 run (whose teacher forward has no autocast of its own)."""
    arch = _arch(f"gram.teacher_dtype={setting}", f"deepspeed.precision={precision}")
    assert arch.gram_teacher.patch_embed.proj.weight.dtype == want
    _randomize(arch.teacher.backbone, 2)
    arch.update_gram_teacher(-1)
    g = torch.Generator().manual_seed(3)
    crops = torch.randn(4, 3, 64, 64, generator=g)
    batch = SimpleNamespace(global_crops=crops, gram_crops=None, n_masked_patches=3,
                            mask_indices=torch.tensor([0, 5, 20]))
    out = arch.teacher_output(batch, teacher_temp=0.04)
    ref = copy.deepcopy(arch.teacher.backbone)
    want_patches = (_patches(ref, crops) if want == torch.bfloat16
                    else ref.forward_features(crops)["x_norm_patchtokens"])
    assert torch.equal(out["gram_patches"], want_patches)


def test_refresh_from_ema_teacher_rounds_as_autocast():
    """A refresh copies the EMA teacher: fp32 parameters exactly, the bf16-held ones rounded to
    nearest even (what autocast's cast gives: x.to(bf16))."""
    arch = _arch("gram.it_load_ema_teacher=3")
    _randomize(arch.teacher.backbone, 4)
    assert arch.update_gram_teacher(2)
    teacher = dict(arch.teacher.backbone.named_parameters())
    for n, p in arch.gram_teacher.named_parameters():
        assert p.dtype == (torch.bfloat16 if MATMUL.search(n) else torch.float32), n
        assert torch.equal(p, teacher[n].to(p.dtype)), n


def test_gram_ckpt_loads_rounded_as_autocast(tmp_path):
    """gram.ckpt (here an fp32 backbone file) loads into the bf16-held Gram teacher rounded to
    nearest even, the fp32 parameters exactly."""
    src = _arch("gram.teacher_dtype=fp32").teacher.backbone
    _randomize(src, 7)
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    arch = _arch(f"gram.ckpt={tmp_path / 'backbone.pth'}")
    want = dict(src.named_parameters())
    for n, p in arch.gram_teacher.named_parameters():
        assert p.dtype == (torch.bfloat16 if MATMUL.search(n) else torch.float32), n
        assert torch.equal(p, want[n].to(p.dtype)), n


def test_copy_params_casts_each_tensor_to_its_own_dtype():
    """A chunk that starts with a bf16 weight and goes on with an fp32 LayerNorm: the norm is
    copied exactly (casting the chunk to its first tensor's dtype rounded it to bf16)."""
    g = torch.Generator().manual_seed(5)
    src = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    dst = copy.deepcopy(src)
    dst[0].to(torch.bfloat16)
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    copy_params(dst, src)
    for (n, d), s in zip(dst.named_parameters(), src.parameters(), strict=True):
        assert d.dtype == (torch.bfloat16 if n.startswith("0.") else torch.float32)
        assert torch.equal(d, s.detach().to(d.dtype)), n


def test_resume_checkpoint_with_fp32_gram_teacher(tmp_path):
    """A checkpoint written with an fp32 Gram teacher (an older fastdino, or an fp32 run)
    resumes into a bf16-held one (rounded as autocast would, norms exact); a bf16 one is saved
    in its stored dtypes (half the bytes) and round-trips exactly."""
    old = SSLMetaArch(load_config(SMOKE, [*BF16, "gram.teacher_dtype=fp32"]), CPU)
    _randomize(old.gram_teacher, 6)
    st = old.state_for_checkpoint()
    st["iteration"] = 7
    torch.save(st, tmp_path / "old.pt")
    arch = _arch()
    arch.load_from_checkpoint(torch.load(tmp_path / "old.pt", weights_only=True))
    saved = dict(old.gram_teacher.named_parameters())
    for n, p in arch.gram_teacher.named_parameters():
        assert p.dtype == (torch.bfloat16 if MATMUL.search(n) else torch.float32), n
        assert torch.equal(p, saved[n].to(p.dtype)), n
    new = arch.state_for_checkpoint()
    assert new["gram_teacher"]["blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert (sum(t.nbytes for t in new["gram_teacher"].values())
            < 0.55 * sum(t.nbytes for t in st["gram_teacher"].values()))
    again = _arch()
    again.load_from_checkpoint({**new, "iteration": 7})
    for k, v in again.gram_teacher.state_dict().items():
        assert v.dtype == new["gram_teacher"][k].dtype and torch.equal(v, new["gram_teacher"][k])


def test_teacher_dtype_config_validation():
    for ok in ("auto", "fp32", "bf16"):
        assert load_config(None, [f"gram.teacher_dtype={ok}"]).gram.teacher_dtype == ok
    with pytest.raises(ConfigError, match=r"gram\.teacher_dtype.*auto \| fp32 \| bf16"):
        load_config(None, ["gram.teacher_dtype=fp16"])
