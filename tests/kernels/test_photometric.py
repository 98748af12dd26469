"""kernels/photometric.py: the reference against the torch loader's own PIL / numpy ops (bit for
bit), and the Triton kernel against the reference (bit for bit), op by op and in every jitter
order, on odd shapes, tiny crops (edge-padded blur) and DINOv3 crop sizes; and the compiled kernel
free of FMA contraction and approximate division (what bit-exactness on a GPU rests on)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastdino.kernels import photometric as K
from PIL import Image, ImageEnhance

from fastdino.data import transforms as T

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parents[2]
OPS = (K.BRIGHTNESS, K.CONTRAST, K.SATURATION, K.HUE)


def _crops(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Colourful gradients plus noise (every op moves them; saturated and grey pixels both)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                         255 - (xx + yy) * 255 // max(h + w - 2, 1)], -1)
        noise = g.integers(-40, 41, base.shape) if i % 2 == 0 else g.integers(0, 256, base.shape)
        img = np.clip(base + noise, 0, 255) if i % 2 == 0 else noise
        out.append(img.astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def _params(n: int, seed: int, orders=None, all_ops: bool = False) -> torch.Tensor:
    """Random per-crop parameters drawn as the plan draws them; `orders` fixes the jitter order
    per crop; all_ops turns every op on."""
    g = np.random.default_rng(seed)
    p = np.zeros((n, K.N_PARAMS), dtype=np.float32)
    for i in range(n):
        if all_ops or orders is not None or g.random() < 0.8:
            order = orders[i % len(orders)] if orders is not None else g.permutation(4)
            hue = g.choice([-1, 1]) * g.uniform(0.004, 0.1)
            factors = (g.uniform(0.6, 1.4), g.uniform(0.6, 1.4), g.uniform(0.8, 1.2),
                       int(hue * 255))
            for k, op in enumerate(order):
                p[i, K.OP0 + k] = OPS[op]
                p[i, K.F0 + k] = factors[op]
        for col, prob in ((K.GRAY, 0.3), (K.BLUR, 0.6), (K.SOLARIZE, 0.3), (K.FLIP, 0.5)):
            p[i, col] = all_ops or g.random() < prob
        p[i, K.TAP0:K.TAP0 + 9] = T.gaussian_kernel1d(9, float(g.uniform(0.1, 2.0))).numpy()
    return torch.from_numpy(p)


def _torch_loader(crop: np.ndarray, row: np.ndarray, normalize: bool = True):
    """The truth: the torch loader's own ops (transforms.py) on one crop, driven by `row`: flip
    first (its geometric step), the jitter in slot order, greyscale, blur, solarize, normalise."""
    img = Image.fromarray(crop)
    flip = row[K.FLIP] > 0.5
    if flip and normalize:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for k in range(4):
        op, f = int(row[K.OP0 + k]), float(row[K.F0 + k])
        if op == K.BRIGHTNESS:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif op == K.CONTRAST:
            img = ImageEnhance.Contrast(img).enhance(f)
        elif op == K.SATURATION:
            img = ImageEnhance.Color(img).enhance(f)
        elif op == K.HUE:
            img = T.adjust_hue_steps(img, int(f))
    if row[K.GRAY] > 0.5:
        img = T.grayscale(img)
    if row[K.BLUR] > 0.5:
        taps = row[K.TAP0:K.TAP0 + 9]
        if flip and not normalize:  # the kernel blurs the unflipped crop as the flipped one
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = _blur_with_taps(img, taps)
        if flip and not normalize:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if row[K.SOLARIZE] > 0.5:
        img = T.solarize(img, 128)
    if not normalize:
        return torch.from_numpy(np.asarray(img).copy())
    mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std  # DataAugmentationDINO.normalize
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _blur_with_taps(img: Image.Image, taps: np.ndarray) -> Image.Image:
    """transforms.gaussian_blur with the row's taps (gaussian_kernel1d of its sigma)."""
    real = T.gaussian_kernel1d
    T.gaussian_kernel1d = lambda size, sigma: torch.from_numpy(taps.copy())
    try:
        return T.gaussian_blur(img, 1.0)
    finally:
        T.gaussian_kernel1d = real


def _truth(x: torch.Tensor, p: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    return torch.stack([_torch_loader(c, r, normalize)
                        for c, r in zip(x.numpy(), p.numpy(), strict=True)])


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    bad = got != want
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values differ, max "
                           f"{(got.double() - want.double()).abs().max().item()}")


# ---- the reference is the torch loader's ops


@pytest.mark.parametrize("h,w", [(13, 17), (24, 24), (3, 4), (32, 9)])
def test_ref_equals_the_torch_loader(h, w):
    x, p = _crops(12, h, w, seed=h * w), _params(12, seed=h + w)
    _assert_equal(K.photometric_ref(x.clone(), p, MEAN, STD), _truth(x, p), f"{h}x{w}")


def test_ref_equals_the_torch_loader_in_every_jitter_order():
    orders = list(itertools.permutations(range(4)))
    x, p = _crops(24, 20, 23, seed=3), _params(24, seed=4, orders=orders)
    _assert_equal(K.photometric_ref(x.clone(), p, MEAN, STD), _truth(x, p), "24 orders")


def test_ref_distorted_uint8_equals_the_torch_loader():
    x, p = _crops(10, 15, 18, seed=5), _params(10, seed=6, all_ops=True)
    _assert_equal(K.photometric_ref(x.clone(), p, MEAN, STD, normalize=False),
                  _truth(x, p, normalize=False), "normalize=False")


def test_ref_hue_equals_pil_on_a_colour_cube():
    """Every 4th level of each channel (2^18 colours), three shifts: the HSV round trip's fp32 /
    double roundings are where an implementation would slip (all 2^24 colours at 8 shifts were
    checked once, 2026-11-27)."""
    v = np.arange(0, 256, 4, dtype=np.uint8)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(512, 512, 3)
    for steps in (1, -25, 128):
        want = np.asarray(T.adjust_hue_steps(Image.fromarray(cube), steps))
        got = K.hue_shift_ref(torch.from_numpy(cube)[None], torch.tensor([float(steps)]))[0]
        _assert_equal(got, torch.from_numpy(want.copy()), f"hue steps={steps}")


def test_ref_detects_a_wrong_order():
    """The truth is order-sensitive here (else the order tests could not fail)."""
    x = _crops(4, 16, 16, seed=7)
    p = _params(4, seed=8, orders=[(0, 1, 2, 3)])
    q = p.clone()
    q[:, K.OP0:K.OP0 + 4] = p[:, K.OP0:K.OP0 + 4].flip(1)
    q[:, K.F0:K.F0 + 4] = p[:, K.F0:K.F0 + 4].flip(1)
    assert not torch.equal(K.photometric_ref(x.clone(), p, MEAN, STD),
                           K.photometric_ref(x.clone(), q, MEAN, STD))


def _blur_flip_case():
    """64 crops blurred and flipped, and the crops whose blur-then-flip differs from the torch
    loader's flip-then-blur (the fp32 row sum in mirrored tap order: ~5 values in 786k here)."""
    x, p = _crops(64, 64, 64, seed=0), _params(64, seed=0)
    p[:, K.OP0:K.F0 + 4] = 0
    p[:, K.BLUR], p[:, K.GRAY], p[:, K.SOLARIZE], p[:, K.FLIP] = 1, 0, 0, 1
    flipped_first = K.photometric_ref(x.clone(), p, MEAN, STD)
    q = p.clone()
    q[:, K.FLIP] = 0
    flipped_last = K.photometric_ref(x.clone(), q, MEAN, STD).flip(3)
    differ = (flipped_first != flipped_last).flatten(1).any(1)
    return x, p, differ


def test_blur_of_a_flipped_crop_is_not_the_flip_of_the_blur():
    """Why the kernel mirrors its row taps for flipped crops: flipping last would not be the
    torch loader's on some pixels (and the ref, with the mirrored taps, is: the tests above)."""
    _, _, differ = _blur_flip_case()
    assert differ.any()


# ---- the kernel is the reference


@pytest.mark.parametrize("h,w,n", [(13, 17, 10), (3, 4, 6), (24, 31, 8), (40, 24, 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_equals_ref(h, w, n, normalize):
    x, p = _crops(n, h, w, seed=11 + h), _params(n, seed=w)
    want = K.photometric_ref(x.clone(), p, MEAN, STD, normalize)
    got = K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD, normalize)
    _assert_equal(got, want, f"{h}x{w} normalize={normalize}")


def test_kernel_equals_ref_in_every_jitter_order():
    orders = list(itertools.permutations(range(4)))
    x, p = _crops(24, 12, 14, seed=12), _params(24, seed=13, orders=orders)
    p[:, K.GRAY] = 0  # keep the jitter visible at the end
    _assert_equal(K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD),
                  K.photometric_ref(x.clone(), p, MEAN, STD), "24 orders")


@pytest.mark.parametrize("side", [96, 224] if DEVICE == "cuda" else [96])
def test_kernel_equals_ref_at_dinov3_crop_sizes(side):
    """Local (96) and global (224) crops; under the interpreter only the local size (slow)."""
    x, p = _crops(4, side, side, seed=side), _params(4, seed=side, all_ops=True)
    _assert_equal(K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD),
                  K.photometric_ref(x.clone(), p, MEAN, STD), f"{side}x{side}")


def test_kernel_blurs_a_flipped_crop_as_the_torch_loader():
    """The crops where the blur's tap order shows (see _blur_flip_case): the kernel's mirrored row
    sum must give the reference's values there."""
    x, p, differ = _blur_flip_case()
    x, p = x[differ], p[differ]
    _assert_equal(K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD),
                  K.photometric_ref(x.clone(), p, MEAN, STD), "flipped blur")


def test_kernel_works_in_place_and_checks_its_inputs():
    x, p = _crops(3, 8, 8, seed=14), _params(3, seed=15, all_ops=True)
    buf = x.clone().to(DEVICE)
    got = K.photometric_(buf, p.to(DEVICE), MEAN, STD, normalize=False)
    assert got.data_ptr() == buf.data_ptr()
    _assert_equal(got, K.photometric_ref(x.clone(), p, MEAN, STD, normalize=False), "in place")
    with pytest.raises(ValueError, match="uint8"):
        K.photometric_(x.float().to(DEVICE), p.to(DEVICE), MEAN, STD)
    with pytest.raises(ValueError, match=r"float32 \[N, 21\]"):
        K.photometric_(x.clone().to(DEVICE), p[:2].to(DEVICE), MEAN, STD)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD,
                       out=torch.empty(3, 3, 8, 8, dtype=torch.float64, device=DEVICE))
    empty = K.photometric_(x[:0].clone().to(DEVICE), p[:0].to(DEVICE), MEAN, STD)
    assert empty.shape == (0, 3, 8, 8)


# ---- what the GPU's bit-exactness rests on: the compiled code


def test_compiled_kernel_has_no_fma_and_no_approximate_division():
    """Compiled for sm_90 as the launcher launches it (enable_fp_fusion=False): no fma, no
    div.full / div.approx / rcp.approx in the PTX; a compile with fusion on shows fma (so the
    check can fail)."""
    code = """
import re, sys, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.compile_report import _full_signature
from fastdino.kernels import photometric as K
out = {}
for spec in K.compile_specs():
    for fusion in (False, True):
        src = ASTSource(fn=spec.fn, signature=_full_signature(spec),
                        constexprs=dict(spec.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={
            "num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": fusion})
        ptx = k.asm["ptx"]
        out[f"{spec.name}|{fusion}|{spec.enable_fp_fusion}"] = {
            p: len(re.findall(p, ptx)) for p in (r"\\bfma\\.", r"div\\.full", r"div\\.approx",
                                                 r"rcp\\.approx", r"div\\.rn\\.f32")}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", "import bench._paths\n" + code], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    counts = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(counts) == 4
    for key, c in counts.items():
        name, fusion, shipped = key.split("|")
        assert shipped == "False", f"{name}: the launcher must launch with enable_fp_fusion=False"
        assert c[r"div\.rn\.f32"] > 0, (key, c)  # the divisions are there, correctly rounded
        assert c[r"div\.full"] == c[r"div\.approx"] == c[r"rcp\.approx"] == 0, (key, c)
        if fusion == "False":
            assert c[r"\bfma\."] == 0, (key, c)
        else:
            assert c[r"\bfma\."] > 0, (key, c)


def test_kernel_hue_on_a_colour_cube():
    """The kernel's HSV round trip (the fp32 / double mix) against the reference, which equals
    Pillow on the cube (test above): every 4th level per channel (2^18 colours), three shifts,
    no other op."""
    step = 4
    v = np.arange(0, 256, step, dtype=np.uint8)
    cube = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 64, 64, 3)
    x = torch.from_numpy(np.ascontiguousarray(cube))
    for steps in (1, -25, 128):
        p = torch.zeros(len(x), K.N_PARAMS)
        p[:, K.OP0], p[:, K.F0] = K.HUE, float(steps)
        want = K.photometric_ref(x.clone(), p, MEAN, STD, normalize=False)
        got = K.photometric_(x.clone().to(DEVICE), p.to(DEVICE), MEAN, STD, normalize=False)
        _assert_equal(got, want, f"hue steps={steps}")
        assert not torch.equal(want, x)  # the shift moved colours
