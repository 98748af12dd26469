"""The photometric half of the DINO multi-crop augmentation, on uint8 crops, bit for bit PIL's.

    out[n] = normalize(flip?(solarize?(blur?(grey?(jitter(x[n])))))),   x [N, H, W, 3] uint8

ColorJitter (brightness, contrast, saturation, hue in a per-crop order), greyscale, the 9-tap
Gaussian blur, solarize, the horizontal flip and ToTensor + Normalize, each exactly as the torch
loader computes it (fastdino/data/transforms.py: PIL's ImageEnhance / convert / HSV code paths and
the numpy blur), so that a crop resized by DALI comes out of this op as the torch loader would
make it from the same resized crop. Why a kernel: DALI has no fused elementwise graph, and these
ops written as DALI operators are ~4,900 operators per pipeline at 2 x 224 + 8 x 96 crops (each
a kernel launch and an executor step; the exact hue alone is ~130 full passes over a crop), where
this is one launch per crop size.

Exactness, op by op (libImaging's C, Pillow 9-12):
- blend (ImageEnhance: brightness against black, contrast against the constant image
  int(mean(L) + 0.5), saturation against L): fp32 d + f·(x - d), truncated, clipped to [0, 255].
- L (greyscale, contrast's mean, saturation's degenerate): (19595 R + 38470 G + 7471 B + 2^15)
  >> 16 in integers. The mean: an exact integer sum over the pixels, divided in double.
- hue: rgb2hsv_row / hsv2rgb with their fp32 and double roundings (C's `float` variables are fp32,
  every expression with a double literal is evaluated in double and rounded where assigned),
  C's round() (half away from zero). Checked against Pillow on all 2^24 colours at 8 shifts.
- blur: the torch loader's two 1-D passes: fp32 products and fp32 sums in tap order, reflect
  padding (edge below 5 pixels), np.round (half to even). Taps come from the host
  (`gaussian_kernel1d`, torch's exp), so they are the torch loader's to the bit.
- flip: the torch loader flips before the distortions. Every op here is pointwise except the
  contrast mean (flip-invariant: an integer sum) and the blur's horizontal pass, whose fp32 sum
  in tap order is not: a flipped crop sums its row taps in the mirrored order, which is the flipped
  image's order exactly; the final write mirrors the columns.
- normalize: fp32 (x / 255 - mean) / std, correctly rounded divisions (as numpy's).
The kernel is compiled with `enable_fp_fusion=False` (no FMA contraction: each product rounds, as
in C and numpy) and divides fp32 with `div_rn` (triton's fp32 `/` is the approximate
`div.full.f32`); fp64 `/` is IEEE already.

The kernel. One program per crop walks its H·W pixels in blocks, pass after pass, the crop
staying in L2 (a 224² crop is 147 KB): each jitter slot is one read-modify-write pass over the
uint8 crop in place (contrast first reduces the crop's L), greyscale one, the blur a row pass into
an fp32 scratch (the output buffer) and a column pass back, and the last pass solarizes,
normalises, flips and writes fp32 CHW. `tl.debug_barrier()` between passes orders them (a CTA
barrier also orders its threads' global memory accesses). Bytes per pixel: 6 per jitter slot
(uint8 read + write), 3 per contrast mean, 6 greyscale, 15 + 15 blur (uint8 -> fp32 scratch ->
uint8), 15 final (uint8 in, fp32 out): 15 at least (the HBM floor: the crop in, the output out),
~50 for a typical crop, 78 at most; ~0.55 GB per B = 64 step at 2 x 224 + 8 x 96 (11.1 M pixels),
nearly all of it L2 traffic. The exact DALI graph moves each jittered crop through ~140 separate
operators instead (one full read + write each).

Limits: no gradient (a data op). Each program holds a whole crop, so N should be at least a few
per SM (640 crops at B = 64); a single huge crop runs on one SM. Not timed on a GPU yet.

This file: `photometric_ref` (the truth) -> `_photometric_kernel` -> `photometric_` (launcher,
in place). The loaders pick between the launcher and the reference by `kernels.impl`
(fastdino/data/gpu_photometric.py `finish_crops`). No torch.library op and no autograd Function:
a data op, run in the data loader outside any compiled graph, with no gradient.
"""

from __future__ import annotations

import torch
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import CompileSpec, is_interpreter

# ---- the per-crop parameters: float32 [N, N_PARAMS], one row per crop
# Slot k (0..3) applies op OP[k] with factor F[k]: the torch loader's ColorJitter order. The hue's
# "factor" is its integer shift int(h·255) (PIL's 8-bit H); a crop whose h is 0 has no hue op.
NONE, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(5)
OP0, F0 = 0, 4  # columns OP0 + k, F0 + k
GRAY, BLUR, SOLARIZE, FLIP = 8, 9, 10, 11  # 0 / 1 flags
TAP0 = 12  # 9 blur taps (the torch loader's gaussian_kernel1d), read only when BLUR
N_PARAMS = TAP0 + 9
KERNEL_SIZE = 9

# one pixel per thread: at 2 or 4 per thread ptxas spills a few bytes around the division slow
# paths (triton 3.6, sm_80 / sm_90); 512 threads per crop keep enough loads in flight
# the layout as the kernel sees it (triton reads module globals only as constexprs)
NONE_C, BRIGHTNESS_C, CONTRAST_C, SATURATION_C, HUE_C = map(tl.constexpr, range(5))
OP0_C, F0_C, TAP0_C, N_PARAMS_C = map(tl.constexpr, (OP0, F0, TAP0, N_PARAMS))
GRAY_C, BLUR_C, SOLARIZE_C, FLIP_C = map(tl.constexpr, (GRAY, BLUR, SOLARIZE, FLIP))

_PASS_BLOCK = 512
_WARPS = 16


def _check(x: torch.Tensor, params: torch.Tensor, who: str) -> None:
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8 or not x.is_contiguous():
        raise ValueError(f"{who}: x must be a contiguous uint8 [N, H, W, 3] tensor, got shape "
                         f"{tuple(x.shape)}, dtype {x.dtype}")
    if params.shape != (x.shape[0], N_PARAMS) or params.dtype != torch.float32:
        raise ValueError(f"{who}: params must be float32 [N, {N_PARAMS}] (N = {x.shape[0]} "
                         f"crops), got shape {tuple(params.shape)}, dtype {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"{who}: params on {params.device}, x on {x.device}")


# ------------------------------------------------------------------------------------------------
# Reference: torch ops on the whole batch, the same arithmetic as libImaging / the torch loader


def luma_ref(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): [..., 3] uint8 -> [...] int32,
    (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    r, g, b = x.to(torch.int32).unbind(-1)
    return (19595 * r + 38470 * g + 7471 * b + 32768) >> 16


def _blend_ref(degenerate: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, alpha): fp32 d + alpha·(x - d), truncated, clipped."""
    xf = x.to(torch.float32)
    return torch.floor(degenerate + alpha * (xf - degenerate)).clamp(0, 255).to(torch.uint8)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b correctly rounded on every device: CUDA torch divides by a CPU scalar as a times
    1/b (a rounding off now and then), by a tensor exactly."""
    return a / torch.full((1,), b, dtype=a.dtype, device=a.device)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    r = torch.floor(v)
    return r + ((v - r) >= 0.5).to(v.dtype)


def hue_shift_ref(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """RGB -> PIL's 8-bit HSV, H += steps (mod 256), -> RGB, as libImaging/Convert.c computes it.
    x [N, H, W, 3] uint8; steps [N] float (integers)."""
    f32, f64 = torch.float32, torch.float64
    xf = x.to(f32)
    r, g, b = xf.unbind(-1)
    mx = torch.maximum(torch.maximum(r, g), b)
    cr = mx - torch.minimum(torch.minimum(r, g), b)
    gray = cr == 0  # PIL: h = s = 0
    safe = torch.where(gray, 1.0, cr)
    rc, gc, bc = (mx - r) / safe, (mx - g) / safe, (mx - b) / safe  # fp32, as C
    h = torch.where(r == mx, bc - gc,
                    torch.where(g == mx, ((2.0 + rc.to(f64)) - bc.to(f64)).to(f32),
                                ((4.0 + gc.to(f64)) - rc.to(f64)).to(f32)))
    y = _div(h.to(f64), 6.0) + 1.0  # fmod(h / 6.0 + 1.0, 1.0), y in (0, 2)
    hf = (y - torch.floor(y)).to(f32)
    uh = torch.where(gray, 0.0, torch.floor(hf.to(f64) * 255.0))
    us = torch.where(gray, 0.0, torch.floor((cr / torch.where(gray, 1.0, mx)).to(f64) * 255.0))
    hh = torch.remainder(uh + steps.to(f64).view(-1, 1, 1), 256.0)  # uint8 wrap-around
    fh = _div(hh * 6.0, 255.0)
    i = torch.floor(fh)
    f = (fh - i).to(f32)
    fs = _div(us, 255.0).to(f32)
    v = mx.to(f64)
    p = _round_half_away(v * (1.0 - fs.to(f64)))
    q = _round_half_away(v * (1.0 - (fs * f).to(f64)))  # fs * f: two floats, an fp32 product
    t = _round_half_away(v * (1.0 - fs.to(f64) * (1.0 - f.to(f64))))
    sector = torch.remainder(i, 6).long()[..., None]  # i = 6 when h = 255

    def pick(*vals):
        return torch.stack(vals, -1).gather(-1, sector)[..., 0]

    out = torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], -1)
    return torch.where((us == 0)[..., None], v[..., None], out).to(torch.uint8)


def _blur_ref(x: torch.Tensor, taps: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The torch loader's separable blur of each crop (as if flipped where `flip`): fp32 sums in
    tap order, reflect padding, round half to even. x [N, H, W, 3] uint8; taps [N, 9]."""
    n, h, w, _ = x.shape
    pad = KERNEL_SIZE // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    xf = x.to(torch.float32).permute(0, 3, 1, 2)  # [N, 3, H, W] for F.pad
    xp = torch.nn.functional.pad(xf, (pad, pad, pad, pad), mode=mode)
    k = taps.view(n, 1, 1, KERNEL_SIZE, 1).unbind(3)
    sign = torch.where(flip, -1, 1)
    rows = None
    for i in range(KERNEL_SIZE):  # along W; a flipped crop walks its taps mirrored
        j = pad + sign.view(n, 1, 1, 1) * (i - pad)  # offset of tap i in the padded row
        cols = torch.arange(w).view(1, 1, 1, w) + j
        term = k[i].view(n, 1, 1, 1) * xp.gather(3, cols.expand(n, 3, h + 2 * pad, w))
        rows = term if rows is None else rows + term
    out = None
    for i in range(KERNEL_SIZE):  # along H
        term = k[i].view(n, 1, 1, 1) * rows[:, :, i:i + h]
        out = term if out is None else out + term
    return torch.round(out).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _slot_ref(x: torch.Tensor, op: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """One jitter slot: crop n gets op[n] with factor f[n] (each op computed on the crops that
    have it only)."""
    x = x.clone()
    for code in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
        idx = (op == code).nonzero().flatten()
        if idx.numel() == 0:
            continue
        xs, fs = x[idx], f[idx]
        fb = fs.view(-1, 1, 1, 1)
        if code == BRIGHTNESS:  # blend with black: 0 + f·(x - 0) = f·x exactly
            y = torch.floor(fb * xs.to(torch.float32)).clamp(0, 255).to(torch.uint8)
        elif code == CONTRAST:  # with the constant image int(mean(L) + 0.5), mean in double
            total = luma_ref(xs).to(torch.float64).sum((1, 2))
            level = torch.floor(_div(total, xs.shape[1] * xs.shape[2]) + 0.5)
            y = _blend_ref(level.to(torch.float32).view(-1, 1, 1, 1), xs, fb)
        elif code == SATURATION:  # with L on 3 channels
            y = _blend_ref(luma_ref(xs).to(torch.float32)[..., None], xs, fb)
        else:
            y = hue_shift_ref(xs, fs)
        x[idx] = y
    return x


def photometric_ref(x: torch.Tensor, params: torch.Tensor, mean: tuple[float, float, float],
                    std: tuple[float, float, float], normalize: bool = True) -> torch.Tensor:
    """The truth. x [N, H, W, 3] uint8 crops (unflipped), params [N, N_PARAMS] -> float32
    [N, 3, H, W] normalised (flipped where FLIP), or with normalize=False the distorted uint8
    [N, H, W, 3] (not flipped: the caller resizes it and normalises later)."""
    _check(x, params, "photometric_ref")
    p = params.to(x.device)
    n = x.shape[0]
    for k in range(4):
        x = _slot_ref(x, p[:, OP0 + k], p[:, F0 + k])
    gray = (p[:, GRAY] > 0.5).nonzero().flatten()
    if gray.numel():
        x = x.clone()
        x[gray] = luma_ref(x[gray]).to(torch.uint8)[..., None].expand(-1, -1, -1, 3)
    flip = p[:, FLIP] > 0.5
    blur = (p[:, BLUR] > 0.5).nonzero().flatten()
    if blur.numel():
        x = x.clone()
        x[blur] = _blur_ref(x[blur], p[blur, TAP0:TAP0 + KERNEL_SIZE], flip[blur])
    solarize = (p[:, SOLARIZE] > 0.5).view(n, 1, 1, 1)
    x = torch.where(solarize & (x >= 128), 255 - x, x)
    if not normalize:
        return x
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(2), x)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)
    s = torch.tensor(std, dtype=torch.float32, device=x.device)
    return ((_div(x.to(torch.float32), 255.0) - m) / s).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# Triton


@triton.jit
def _luma(r, g, b):
    return (19595 * r + 38470 * g + 7471 * b + 32768) >> 16


@triton.jit
def _blend(d, xf, alpha):
    """Image.blend on fp32 values: truncate (floor of a value that is clipped at 0 anyway), clip."""
    y = tl.floor(d + alpha * (xf - d))
    return tl.minimum(tl.maximum(y, 0.0), 255.0)


@triton.jit
def _round_half_away_tl(v):
    r = tl.floor(v)
    return r + ((v - r) >= 0.5).to(tl.float64)


@triton.jit
def _hue(r, g, b, steps):
    """hsv2rgb(rgb2hsv(r, g, b) + steps): fp32 r, g, b in [0, 255] -> fp32 r, g, b (see the
    module docstring; hue_shift_ref is the same arithmetic in torch)."""
    mx = tl.maximum(tl.maximum(r, g), b)
    cr = mx - tl.minimum(tl.minimum(r, g), b)
    gray = cr == 0.0
    safe = tl.where(gray, 1.0, cr)
    rc = tl.math.div_rn(mx - r, safe)
    gc = tl.math.div_rn(mx - g, safe)
    bc = tl.math.div_rn(mx - b, safe)
    h_g = ((2.0 + rc.to(tl.float64)) - bc.to(tl.float64)).to(tl.float32)
    h_b = ((4.0 + gc.to(tl.float64)) - rc.to(tl.float64)).to(tl.float32)
    h = tl.where(r == mx, bc - gc, tl.where(g == mx, h_g, h_b))
    y = h.to(tl.float64) / 6.0 + 1.0
    hf = (y - tl.floor(y)).to(tl.float32)
    uh = tl.where(gray, 0.0, tl.floor(hf.to(tl.float64) * 255.0))
    s32 = tl.math.div_rn(cr, tl.where(gray, 1.0, mx))
    us = tl.where(gray, 0.0, tl.floor(s32.to(tl.float64) * 255.0))
    hh = uh + steps
    hh = hh - 256.0 * tl.floor(hh / 256.0)
    fh = hh * 6.0 / 255.0
    i = tl.floor(fh)
    f = (fh - i).to(tl.float32)
    fs = (us / 255.0).to(tl.float32)
    v = mx.to(tl.float64)
    p = _round_half_away_tl(v * (1.0 - fs.to(tl.float64)))
    q = _round_half_away_tl(v * (1.0 - (fs * f).to(tl.float64)))
    t = _round_half_away_tl(v * (1.0 - fs.to(tl.float64) * (1.0 - f.to(tl.float64))))
    sec = i - 6.0 * tl.floor(i / 6.0)
    # hsv2rgb's switch (i % 6): (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    r2 = tl.where((sec == 0.0) | (sec == 5.0), v,
                  tl.where(sec == 1.0, q, tl.where(sec == 4.0, t, p)))
    g2 = tl.where((sec == 1.0) | (sec == 2.0), v,
                  tl.where(sec == 0.0, t, tl.where(sec == 3.0, q, p)))
    b2 = tl.where((sec == 3.0) | (sec == 4.0), v,
                  tl.where(sec == 2.0, t, tl.where(sec == 5.0, q, p)))
    keep = us == 0.0
    r2 = tl.where(keep, v, r2)
    g2 = tl.where(keep, v, g2)
    b2 = tl.where(keep, v, b2)
    return r2.to(tl.float32), g2.to(tl.float32), b2.to(tl.float32)


@triton.jit
def _load_rgb(x_ptr, pix, m):
    """Pixels `pix` of an HWC uint8 crop as three int32 channel vectors."""
    r = tl.load(x_ptr + pix * 3, mask=m, other=0).to(tl.int32)
    g = tl.load(x_ptr + pix * 3 + 1, mask=m, other=0).to(tl.int32)
    b = tl.load(x_ptr + pix * 3 + 2, mask=m, other=0).to(tl.int32)
    return r, g, b


@triton.jit
def _store_rgb(x_ptr, pix, m, r, g, b):
    tl.store(x_ptr + pix * 3, r, mask=m)
    tl.store(x_ptr + pix * 3 + 1, g, mask=m)
    tl.store(x_ptr + pix * 3 + 2, b, mask=m)


@triton.jit
def _hwc(e, W):
    """(channel, column, row) of element e of an [H, W, 3] crop."""
    return e % 3, (e // 3) % W, e // (3 * W)


@triton.jit
def _mirror(j, n, REFLECT):
    """numpy's "reflect" (edge not repeated) for one overhang, or "edge" for tiny images."""
    if REFLECT:
        j = tl.where(j < 0, -j, j)
        j = tl.where(j > n - 1, 2 * (n - 1) - j, j)
    else:
        j = tl.minimum(tl.maximum(j, 0), n - 1)
    return j


@triton.jit
def _photometric_kernel(X, Params, Out, H, W, reflect,
                        mean_r, mean_g, mean_b, std_r, std_g, std_b,
                        NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    npix = H * W
    x_ptr = X + n * npix * 3
    o_ptr = Out + n * npix * 3  # also the blur's fp32 [H, W, 3] scratch
    p_ptr = Params + n * N_PARAMS_C
    offs = tl.arange(0, BLOCK)

    # ---- ColorJitter: slot k applies op OP[k] with factor F[k], one pass each (contrast: two)
    for k in range(0, 4):
        op = tl.load(p_ptr + OP0_C + k).to(tl.int32)
        f = tl.load(p_ptr + F0_C + k)
        level = f * 0.0
        if op == CONTRAST_C:  # the constant image int(mean(L) + 0.5): an exact integer sum
            acc = tl.zeros([BLOCK], tl.int64)
            for start in range(0, npix, BLOCK):
                pix = start + offs
                m = pix < npix
                r, g, b = _load_rgb(x_ptr, pix, m)
                acc += tl.where(m, _luma(r, g, b), 0).to(tl.int64)
            total = tl.sum(acc, axis=0).to(tl.float64)
            level = tl.floor(total / npix.to(tl.float64) + 0.5).to(tl.float32)
        if op != NONE_C:
            for start in range(0, npix, BLOCK):
                pix = start + offs
                m = pix < npix
                r, g, b = _load_rgb(x_ptr, pix, m)
                rf, gf, bf = r.to(tl.float32), g.to(tl.float32), b.to(tl.float32)
                if op == HUE_C:
                    rf, gf, bf = _hue(rf, gf, bf, f.to(tl.float64))
                else:
                    if op == BRIGHTNESS_C:
                        d = tl.zeros([BLOCK], tl.float32)
                    elif op == CONTRAST_C:
                        d = tl.zeros([BLOCK], tl.float32) + level
                    else:
                        d = _luma(r, g, b).to(tl.float32)
                    rf, gf, bf = _blend(d, rf, f), _blend(d, gf, f), _blend(d, bf, f)
                _store_rgb(x_ptr, pix, m, rf.to(tl.uint8), gf.to(tl.uint8), bf.to(tl.uint8))
        tl.debug_barrier()

    # ---- greyscale: L on 3 channels
    if tl.load(p_ptr + GRAY_C) > 0.5:
        for start in range(0, npix, BLOCK):
            pix = start + offs
            m = pix < npix
            r, g, b = _load_rgb(x_ptr, pix, m)
            lum = _luma(r, g, b).to(tl.uint8)
            _store_rgb(x_ptr, pix, m, lum, lum, lum)
        tl.debug_barrier()

    flip = tl.load(p_ptr + FLIP_C) > 0.5
    # ---- blur: a row pass into the fp32 scratch, a column pass back to uint8
    if tl.load(p_ptr + BLUR_C) > 0.5:
        sign = tl.where(flip, -1, 1)  # a flipped crop sums its row taps in mirrored order
        for start in range(0, npix * 3, BLOCK):
            e = start + offs  # element of [H, W, 3]
            m = e < npix * 3
            c, col, row = _hwc(e, W)
            acc = tl.zeros([BLOCK], tl.float32)
            for i in tl.static_range(9):
                j = _mirror(col + sign * (i - 4), W, reflect)
                v = tl.load(x_ptr + (row * W + j) * 3 + c, mask=m, other=0).to(tl.float32)
                acc = acc + tl.load(p_ptr + TAP0_C + i) * v
            tl.store(o_ptr + e, acc, mask=m)
        tl.debug_barrier()
        for start in range(0, npix * 3, BLOCK):
            e = start + offs
            m = e < npix * 3
            c, col, row = _hwc(e, W)
            acc = tl.zeros([BLOCK], tl.float32)
            for i in tl.static_range(9):
                j = _mirror(row + (i - 4), H, reflect)
                v = tl.load(o_ptr + (j * W + col) * 3 + c, mask=m, other=0.0)
                acc = acc + tl.load(p_ptr + TAP0_C + i) * v
            # np.round: half to even (acc + 0.5 is exact below 2^22)
            r = tl.floor(acc + 0.5)
            r = tl.where((r - acc == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
            r = tl.minimum(tl.maximum(r, 0.0), 255.0)
            tl.store(x_ptr + e, r.to(tl.uint8), mask=m)
        tl.debug_barrier()

    # ---- solarize, then normalise + flip (or write the distorted uint8 back)
    solarize = tl.load(p_ptr + SOLARIZE_C) > 0.5
    for start in range(0, npix * 3, BLOCK):
        e = start + offs
        m = e < npix * 3
        v = tl.load(x_ptr + e, mask=m, other=0).to(tl.int32)
        v = tl.where(solarize, tl.where(v >= 128, 255 - v, v), v)
        if NORMALIZE:
            c, col, row = _hwc(e, W)
            col = tl.where(flip, W - 1 - col, col)
            mean = tl.where(c == 0, mean_r, tl.where(c == 1, mean_g, mean_b))
            std = tl.where(c == 0, std_r, tl.where(c == 1, std_g, std_b))
            y = tl.math.div_rn(tl.math.div_rn(v.to(tl.float32), 255.0) - mean, std)
            tl.store(o_ptr + c * npix + row * W + col, y, mask=m)
        else:
            tl.store(x_ptr + e, v.to(tl.uint8), mask=m)


def _launch_options() -> dict:
    # each product and sum rounds on its own, as in libImaging's C and numpy: no FMA contraction
    return {} if is_interpreter() else {"enable_fp_fusion": False}


def photometric_(x: torch.Tensor, params: torch.Tensor, mean: tuple[float, float, float],
                 std: tuple[float, float, float], normalize: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher; distorts `x` IN PLACE (it is the kernel's working buffer). Returns float32
    [N, 3, H, W] (normalize) or x itself, distorted and not flipped (normalize=False)."""
    _check(x, params, "photometric_")
    n, h, w, _ = x.shape
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=torch.float32, device=x.device)
    elif (out.shape != (n, 3, h, w) or out.dtype != torch.float32 or not out.is_contiguous()
          or out.device != x.device):
        raise ValueError(f"photometric_: out must be a contiguous float32 [{n}, 3, {h}, {w}] "
                         f"tensor on {x.device}, got {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}")
    if n == 0:
        return out if normalize else x
    reflect = int(min(h, w) > KERNEL_SIZE // 2)
    _photometric_kernel[(n,)](x, params.contiguous(), out, h, w, reflect, *map(float, mean),
                              *map(float, std), NORMALIZE=normalize, BLOCK=_PASS_BLOCK,
                              num_warps=_WARPS, num_stages=1, **_launch_options())
    return out if normalize else x


def compile_specs() -> list[CompileSpec]:
    sig = {"X": "*u8", "Params": "*fp32", "Out": "*fp32", "H": "i32", "W": "i32",
           "reflect": "i32", **{f"{a}_{c}": "fp32" for a in ("mean", "std") for c in "rgb"}}
    return [CompileSpec(f"photometric[NORMALIZE={norm},BLOCK={_PASS_BLOCK}]",
                        _photometric_kernel, sig, {"NORMALIZE": norm, "BLOCK": _PASS_BLOCK},
                        num_warps=_WARPS, num_stages=1, enable_fp_fusion=False,
                        # fresh tensors (the loaders concatenate / stack them): 16-byte aligned
                        divisible_by_16=("X", "Params", "Out"))
            for norm in (True, False)]
