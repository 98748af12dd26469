"""model.pos_embed_rope_dtype: the RoPE periods buffer and sin/cos tables in bf16 (the official
trainer's: its build_model never passes the config key, so DinoVisionTransformer's default bf16
applies) or fp32 (the official hub's inference setting), as facebookresearch/dinov3
`dinov3/layers/rope_position_encoding.py` does it; the config key and its validation; state dicts
that carry the periods (used as they are, never recomputed); the export note for Hugging Face /
timm, which rebuild the periods in fp32."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fastdino.config import ConfigError, ModelConfig, load_config
from fastdino.layers.rope_position_encoding import RopePositionEmbedding
from fastdino.models.backbones import build_backbone, vit_test
from fastdino.models.state_dict_io import load_backbone_state_dict

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OfficialRope(torch.nn.Module):
    """Transcription of the official RopePositionEmbedding (base parametrisation, "separate"
    coordinates, rescale augmentation; shift / jitter unused by every DINOv3 config)."""

    def __init__(self, embed_dim, *, num_heads, base, rescale_coords, dtype):
        super().__init__()
        self.D_head = embed_dim // num_heads
        self.base, self.rescale_coords, self.dtype = base, rescale_coords, dtype
        self.register_buffer("periods", torch.empty(self.D_head // 4, dtype=dtype),
                             persistent=True)
        self._init_weights()

    def forward(self, *, H, W):
        dd = {"device": self.periods.device, "dtype": self.dtype}
        coords_h = torch.arange(0.5, H, **dd) / H
        coords_w = torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)
        coords = coords.flatten(0, 1)
        coords = 2.0 * coords - 1.0
        if self.training and self.rescale_coords is not None:
            rescale_max = np.log(self.rescale_coords)
            rescale_min = -rescale_max
            rescale_hw = torch.empty(1, **dd).uniform_(rescale_min, rescale_max).exp()
            coords *= rescale_hw
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]
        angles = angles.flatten(1, 2)
        angles = angles.tile(2)
        cos = torch.cos(angles)
        sin = torch.sin(angles)
        return (sin, cos)

    def _init_weights(self):
        device, dtype = self.periods.device, self.dtype
        periods = self.base ** (
            2 * torch.arange(self.D_head // 4, device=device, dtype=dtype) / (self.D_head // 2))
        self.periods.data = periods


# (embed_dim, num_heads): d_h 64 (ViT-S..H+), 128 (7B) and 48 (d_h/2 = 24: a rounded division)
SHAPES = [(384, 6), (256, 2), (96, 2)]


@pytest.mark.parametrize("rope_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("dims", SHAPES)
def test_periods_and_tables_are_the_official_ones(rope_dtype, dims):
    """bf16 reproduces the official bf16 module bit for bit (periods buffer in bf16, tables from
    bf16 arithmetic, handed out as exact fp32 copies); fp32 is today's computation, which is the
    official fp32 one. Eval (no draw) and training (the same rescale draw from the same seed)."""
    D, heads = dims
    ours = RopePositionEmbedding(D, heads, base=100.0, rescale_coords=2.0, dtype=rope_dtype)
    ours._init_weights()
    ref = OfficialRope(D, num_heads=heads, base=100.0, rescale_coords=2.0,
                       dtype=_DTYPES[rope_dtype])
    assert ours.periods.dtype == _DTYPES[rope_dtype]
    assert torch.equal(ours.periods, ref.periods)
    for train in (False, True):
        ours.train(train), ref.train(train)
        torch.manual_seed(7)
        want = ref(H=5, W=7)
        torch.manual_seed(7)
        got = ours(H=5, W=7)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == torch.float32  # the rotation runs in fp32 (module docstring)
            assert torch.equal(g, w.float())
    # all blocks' draws at once == one official call per block, in order
    ours.train(), ref.train()
    torch.manual_seed(3)
    want = [ref(H=4, W=3) for _ in range(3)]
    torch.manual_seed(3)
    sin, cos = ours(H=4, W=3, n_draws=3)
    for i, (ws, wc) in enumerate(want):
        assert torch.equal(sin[i], ws.float()) and torch.equal(cos[i], wc.float())


@pytest.mark.parametrize("rope_dtype", ["bf16", "fp32"])
def test_tables_ignore_autocast_and_a_wrapper_cast_buffer(rope_dtype):
    """Autocast around the student's forward (fastdino's bf16 engine) must not change the tables
    (it would run exp in fp32 and promote the bf16 chain), and the compute dtype is the
    module's, not its buffer's: an fp32 module whose buffer a wrapper cast to bf16 (DeepSpeed
    bf16) computes in fp32 with the rounded periods, as the hub does with the released ones."""
    rope = RopePositionEmbedding(64, 1, rescale_coords=2.0, dtype=rope_dtype)
    rope._init_weights()
    rope.train()
    torch.manual_seed(0)
    plain = rope(H=6, W=4)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = rope(H=6, W=4)
    assert all(torch.equal(a, b) for a, b in zip(plain, under, strict=True))
    if rope_dtype == "fp32":
        rope.eval()
        rounded = rope.periods.bfloat16()
        ref = OfficialRope(64, num_heads=1, base=100.0, rescale_coords=2.0, dtype=torch.float32)
        ref.periods.copy_(rounded.float())
        rope.periods = rounded  # what module.bfloat16() does to the buffer
        got = rope(H=6, W=4)
        assert all(torch.equal(g, w) for g, w in zip(got, ref.eval()(H=6, W=4), strict=True))


def test_config_key_default_and_validation():
    """Training configs run bf16 (the official trainer's), a model section read for evaluation /
    export (not whole-config validated) keeps null = fp32 (the hub's); a bad value is one line
    naming the key and what is allowed."""
    cfg = load_config(None, ["model.arch=vit_test"])
    assert cfg.model.pos_embed_rope_dtype == "bf16"
    assert cfg.to_dict()["model"]["pos_embed_rope_dtype"] == "bf16"  # the run's config.yaml
    assert build_backbone(cfg.model).rope_embed.periods.dtype == torch.bfloat16
    fp32 = load_config(None, ["model.arch=vit_test", "model.pos_embed_rope_dtype=fp32"])
    assert build_backbone(fp32.model).rope_embed.periods.dtype == torch.float32
    section = ModelConfig(arch="vit_test")
    section.validate()
    assert section.pos_embed_rope_dtype is None
    assert build_backbone(section).rope_embed.periods.dtype == torch.float32
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.pos_embed_rope_dtype=fp16"])
    msg = str(e.value)
    assert "\n" not in msg and "model.pos_embed_rope_dtype" in msg and "'fp16'" in msg
    assert "bf16 | fp32 | null" in msg
    with pytest.raises(ValueError, match="pos_embed_rope_dtype = 'half' is invalid"):
        vit_test(rope_dtype="half")


def test_state_dicts_carry_the_periods_as_they_are(tmp_path):
    """A bf16 backbone saves bf16 periods (the official layout); reloaded into a bf16 backbone it
    gives the same outputs; into an fp32 one (the hub's way of loading released files) the
    rounded periods are used as they are, not recomputed; a meta build + init gives the same
    bf16 periods as a direct one."""
    torch.manual_seed(0)
    src = vit_test(rope_dtype="bf16", layerscale_init=0.5).eval()
    sd = src.state_dict()
    assert sd["rope_embed.periods"].dtype == torch.bfloat16
    torch.save(sd, tmp_path / "bb.pth")
    loaded = torch.load(tmp_path / "bb.pth", weights_only=True)
    again = vit_test(rope_dtype="bf16", layerscale_init=0.5).eval()
    load_backbone_state_dict(again, loaded)
    hub = vit_test(layerscale_init=0.5).eval()  # fp32
    load_backbone_state_dict(hub, loaded)
    assert torch.equal(hub.rope_embed.periods, loaded["rope_embed.periods"].float())
    fresh_fp32 = vit_test().rope_embed.periods
    assert not torch.equal(hub.rope_embed.periods, fresh_fp32)  # rounded: kept, not rebuilt
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a, b = (m.forward_features(x)["x_norm_patchtokens"] for m in (src, again))
    assert torch.equal(a, b)
    ref = OfficialRope(32, num_heads=2, base=100.0, rescale_coords=2.0, dtype=torch.float32)
    ref.periods.copy_(loaded["rope_embed.periods"].float())
    got = hub.rope_embed(H=2, W=3)
    assert all(torch.equal(g, w) for g, w in zip(got, ref.eval()(H=2, W=3), strict=True))
    meta = vit_test(rope_dtype="bf16", device="meta").to_empty(device="cpu")
    meta.init_weights()
    assert meta.rope_embed.periods.dtype == torch.bfloat16
    assert torch.equal(meta.rope_embed.periods, sd["rope_embed.periods"])


def test_export_to_timm_names_the_periods_it_cannot_carry(caplog):
    """timm (and Hugging Face) rebuild the periods in fp32 from the base and store none: the
    export of a backbone with bf16-rounded periods says so in one line; fp32 ones say nothing."""
    from fastdino.models.timm_convert import timm_config_from_backbone

    with caplog.at_level(logging.WARNING, logger="fastdino.models"):
        timm_config_from_backbone(vit_test())
    assert "rope_embed.periods" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fastdino.models"):
        timm_config_from_backbone(vit_test(rope_dtype="bf16"))
    lines = [r.getMessage() for r in caplog.records if "rope_embed.periods" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "rope_temperature=100" in lines[0] and "timm" in lines[0]
    # the largest relative bf16 rounding of 100^(j/8), j < 8 (vit_test: d_h 16), as a percentage
    j = torch.arange(4, dtype=torch.float32)
    p = 100.0 ** (2 * j / 8)
    assert f"{((p.bfloat16().float() - p) / p).abs().max().item():.3%}" in lines[0]
