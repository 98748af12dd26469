"""The transformer block's list-of-crop-types forward against a per-crop-type reference.

Without drop path the block keeps its residual stream as one [T, D] tensor (block._forward_flat);
with drop path it subsets samples per crop type. Both must equal running every crop type through
the same modules on its own (LayerNorm, the linears, LayerScale and the adds are row-wise; the
attention core is per crop type in both), values and gradients.
"""

import pytest
import torch

from fastdino.layers.block import SelfAttentionBlock
from fastdino.layers.drop_path import add_residual


def _block(drop_path: float = 0.0) -> SelfAttentionBlock:
    torch.manual_seed(0)
    blk = SelfAttentionBlock(32, 4, drop_path=drop_path, attn_impl="torch")
    for m in blk.modules():
        if hasattr(m, "reset_parameters") and m is not blk:
            m.reset_parameters()
    blk.attn.qkv.reset_bias_mask()
    with torch.no_grad():  # LayerScale 1e-5 would hide the branches
        blk.ls1.gamma.uniform_(0.5, 1.5)
        blk.ls2.gamma.uniform_(0.5, 1.5)
    return blk


def _crops(requires_grad: bool = False):
    g = torch.Generator().manual_seed(1)
    x_list = [torch.randn(2, 1 + 9, 32, generator=g), torch.randn(3, 1 + 4, 32, generator=g)]
    ropes = []
    for n in (9, 4):
        ang = torch.rand(n, 8, generator=g) * 6
        ropes.append((torch.sin(ang), torch.cos(ang)))
    return [x.requires_grad_(requires_grad) for x in x_list], ropes


def _reference(blk: SelfAttentionBlock, x_list, ropes, subsets=None):
    """Each crop type on its own, the branch on the subset `subsets[branch][i]` (None: all)."""
    out = []
    for i, (x, rope) in enumerate(zip(x_list, ropes, strict=True)):
        idx, scale = (None, 1.0) if subsets is None else subsets[0][i]
        xa = x if idx is None else x[idx]
        a = blk.ls1(blk.attn.proj(blk.attn.compute_attention(blk.attn.qkv(blk.norm1(xa)), rope)))
        y = add_residual(x, a, idx, scale)
        idx, scale = (None, 1.0) if subsets is None else subsets[1][i]
        yf = y if idx is None else y[idx]
        out.append(add_residual(y, blk.ls2(blk.mlp(blk.norm2(yf))), idx, scale))
    return out


@pytest.mark.parametrize("mode", ["eval", "train_no_drop_path"])
def test_flat_stream_matches_per_crop_type(mode):
    blk = _block(0.0)
    blk.train(mode != "eval")
    x_list, ropes = _crops(requires_grad=True)
    out = blk(x_list, ropes)
    ref_in = [x.detach().clone().requires_grad_() for x in x_list]
    ref = _reference(blk, ref_in, ropes)
    assert [o.shape for o in out] == [x.shape for x in x_list]
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    w = [torch.randn(o.shape) for o in out]
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, w, strict=True)), x_list)
    grads_ref = torch.autograd.grad(sum((r * c).sum() for r, c in zip(ref, w, strict=True)), ref_in)
    for g, gr in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_drop_path_subsets_match_per_crop_type(monkeypatch):
    blk = _block(0.5).train()
    x_list, ropes = _crops()
    drawn = []  # record the block's subsets, replay them in the reference
    from fastdino.layers import block as block_mod

    orig = block_mod.sample_subset
    monkeypatch.setattr(block_mod, "sample_subset",
                        lambda *a: drawn.append(orig(*a)) or drawn[-1])
    torch.manual_seed(5)
    out = blk(x_list, ropes)
    assert len(drawn) == 4  # 2 branches x 2 crop types
    assert any(idx.numel() < x.shape[0] for (idx, _), x in zip(drawn, x_list * 2, strict=True))
    ref = _reference(blk, x_list, ropes, subsets=[drawn[:2], drawn[2:]])
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    # the same subsets handed in by the caller (the backbone's pre-drawn ones): same output,
    # nothing drawn
    given = blk(x_list, ropes, subsets=(drawn[:2], drawn[2:]))
    assert len(drawn) == 4
    for o, r in zip(given, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_draw_subsets_are_uniform_subsets_of_the_right_size():
    from fastdino.layers.drop_path import draw_subsets, subset_size

    torch.manual_seed(0)
    draws = draw_subsets(10, 0.3, 400, torch.device("cpu"))
    assert len(draws) == 400 and subset_size(10, 0.3) == 7
    counts = torch.zeros(10)
    for idx, scale in draws:
        assert idx.shape == (7,) and scale == 10 / 7
        assert idx.unique().numel() == 7 and 0 <= int(idx.min()) and int(idx.max()) < 10
        counts[idx] += 1
    # every sample kept with probability 0.7: 280 of 400 expected, sd ~9
    assert (counts - 280).abs().max() < 50, counts
    assert len({tuple(i.tolist()) for i, _ in draws}) > 300  # independent draws


def test_backbone_hands_each_block_its_own_predrawn_subsets(monkeypatch):
    """Training with drop path: the backbone draws every block's subsets at once and hands each
    block its own (attention and FFN branch, per crop type, sizes and scales of sample_subset);
    in eval it draws none. (test_drop_path_subsets_match_per_crop_type checks that a block runs
    exactly the subsets it is given.)"""
    from fastdino.config import ModelConfig
    from fastdino.models.backbones import build_backbone

    torch.manual_seed(0)
    model = build_backbone(ModelConfig(arch="vit_test", drop_path_rate=0.5,
                                       layerscale_init=1.0)).train()
    received = []
    for blk in model.blocks:
        orig = blk.forward

        def spy(x_list, rope_list, subsets=None, _orig=orig):
            received.append(subsets)
            return _orig(x_list, rope_list, subsets)
        monkeypatch.setattr(blk, "forward", spy)
    g = torch.randn(4, 3, 32, 32)
    loc = torch.randn(6, 3, 16, 16)
    model.forward_features_list([g, loc], [None, None])
    assert len(received) == len(model.blocks)
    flat = [idx for attn, ffn in received for branch in (attn, ffn) for idx, _ in branch]
    assert all(idx is not None for idx in flat)
    for attn, ffn in received:  # int(4 * 0.5), int(6 * 0.5) samples; scale b / subset
        assert [(idx.numel(), s) for idx, s in attn] == [(2, 2.0), (3, 2.0)]
        assert [(idx.numel(), s) for idx, s in ffn] == [(2, 2.0), (3, 2.0)]
    # eval: no subsets drawn, every block runs every sample
    received.clear()
    model.eval()
    model.forward_features_list([g, loc], [None, None])
    assert received == [None] * len(model.blocks)
