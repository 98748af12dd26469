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
  the luma image, which `fn.hsv` computes exactly (YIQ's Y is ITU-R 601 luma and scaling I, Q by s
  is that blend). Hue: `fn.hsv` rotates the IQ plane by the planned angle; torchvision shifts H in
  HSV. Same angle range, an approximation (the only colour op that is not exact).
- the 4 jitter ops run in the planned random order: 4 slots, each applying one op (the other three
  have neutral factors, i.e. exact no-ops) - torchvision's per-sample permutation on a static graph.
  The whole jitter is skipped (a conditional) for the 20% of crops without it.
- greyscale: `fn.hsv(saturation=0)` (luma, 3 channels); blur: `fn.gaussian_blur` window 9, planned
  sigma, reflect-101 border (= torch "reflect"); solarize: x >= 128 -> 255 - x. Each in a
  conditional (`if`), so skipped crops cost nothing.
- flip and normalisation: `fn.crop_mirror_normalize` at the end (every op above is left/right
  symmetric, so flipping last equals flipping first), CHW float32, (x/255 - mean)/std.
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from fastdino.data import dali_plan as P


class CropGraph:
    """Builds the ops of a crop; `dev(node)` moves a CPU per-sample scalar to the image's device."""

    def __init__(self, device: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.device = device  # "cpu" | "gpu": where the decoded images are
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
        for k in range(4):
            x = fn.brightness_contrast(x, brightness=row[P.slot(k, P.BRIGHTNESS)])
            x = self._contrast(x, row[P.slot(k, P.CONTRAST)])
            x = fn.hsv(x, saturation=row[P.slot(k, P.SATURATION)],
                       hue=_hue_degrees(row[P.slot(k, P.HUE)]))
        return x

    def grayscale(self, x):
        return fn.hsv(x, saturation=0.0)

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


def _hue_degrees(h):
    """torchvision/PIL hue factor h -> degrees. torchvision adds int(h*255) (truncated toward zero)
    to PIL's 8-bit H channel, whose 255 steps span the circle. DALI's float->int cast rounds, so
    truncate explicitly: sign(v) * floor(|v|)."""
    v = h * 255.0
    sign = fn.cast(v >= 0.0, dtype=types.FLOAT) * 2.0 - 1.0
    return sign * dmath.floor(dmath.abs(v)) * (360.0 / 255.0)
