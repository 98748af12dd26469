"""Attention backends and multi-crop varlen packing, on CPU.

flash-attn cannot run here, so its call sites are exercised with a stand-in module that has
flash-attn's signatures and layouts ([B, N, H, d_h] dense, [T, H, d_h] + cu_seqlens packed) and
computes with the fp32 reference: this checks our transposes, packing and cu_seqlens, not FA itself
(tests/gpu covers the real kernels).
"""

import subprocess
import sys
import types

import pytest
import torch

from fastdino.layers import attn_backend
from fastdino.layers.attn_backend import attention_ref, select_backend, varlen_attention_ref
from fastdino.models import vit_test


def _fake_flash_attn():
    mod = types.ModuleType("flash_attn")
    calls = {"dense": 0, "varlen": 0}

    def flash_attn_func(q, k, v):  # [B, N, H, d_h]
        calls["dense"] += 1
        return attention_ref(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k):  # [T, H, d_h]
        calls["varlen"] += 1
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        return varlen_attention_ref(q, k, v, cu_q)

    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return mod, calls


def _model(**kw):
    torch.manual_seed(0)
    model = vit_test(**kw)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
    return model


def _crops():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, 32, 48, generator=g), torch.randn(5, 3, 16, 32, generator=g)]


def test_varlen_ref_is_block_diagonal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2 * 7 + 3 * 4, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 7, 14, 18, 22, 26], dtype=torch.int32)
    out = varlen_attention_ref(q, k, v, cu)
    dense = attention_ref(*(t[:14].view(2, 7, 2, 8).transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out[:14], dense.transpose(1, 2).reshape(14, 2, 8))
    k2 = k.clone()
    k2[18:22] += 1.0  # another sequence's keys must not matter
    torch.testing.assert_close(varlen_attention_ref(q, k2, v, cu)[:18], out[:18])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train_drop_path"])
def test_packed_crops_equal_per_crop_type(training):
    crops = _crops()
    outs = []
    for pack in (False, True):
        model = _model(attn_impl="torch", drop_path_rate=0.4).train(training)
        for blk in model.blocks:
            blk.attn.pack_crops = pack
        torch.manual_seed(7)  # same RoPE rescales and drop-path subsets in both runs
        outs.append(model.forward_features_list(crops, [None, None]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b["x_prenorm"], a["x_prenorm"], rtol=1e-5, atol=1e-5)


def test_flash_backend_call_sites_with_stand_in(monkeypatch):
    fake, calls = _fake_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    crops = _crops()
    ref = _model(attn_impl="sdpa").eval()
    model = _model(attn_impl="sdpa").eval()
    monkeypatch.setattr(model, "_set_attn_backend", lambda tokens: None)
    for blk in model.blocks:
        blk.attn.backend = "fa2"  # what select_backend gives on a GPU with FA2 installed
    with torch.no_grad():
        expected = ref.forward_features_list(crops, [None, None])
        got = model.forward_features_list(crops, [None, None])  # packed: one varlen per block
        single = model.forward_features(crops[0])  # one crop type: dense flash_attn_func
    assert calls == {"varlen": model.n_blocks, "dense": model.n_blocks}
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b["x_prenorm"], a["x_prenorm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["x_norm_clstoken"], expected[0]["x_norm_clstoken"],
                               rtol=1e-5, atol=1e-5)


def test_select_backend_rules(monkeypatch):
    cpu = torch.device("cpu")
    select_backend.cache_clear()
    assert select_backend("auto", cpu, torch.float32) == "sdpa"
    assert select_backend("sdpa", cpu, torch.bfloat16) == "sdpa"
    assert select_backend("torch", cpu, torch.float32) == "torch"
    monkeypatch.setattr(attn_backend, "flash_attn_versions", lambda: ("fa3", "fa2"))
    select_backend.cache_clear()
    assert select_backend("auto", cpu, torch.bfloat16) == "sdpa"  # flash-attn is CUDA-only
    with pytest.raises(RuntimeError, match="needs CUDA fp16/bf16"):
        select_backend("flash_attn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="auto | sdpa | torch | flash_attn"):
        select_backend("xformers", cpu, torch.float32)
    select_backend.cache_clear()


def test_flash_attn_is_never_imported_at_module_import(tmp_path):
    # A flash_attn that explodes on import: building and running a model on CPU must not touch it.
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('flash_attn was imported')\n")
    code = ("import torch, fastdino.models as m; "
            "x = m.vit_test(attn_impl='auto').eval()(torch.randn(1, 3, 32, 32)); print('ok')")
    env_path = f"{tmp_path}"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_packed_cu_seqlens_are_the_sequence_starts_and_built_once():
    from fastdino.layers.attention import packed_cu_seqlens

    cpu = torch.device("cpu")
    cu = packed_cu_seqlens(((2, 5), (3, 2)), cpu)  # 2 crops of 5 tokens, then 3 of 2
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 10, 12, 14, 16]
    assert packed_cu_seqlens(((2, 5), (3, 2)), cpu) is cu
