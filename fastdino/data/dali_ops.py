"""The DALI graph of one crop: execute a row of the plan (`dali_plan.py`) on a decoded image.

Used inside a `@pipeline_def(enable_conditionals=True)` function (see `dali.py`). Images are HWC
uint8 between ops, as PIL keeps them between torchvision's ops (same rounding points). On the GPU
pipeline `device="gpu"`: images live on the GPU, per-sample parameters are CPU argument inputs (as
DALI requires) or, where they enter arithmetic with a GPU image, are moved to the GPU first.

Ops and how they match the torch loader (`transforms.py`, torchvision's PIL code paths):
- crop + resize: one `fn.resize` from the planned window (roi) straight to the output size,
  bicubic, antialiased (PIL's resize with a box is antialiased too). With Gram crops and
  `gram_teacher_no_distortions`, the student and Gram crops are both resized straight from the
  window (the torch loader resizes the max-size crop a second time: a resampling difference).
- brightness x*b; contrast c*x + (1-c)*round(mean luma) (PIL ImageEnhance); saturation: blend with
  the luma image, which `fn.hsv(saturation=s)` computes exactly (YIQ's Y is ITU-R 601 luma and
  scaling I, Q by s is that blend). Hue: PIL's 8-bit HSV shift, re-implemented with elementwise
  DALI arithmetic (`hue_shift_hsv`), not `fn.hsv(hue=)`, whose YIQ rotation is off by ~25 levels
  (mean) at |h| = 0.1. Each matches the PIL op within 1 level (rounding) on test images.
- CPU graph only (`host_jitter`, see dali.py): the whole ColorJitter is one `fn.python_function`
  calling `pil_jitter` (the torch loader's PIL ops) per sample; everything else is as below.
- the 4 jitter ops run in the planned random order: 4 slots, each running (as a conditional) only
  the op whose factor the plan put there: torchvision's per-sample permutation on a static graph.
  The whole jitter is skipped (a conditional) for the 20% of crops without it.
- greyscale: ITU-R 601 luma (`fn.color_space_conversion`) on 3 equal channels; blur:
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
from fastdino.data.transforms import adjust_hue


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

    def _contrast(self, x, c):
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        mean = dmath.floor(fn.reductions.mean(luma) + 0.5)  # [] per sample, PIL's int(m + 0.5)
        c = self.dev(c)
        return fn.cast(c * x + (1.0 - c) * mean, dtype=types.UINT8)  # rounds and saturates

    def jitter(self, x, row):
        """ColorJitter in the planned order: slot k applies the one op whose factor is set in it
        (each op is a conditional, so a sample runs exactly its 4 ops, once each)."""
        if self.host_jitter:
            return fn.python_function(x, row, function=pil_jitter, output_layouts="HWC")
        for k in range(4):
            b, c = row[P.slot(k, P.BRIGHTNESS)], row[P.slot(k, P.CONTRAST)]
            s, h = row[P.slot(k, P.SATURATION)], row[P.slot(k, P.HUE)]
            if b != 1.0:
                x = fn.brightness_contrast(x, brightness=b)
            if c != 1.0:
                x = self._contrast(x, c)
            if s != 1.0:
                x = fn.hsv(x, saturation=s)
            if h != 0.0:
                if self.exact_hue:
                    x = hue_shift_hsv(x, self.dev(h))
                else:
                    x = fn.hsv(x, hue=h * 360.0)
        return x

    def grayscale(self, x):
        # Luma replicated to 3 equal channels (fn.hsv(saturation=0) leaves +-1 differences).
        luma = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
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


_PIL_OPS = (lambda im, v: ImageEnhance.Brightness(im).enhance(v),
            lambda im, v: ImageEnhance.Contrast(im).enhance(v),
            lambda im, v: ImageEnhance.Color(im).enhance(v),
            adjust_hue)


def pil_jitter(x: np.ndarray, row: np.ndarray) -> np.ndarray:
    """CPU graph's ColorJitter: the torch loader's PIL ops, in the plan's slot order, on one
    sample ([H,W,3] uint8; row [N_PARAMS]). Same rule as `CropGraph.jitter`: slot k applies each op
    whose factor differs from neutral (exactly one per slot)."""
    im = Image.fromarray(np.ascontiguousarray(x))
    for k in range(4):
        for op in range(4):
            v = float(row[P.slot(k, op)])
            if v != P.NEUTRAL[op]:
                im = _PIL_OPS[op](im, v)
    return np.asarray(im)


def hue_shift_hsv(x, h):
    """torchvision's PIL hue shift, exactly: RGB -> PIL's 8-bit HSV, H += int(h*255) mod 256,
    -> RGB, with PIL's truncations and roundings (libImaging/Convert.c rgb2hsv / hsv2rgb).
    x: [H,W,3] uint8; h: per-sample hue factor (CPU scalar). Elementwise DALI arithmetic only."""
    xf = fn.cast(x, dtype=types.FLOAT)
    r, g, b = xf[:, :, 0], xf[:, :, 1], xf[:, :, 2]
    mx = dmath.max(dmath.max(r, g), b)
    mn = dmath.min(dmath.min(r, g), b)
    cr = mx - mn
    gray = fn.cast(cr == 0.0, dtype=types.FLOAT)  # PIL: h = s = 0 when max == min
    safe = cr + gray
    rc, gc, bc = (mx - r) / safe, (mx - g) / safe, (mx - b) / safe
    is_r = fn.cast(r == mx, dtype=types.FLOAT)
    is_g = fn.cast(g == mx, dtype=types.FLOAT) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hh = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hh = hh / 6.0 + 1.0
    hh = hh - dmath.floor(hh)  # fmod(h/6 + 1, 1)
    uh = dmath.floor(hh * 255.0) * (1.0 - gray)
    us = dmath.floor(cr / (mx + gray) * 255.0)
    steps = h * 255.0  # int() truncates toward zero
    sign = fn.cast(steps >= 0.0, dtype=types.FLOAT) * 2.0 - 1.0
    shifted = uh + sign * dmath.floor(dmath.abs(steps))
    shifted = shifted - 256.0 * dmath.floor(shifted / 256.0)  # uint8 wrap-around
    fh = shifted * (6.0 / 255.0)
    i = dmath.floor(fh)
    f = fh - i
    i = i - 6.0 * dmath.floor(i / 6.0)
    fs = us / 255.0
    p = dmath.floor(mx * (1.0 - fs) + 0.5)
    q = dmath.floor(mx * (1.0 - fs * f) + 0.5)
    t = dmath.floor(mx * (1.0 - fs * (1.0 - f)) + 0.5)
    m = [fn.cast(i == float(k), dtype=types.FLOAT) for k in range(6)]
    r2 = m[0] * mx + m[1] * q + m[2] * p + m[3] * p + m[4] * t + m[5] * mx
    g2 = m[0] * t + m[1] * mx + m[2] * mx + m[3] * q + m[4] * p + m[5] * p
    b2 = m[0] * p + m[1] * p + m[2] * t + m[3] * mx + m[4] * mx + m[5] * q
    return fn.cast(fn.stack(r2, g2, b2, axis=2, axis_name="C"), dtype=types.UINT8)
