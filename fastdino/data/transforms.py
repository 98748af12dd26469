"""DINOv3 multi-crop augmentation (SPEC.md §3.4) with PIL + numpy + torch, no torchvision.

Per image: 2 global crops (RandomResizedCrop scale (0.32, 1), bicubic), nL local crops (scale
(0.05, 0.32)), each flipped with p=0.5 (if `crops.horizontal_flip`), colour-jittered with p=0.8
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order), greyscaled with p=0.2,
Gaussian-blurred (kernel 9, sigma ~ U[0.1, 2]) with the per-crop probabilities of
`crops.blur_probabilities`, solarised (threshold 128, p=0.2) on global crop 2 only, normalised.

Blur probabilities (SPEC.md §10.1): "intended" = global 1: 1.0, global 2: 0.1, local: 0.5 (what the
official code is written to do); "official" = what it does, because its `GaussianBlur` wrapper
passes 1-p to `RandomApply` (dinov3 issue #286): global 1: never, global 2: 0.9, local: 0.5.

Optional Gram-teacher crops (SPEC.md §1.6): one RandomResizedCrop at max(global, gram) size is drawn
per global crop; the student's global crop is bicubic-resized from it, the Gram crop is resized to
`gram_teacher_crops_size`. With `gram_teacher_no_distortions` the student crop is resized *before*
the distortions (so blur acts at the student resolution) and the Gram crop is only normalised;
without it the distortions run at the large size and both crops are resized from the result (the
official code resizes the normalised float tensor; we resize the distorted 8-bit image, a rounding
difference only).

The ops follow torchvision's PIL code paths: RandomResizedCrop's `get_params` (10 tries, then the
ratio-clamped centre crop), `ImageEnhance` for brightness / contrast / saturation, an HSV hue shift
with uint8 wrap-around, `convert("L")` greyscale, `ImageOps.solarize`. The Gaussian blur is a
separable 9-tap kernel (torchvision's: exp(-x^2/(2 sigma^2)) on x = -4..4, normalised) applied as
two 1-D correlations (numpy) on the float image with reflect padding, rounded back to uint8
(torchvision does the same for uint8 inputs).

All randomness comes from one `numpy.random.Generator` per image, which the loader seeds from
(data.seed, epoch, index): an image's crops are a pure function of that triple (exact resume).

A JPEG decoded reduced (data.jpeg_draft: `datasets.decode_rgb`'s draft, the rule `CropNeeds`)
gets the same boxes, drawn from its full size; each box is cut from the reduced pixels at 1/k of
its coordinates (`crop_resize`). `CropNeeds` allows k only when the smallest box any crop can get
still has at least its output side in reduced pixels: every crop stays a downscale, as with the
full decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from fastdino.config import CropsConfig
from fastdino.data.datasets import DRAFT_INFO, draft_of, full_size

BLUR_PROBABILITIES = {
    # (global crop 1, global crop 2, local crops)
    "intended": (1.0, 0.1, 0.5),
    "official": (0.0, 0.9, 0.5),  # 1 - p of the intended values for the global crops; 0.5 stays
}
BICUBIC = Image.Resampling.BICUBIC


# ------------------------------------------------------------------------------------------------
# Geometric ops


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: np.random.Generator
                               ) -> tuple[int, int, int, int]:
    """(top, left, h, w) exactly as torchvision's RandomResizedCrop.get_params, with `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the whole image, clamped to the allowed aspect ratios, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """Box (top, left, h, w), in the coordinates of the image's full decode, bicubic-resized to
    size x size. A full decode: crop, then resize, as torchvision's resized_crop does for PIL
    (PIL's `resize(box=...)` would let the bicubic filter read pixels outside the box). A JPEG
    decoded at 1/k (`datasets.draft_of`): the box is [x / k] of the reduced image, to the
    sub-pixel; the whole pixels holding it are cut and resized with the box's fractional
    offsets (so the filter reads at most the pixels the box partly covers)."""
    top, left, h, w = box
    _, _, k = draft_of(img)
    if k == 1:
        return img.crop((left, top, left + w, top + h)).resize((size, size), BICUBIC)
    x0, y0 = left / k, top / k
    x1, y1 = min((left + w) / k, img.width), min((top + h) / k, img.height)  # (<= W / k anyway)
    cx, cy = math.floor(x0), math.floor(y0)
    piece = img.crop((cx, cy, math.ceil(x1), math.ceil(y1)))
    out = piece.resize((size, size), BICUBIC, box=(x0 - cx, y0 - cy, x1 - cx, y1 - cy))
    out.info.pop(DRAFT_INFO, None)  # (PIL copies info: the crop is its own full size)
    return out


def random_resized_crop(img: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """The box drawn from the full decode's size (the same draws whether or not a JPEG was
    decoded reduced), cut and resized (`crop_resize`)."""
    box = random_resized_crop_params(*full_size(img), scale, ratio, rng)
    return crop_resize(img, box, size)


def min_crop_side(width: int, height: int, min_scale: float,
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> float:
    """A lower bound of the shorter side of every box `random_resized_crop_params` can return for
    a width x height image: a drawn box has area >= min_scale of the image and an aspect ratio
    within `ratio` (its shorter side >= sqrt(area * 3/4) at 3/4..4/3), less 0.5 for round();
    the fallback box (the image clamped to `ratio`) has shorter side min(width, height)."""
    elongated = min(ratio[0], 1 / ratio[1])  # the most elongated aspect, as a ratio <= 1
    drawn = math.sqrt(width * height * min_scale * elongated) - 0.5
    return min(width, height, drawn)


@dataclass(frozen=True)
class CropNeeds:
    """What crops need of an image's resolution (data.jpeg_draft): per crop kind, (smallest area
    scale, output side). Called with a JPEG's full (W, H): its room, the least over the kinds of
    (side of the smallest box, `min_crop_side`: minimum scale, most elongated aspect) / output
    side; decode_rgb reduces by at most that (datasets.largest_reduction), so every box still
    spans at least its output side: no crop is upscaled that a full decode would have
    downscaled. Decided from the image size and the config only (the boxes are drawn after
    decoding, from the unchanged random stream). Picklable: loader workers."""

    needs: tuple[tuple[float, int], ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def of(cls, crops_configs) -> CropNeeds:
        """The needs of every crop of these CropsConfigs (each entry of crops.resolution_mix):
        the global crops at max(global, Gram teacher) size, the local ones."""
        needs = set()
        for c in crops_configs:
            needs.add((c.global_crops_scale[0],
                       max(c.global_crops_size, c.gram_teacher_crops_size or 0)))
            if c.local_crops_number > 0:
                needs.add((c.local_crops_scale[0], c.local_crops_size))
        return cls(tuple(sorted(needs)))

    def __call__(self, width: int, height: int) -> float:
        return min(min_crop_side(width, height, s, self.ratio) / size for s, size in self.needs)


def resize(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the shorter side to `size` (torchvision's Resize(int)); no-op if equal."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, BICUBIC)


# ------------------------------------------------------------------------------------------------
# Photometric ops (PIL RGB in, PIL RGB out)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL hue shift: add hue_factor*255 to the H channel of HSV, modulo 256."""
    return adjust_hue_steps(img, int(hue_factor * 255))  # int() truncates, as torchvision's cast


def adjust_hue_steps(img: Image.Image, steps: int) -> Image.Image:
    """The hue shift by `steps` levels of PIL's 8-bit H (modulo 256, C's uint8 wrap-around)."""
    h, s, v = img.convert("HSV").split()
    np_h = (np.asarray(h, dtype=np.uint16) + steps % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """ColorJitter: four factors drawn, applied in a random order (torchvision's fn_idx)."""
    order = rng.permutation(4)
    b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    h = rng.uniform(-hue, hue)
    for fn in order:
        if fn == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif fn == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif fn == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            img = adjust_hue(img, h)
    return img


def grayscale(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")  # 3 identical channels, ITU-R 601-2 luma


def gaussian_kernel1d(kernel_size: int, sigma: float) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()  # [k]


def gaussian_kernels1d(kernel_size: int, sigmas: torch.Tensor) -> torch.Tensor:
    """`gaussian_kernel1d` of each sigma at once: [n] -> [n, k], equal to it row by row (the same
    fp32 ops element by element; tested), for the GPU loader's blur taps."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    pdf = torch.exp(-0.5 * (x / sigmas.to(torch.float32).view(-1, 1)).pow(2))
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(img: Image.Image, sigma: float, kernel_size: int = 9) -> Image.Image:
    """Separable Gaussian blur, reflect padding, on the float image; rounded back to uint8.

    Two 1-D passes of 9 shifted multiply-adds in numpy: for crop-sized images this beats
    `torch.conv2d`, whose per-call overhead dominates on small inputs in loader workers."""
    x = np.asarray(img, dtype=np.float32)  # [H, W, 3]
    k = gaussian_kernel1d(kernel_size, sigma).numpy()
    pad = kernel_size // 2
    # numpy's "reflect" = torch's (edge not repeated); it needs pad < side, so images of a few
    # pixels fall back to "edge".
    mode = "reflect" if min(x.shape[:2]) > pad else "edge"
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    h, w = x.shape[0] - 2 * pad, x.shape[1] - 2 * pad
    rows = sum(k[i] * x[:, i:i + w] for i in range(kernel_size))  # along W: [H+2p, W, 3]
    out = sum(k[i] * rows[i:i + h] for i in range(kernel_size))  # along H: [H, W, 3]
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def solarize(img: Image.Image, threshold: int = 128) -> Image.Image:
    return ImageOps.solarize(img, threshold)  # pixels >= threshold -> 255 - pixel


# ------------------------------------------------------------------------------------------------
# The multi-crop pipeline


def normalize_lut(mean, std) -> np.ndarray:
    """[3, 256] float32: (v / 255 - mean[c]) / std[c] for every uint8 v, in float32 as ToTensor +
    Normalize compute it per pixel."""
    v = np.arange(256, dtype=np.float32)[None, :]
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return (v / np.float32(255.0) - m) / s


@dataclass
class CropOps:
    """Which random ops were applied to one crop (returned with `record_ops=True`, for tests)."""

    flip: bool = False
    jitter: bool = False
    grayscale: bool = False
    blur: bool = False
    solarize: bool = False


class DataAugmentationDINO:
    """PIL RGB image + a numpy Generator -> dict of normalised crops (see module docstring)."""

    def __init__(self, crops: CropsConfig, record_ops: bool = False) -> None:
        self.crops = crops
        self.record_ops = record_ops
        self.blur_p = BLUR_PROBABILITIES[crops.blur_probabilities]
        self.flip_p = 0.5 if crops.horizontal_flip else 0.0
        self.gram_size = crops.gram_teacher_crops_size
        self.global_max_size = max(crops.global_crops_size, self.gram_size or 0)
        self.lut = normalize_lut(crops.mean, crops.std)

    def normalize(self, img: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize: [3, H, W] float32, (x / 255 - mean) / std in float32. Each
        output depends only on (channel, uint8 value), so it is a lookup of `normalize_lut`
        (the same float32 operations, done once for the 3 x 256 cases), written channel-major
        directly: ~2.7x faster than the arithmetic on the HWC image plus the CHW copy (0.53 vs
        1.41 ms per image at 2 x 224 + 8 x 96 px), the same values bit for bit."""
        a = np.asarray(img)  # [H, W, 3] uint8
        out = np.empty((3, *a.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(self.lut[c], a[..., c], out=out[c])
        return torch.from_numpy(out)

    def _geometric(self, img: Image.Image, size: int, scale: tuple[float, float],
                   rng: np.random.Generator, ops: CropOps) -> Image.Image:
        out = random_resized_crop(img, size, scale, rng)
        if rng.random() < self.flip_p:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            ops.flip = True
        return out

    def _distort(self, img: Image.Image, blur_p: float, solarize_p: float,
                 rng: np.random.Generator, ops: CropOps) -> Image.Image:
        if rng.random() < 0.8:
            img = color_jitter(img, rng)
            ops.jitter = True
        if rng.random() < 0.2:
            img = grayscale(img)
            ops.grayscale = True
        if rng.random() < blur_p:
            img = gaussian_blur(img, float(rng.uniform(0.1, 2.0)))
            ops.blur = True
        if rng.random() < solarize_p:
            img = solarize(img, 128)
            ops.solarize = True
        return img

    def _global(self, image: Image.Image, crop_idx: int, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor | None, CropOps]:
        c, ops = self.crops, CropOps()
        base = self._geometric(image, self.global_max_size, c.global_crops_scale, rng, ops)
        blur_p = self.blur_p[crop_idx]
        solarize_p = 0.2 if crop_idx == 1 else 0.0
        if self.gram_size is None:
            return self.normalize(self._distort(base, blur_p, solarize_p, rng, ops)), None, ops
        if c.gram_teacher_no_distortions:
            student = self._distort(resize(base, c.global_crops_size), blur_p, solarize_p, rng, ops)
            gram = resize(base, self.gram_size)
        else:
            distorted = self._distort(base, blur_p, solarize_p, rng, ops)
            student = resize(distorted, c.global_crops_size)
            gram = resize(distorted, self.gram_size)
        return self.normalize(student), self.normalize(gram), ops

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict:
        """{"global_crops": [2 x [3,Hg,Wg]], "local_crops": [nL x [3,Hl,Wl]],
        "gram_crops": [2 x [3,Hgr,Wgr]] (only with Gram crops), "ops": {...} (record_ops)}"""
        c = self.crops
        if image.mode != "RGB":
            image = image.convert("RGB")
        g1, gram1, ops1 = self._global(image, 0, rng)
        g2, gram2, ops2 = self._global(image, 1, rng)
        out: dict = {"global_crops": [g1, g2]}
        if self.gram_size is not None:
            out["gram_crops"] = [gram1, gram2]
        local_crops, local_ops = [], []
        for _ in range(c.local_crops_number):
            ops = CropOps()
            crop = self._geometric(image, c.local_crops_size, c.local_crops_scale, rng, ops)
            local_crops.append(self.normalize(self._distort(crop, self.blur_p[2], 0.0, rng, ops)))
            local_ops.append(ops)
        out["local_crops"] = local_crops
        if self.record_ops:
            out["ops"] = {"global": [ops1, ops2], "local": local_ops}
        return out
