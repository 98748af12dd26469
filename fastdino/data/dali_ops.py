"""The DALI graph of one crop: execute a row of the plan (`dali_plan.py`) on a decoded image.

Used inside a `@pipeline_def(enable_conditionals=True)` function (see `dali.py`). With
`data.dali_jitter: triton` (the loader's default) the graph stops after `resize_window` and
kernels/photometric.py does the rest; everything below the resize serves `exact` and `fast`.
Images are HWC uint8 between ops, as PIL keeps them between torchvision's ops (same rounding
points). On the GPU pipeline `device="gpu"`: images live on the GPU, per-sample parameters are CPU
argument inputs (as DALI requires) or, where they enter arithmetic with a GPU image, are moved to
the GPU first.

Ops and how they match the torch loader (`transforms.py`, torchvision's PIL code paths):
- crop + resize: one `fn.resize` from the planned window (roi) straight to the output size,
  bicubic, antialiased (PIL's resize with a box is antialiased too). With Gram crops and
  `gram_teacher_no_distortions`, the student and Gram crops are both resized straight from the
  window (the torch loader resizes the max-size crop a second time: a resampling difference).
- ColorJitter, exact graph (`exact_hue=True`, the default): bit for bit PIL's, as torchvision runs
  it (tests/unit/test_dali_jitter.py: all 24 orders, zero differing pixels). Brightness, contrast
  and saturation are ImageEnhance's `Image.blend(degenerate, x, f)`: fp32 d + f·(x - d), then
  truncated (`CropGraph.blend`), against black, the constant image int(mean(L) + 0.5) and L on 3
  channels, with L PIL's fixed-point luma (`CropGraph.luma`, one `fn.coord_transform`). The hue
  is PIL's 8-bit HSV shift (`hue_shift_hsv`) with libImaging's fp32 / double roundings. DALI's
  own ops round instead of truncating (fn.brightness_contrast, fn.hsv(saturation=): about half
  the pixels a level brighter per op) and rotate the hue in YIQ (~25 levels off at |h| = 0.1).
- ColorJitter, fast graph (`exact_hue=False`): those DALI ops (`_fast_jitter`), ~3x fewer
  operators, for throughput runs that accept the difference.
- CPU graph only (`host_jitter`, see dali.py): the whole ColorJitter is one `fn.python_function`
  calling `pil_jitter` (the torch loader's PIL ops) per sample; everything else is as below.
- the 4 jitter ops run in the planned random order, torchvision's per-sample permutation on a
  static graph: slot k runs (as a conditional) only the op whose factor the plan put there. The
  exact graph splits the order at the hue's slot (`_exact_jitter`: the ~130-operator hue once per
  crop, not once per slot). The whole jitter is skipped (a conditional) for the 20% of crops
  without it.
- greyscale: PIL's convert("L") luma (`CropGraph.luma`) on 3 equal channels, exactly; blur:
  `fn.gaussian_blur` window 9, planned sigma, reflect-101 border (= torch "reflect"); solarize:
  x >= 128 -> 255 - x. Each in a conditional (`if`), so skipped crops cost nothing.
- flip and normalisation: `fn.crop_mirror_normalize` at the end (every op above is left/right
  symmetric, so flipping last equals flipping first), CHW float32, (x/255 - mean)/std.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from PIL import Image, ImageEnhance

from fastdino.data import dali_plan as P
from fastdino.data.transforms import adjust_hue_steps


class CropGraph:
    """Builds the ops of a crop; `dev(node)` moves a CPU per-sample scalar to the image's device."""

    def __init__(self, device: str, mean: tuple[float, ...], std: tuple[float, ...],
                 exact_hue: bool = True, host_jitter: bool = False) -> None:
        self.device = device  # "cpu" | "gpu": where the decoded images are
        # host_jitter (CPU graph only): ColorJitter as one fn.python_function running the torch
        # loader's PIL ops, instead of ~16 conditionals x 1-4 DALI ops per crop (see dali.py).
        if host_jitter and device != "cpu":
            raise ValueError("host_jitter=True needs device='cpu' (the PIL ops run on the host); "
                             f"got device={device!r}")
        self.host_jitter = host_jitter
        # exact_hue=False: fn.hsv's YIQ rotation (one fused op) instead of the ~80 elementwise ops
        # of the exact PIL HSV shift; 3.5x faster DALI pipeline on CPU, ~25 levels off at |h| = 0.1.
        self.exact_hue = exact_hue
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]

    def dev(self, node):
        return node.gpu() if self.device == "gpu" else node

    def resize_window(self, image, row, size: int):
        """[H,W,3] uint8 -> [size,size,3] uint8, bicubic from the planned window of `row`."""
        top, left = row[P.TOP], row[P.LEFT]
        start = fn.stack(top, left)
        end = fn.stack(top + row[P.HEIGHT], left + row[P.WIDTH])
        return fn.resize(image, size=[size, size], roi_start=start, roi_end=end,
                         roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)

    def resize(self, image, size: int):
        return fn.resize(image, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)

    # ---- ColorJitter and greyscale: PIL's ImageEnhance and convert("L"), bit for bit

    def luma(self, x):
        """PIL's RGB -> L, exactly: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (libImaging/Convert.c,
        L24), as float32 [H, W, 1]: one affine map of the channels (every partial sum an integer
        below 2^24, so fp32 holds it exactly), a division by 2^16 and a floor. DALI's RGB -> GRAY
        rounds 0.299 R + 0.587 G + 0.114 B instead and differs by a level on some pixels."""
        l24 = fn.coord_transform(x, M=[19595.0, 38470.0, 7471.0], T=[32768.0], dtype=types.FLOAT)
        return dmath.floor(l24 / 65536.0)

    @staticmethod
    def blend(degenerate, x, alpha):
        """Image.blend(degenerate, x, alpha), as ImageEnhance calls it, exactly: fp32
        degenerate + alpha·(x - degenerate), then truncated (libImaging/Blend.c casts to UINT8;
        floor is that truncation wherever the value is kept) and clipped to [0, 255] (the
        saturating cast). Rounding to nearest instead (fn.brightness_contrast, fn.hsv, a bare
        cast) makes about half the pixels one level brighter than PIL's, per op. Each binary op is
        a DALI operator of its own: no FMA contraction, the same fp32 roundings as PIL's C."""
        xf = fn.cast(x, dtype=types.FLOAT)
        return fn.cast(dmath.floor(degenerate + alpha * (xf - degenerate)), dtype=types.UINT8)

    def brightness(self, x, b):
        # blend with black: 0 + b·(x - 0) = b·x exactly
        return fn.cast(dmath.floor(self.dev(b) * fn.cast(x, dtype=types.FLOAT)),
                       dtype=types.UINT8)

    def contrast(self, x, c, pixels: int):
        # blend with the constant image int(mean(L) + 0.5), ImageStat's mean being the exact sum
        # over the pixel count, rounded once to double: the fp32 sum of integers below 2^24 is
        # exact in any order, then the division in double (DALI's mean has no double
        # accumulator). `pixels`: the crop's static H·W
        total = fn.cast(fn.reductions.sum(self.luma(x)), dtype=types.FLOAT64)
        level = fn.cast(dmath.floor(total / float(pixels) + 0.5), dtype=types.FLOAT)
        return self.blend(level, x, self.dev(c))

    def saturation(self, x, s):
        # blend with L on 3 channels ([H, W, 1] broadcasts against [H, W, 3])
        return self.blend(self.luma(x), x, self.dev(s))

    def _slot_ops(self, x, row, k, pixels: int, when):
        """Slot k's brightness, contrast and saturation, exact (the one the plan put there: the
        others hold their neutral factor), each a conditional gated by `when` (per sample)."""
        for op, apply in ((P.BRIGHTNESS, self.brightness),
                          (P.CONTRAST, lambda x, c: self.contrast(x, c, pixels)),
                          (P.SATURATION, self.saturation)):
            f = row[P.slot(k, op)]
            if when & (f != P.NEUTRAL[op]):
                x = apply(x, f)
        return x

    def jitter(self, x, row, pixels: int):
        """ColorJitter in the planned order on a crop of `pixels` = H·W pixels (static). Every op
        is a conditional, so a sample runs exactly its 4 ops, once each."""
        if self.host_jitter:
            return fn.python_function(x, row, function=pil_jitter, output_layouts="HWC")
        return self._exact_jitter(x, row, pixels) if self.exact_hue else self._fast_jitter(x, row)

    def _exact_jitter(self, x, row, pixels: int):
        """PIL's ColorJitter bit for bit. Slot k holds one op; the hue's slot splits the order into
        the ops before it, the hue, and the ops after it, so the graph holds the exact hue
        (~130 operators) once per crop instead of once per slot, and brightness / contrast /
        saturation (4-14 operators each) in 7 slots: 4 before, 3 after (slot 0 is never after
        the hue). A crop without a hue factor (h = 0) runs all 4 slots in the 'before' pass."""
        h = [row[P.slot(k, P.HUE)] for k in range(4)]
        hue_by = [h[0] != 0.0]  # hue_by[k]: the hue sits in one of slots 0..k (per sample)
        for k in range(1, 4):
            hue_by.append(hue_by[-1] | (h[k] != 0.0))
        for k in range(4):
            x = self._slot_ops(x, row, k, pixels, when=hue_by[k] == False)  # noqa: E712 (a node)
        if hue_by[3]:  # a hue factor in some slot: shift by the plan's int(h·255)
            x = hue_shift_hsv(x, self.dev(row[P.HUE_STEPS]))
        for k in range(1, 4):
            x = self._slot_ops(x, row, k, pixels, when=hue_by[k - 1])
        return x

    def _fast_jitter(self, x, row):
        """DALI's own ops, slot by slot (~3x fewer operators than the exact graph): brightness
        and saturation (fn.brightness_contrast, fn.hsv) round where PIL truncates (about half
        the pixels a level brighter, per op), contrast likewise with DALI's fp32 luma, and the
        hue is fn.hsv's YIQ rotation, ~17 levels from PIL's HSV shift at |h| <= 0.1."""
        for k in range(4):
            b, c = row[P.slot(k, P.BRIGHTNESS)], row[P.slot(k, P.CONTRAST)]
            s, h = row[P.slot(k, P.SATURATION)], row[P.slot(k, P.HUE)]
            if b != 1.0:
                x = fn.brightness_contrast(x, brightness=b)
            if c != 1.0:
                luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
                mean = dmath.floor(fn.reductions.mean(luma) + 0.5)
                c = self.dev(c)
                x = fn.cast(c * x + (1.0 - c) * mean, dtype=types.UINT8)
            if s != 1.0:
                x = fn.hsv(x, saturation=s)
            if h != 0.0:
                x = fn.hsv(x, hue=h * 360.0)
        return x

    def grayscale(self, x):
        # RandomGrayscale's convert("L") replicated to 3 channels, PIL's luma exactly
        luma = fn.cast(self.luma(x), dtype=types.UINT8)  # [H, W, 1], HWC
        return fn.cat(luma, luma, luma, axis=2)

    def blur(self, x, row):
        return fn.gaussian_blur(x, window_size=9, sigma=row[P.SIGMA])

    def solarize(self, x):
        x16 = fn.cast(x, dtype=types.INT16)
        inverted = 255 - x16
        high = fn.cast(x16 >= 128, dtype=types.INT16)
        return fn.cast(x16 + high * (inverted - x16), dtype=types.UINT8)

    def normalize(self, x, row):
        mirror = fn.cast(row[P.FLIP], dtype=types.INT32)
        return fn.crop_mirror_normalize(x, mirror=mirror, mean=self.mean, std=self.std,
                                        dtype=types.FLOAT, output_layout="CHW")


_PIL_OPS = (lambda im, v, row: ImageEnhance.Brightness(im).enhance(v),
            lambda im, v, row: ImageEnhance.Contrast(im).enhance(v),
            lambda im, v, row: ImageEnhance.Color(im).enhance(v),
            lambda im, v, row: adjust_hue_steps(im, int(row[P.HUE_STEPS])))


def pil_jitter(x: np.ndarray, row: np.ndarray) -> np.ndarray:
    """CPU graph's ColorJitter: the torch loader's PIL ops, in the plan's slot order, on one
    sample ([H,W,3] uint8; row [N_PARAMS]). Same rule as `CropGraph.jitter`: slot k applies each op
    whose factor differs from neutral (exactly one per slot)."""
    im = Image.fromarray(np.ascontiguousarray(x))
    for k in range(4):
        for op in range(4):
            v = float(row[P.slot(k, op)])
            if v != P.NEUTRAL[op]:
                im = _PIL_OPS[op](im, v, row)
    return np.asarray(im)


def _round_half_up(x):
    """C's round() for x >= 0 (half away from zero), exactly: floor(x + 0.5) would round x just
    under k + 0.5 up whenever x + 0.5 itself rounds to k + 1."""
    r = dmath.floor(x)
    return r + fn.cast(x - r >= 0.5, dtype=types.FLOAT64)  # x - floor(x) is exact


def hue_shift_hsv(x, steps):
    """torchvision's PIL hue shift, bit for bit: RGB -> PIL's 8-bit HSV, H += steps mod 256,
    -> RGB, with the fp32 / double mix of libImaging/Convert.c (rgb2hsv_row, hsv2rgb): its
    `float` variables are fp32, every expression with a double literal (2.0 + rc - bc, h / 6.0 +
    1.0, h * 255.0, v * (1.0 - fs * f), ...) is evaluated in double and rounded back where C
    assigns it to a float. x: [H,W,3] uint8; steps: per-sample int(hue_factor * 255) (the plan's
    HUE_STEPS, from the double factor as torchvision computes it) on x's device.
    Elementwise DALI arithmetic only (each operator rounds on its own: no FMA contraction)."""
    f32, f64 = types.FLOAT, types.FLOAT64
    xf = fn.cast(x, dtype=f32)
    r, g, b = xf[:, :, 0], xf[:, :, 1], xf[:, :, 2]
    mx = dmath.max(dmath.max(r, g), b)
    mn = dmath.min(dmath.min(r, g), b)
    cr = mx - mn
    gray = fn.cast(cr == 0.0, dtype=f32)  # PIL: h = s = 0 when max == min
    safe = cr + gray
    rc, gc, bc = (mx - r) / safe, (mx - g) / safe, (mx - b) / safe  # fp32, as C
    is_r = fn.cast(r == mx, dtype=f32)
    is_g = fn.cast(g == mx, dtype=f32) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    rc64, gc64, bc64 = (fn.cast(v, dtype=f64) for v in (rc, gc, bc))
    h_g = fn.cast(rc64 + 2.0 - bc64, dtype=f32)  # (float)(2.0 + rc - bc)
    h_b = fn.cast(gc64 + 4.0 - rc64, dtype=f32)  # (float)(4.0 + gc - rc)
    hh = is_r * (bc - gc) + is_g * h_g + is_b * h_b  # 0/1 masks: the selected value exactly
    y = fn.cast(hh, dtype=f64) / 6.0 + 1.0  # in (0, 2): fmod(y, 1.0) = y - floor(y)
    hf = fn.cast(y - dmath.floor(y), dtype=f32)
    uh = dmath.floor(fn.cast(hf, dtype=f64) * 255.0) * fn.cast(1.0 - gray, dtype=f64)
    us = dmath.floor(fn.cast(cr / (mx + gray), dtype=f64) * 255.0)
    shifted = uh + fn.cast(steps, dtype=f64)
    shifted = shifted - 256.0 * dmath.floor(shifted / 256.0)  # uint8 wrap-around
    # hsv2rgb: i = floor(h * 6.0 / 255.0), f = (float)(h * 6.0 / 255.0 - i), fs = (float)(s / 255.0)
    fh = shifted * 6.0 / 255.0
    i = dmath.floor(fh)
    f = fn.cast(fn.cast(fh - i, dtype=f32), dtype=f64)
    fs = fn.cast(fn.cast(us / 255.0, dtype=f32), dtype=f64)
    v = fn.cast(mx, dtype=f64)

    def channel(offset: float):
        # hsv2rgb's sector table (i % 6 -> which of v, p, q, t each channel takes) as a weight:
        # the channel is round(v·(1.0 - fs·w)) with w = 0 (v), 1 (p), f (q) or 1 - f (t), and
        # w = clamp(min(k + f, (4 - k) - f), 0, 1) for k = (i + offset) mod 6 picks it (R: 5,
        # G: 3, B: 1). Every w is formed as C forms it (f, 1.0 - f, exactly 0 or 1), so each
        # channel is C's p / q / t / v bit for bit, in fewer operators than the masked selection.
        k = i + offset
        k = k - 6.0 * dmath.floor(k / 6.0)
        w = dmath.clamp(dmath.min(k + f, (4.0 - k) - f), 0.0, 1.0)
        return _round_half_up(v * (1.0 - fs * w))

    r2, g2, b2 = channel(5.0), channel(3.0), channel(1.0)
    return fn.cast(fn.stack(r2, g2, b2, axis=2, axis_name="C"), dtype=types.UINT8)
