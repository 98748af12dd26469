"""The photometric half of the multi-crop augmentation on the GPU, shared by both loaders.

A loader that leaves ColorJitter, greyscale, blur, solarize, flip and normalisation to the GPU
hands over `RawCrops`: the step's resized uint8 crops (crop-major, HWC) and one row of
kernels/photometric.py parameters per crop. `finish_crops` runs the kernel once per crop size and
returns the `Batch`'s normalised float crops. Users:
- the DALI loader (`data.dali_jitter: triton`): DALI decodes, crops and resizes; its crops come
  unflipped, the kernel flips them;
- the torch loader (`data.torch_photometric: gpu`): the workers decode, crop, resize and flip with
  PIL (exactly `DataAugmentationDINO`'s geometry) and the kernel does the rest, so the batches are
  the CPU path's bit for bit (except Gram crops distorted at the large size: see below).

Gram crops: without distortions (`crops.gram_teacher_no_distortions`, the default) a loader hands
them over resized, and they are only normalised (and flipped when the loader did not). Distorted
ones (the torch loader's order: distort at max(global, gram) size, then resize) come as the global
crops at the large size: the kernel distorts them in place, torch's antialiased bicubic resizes
them to both sizes (PIL's resize on the CPU: within a level, not the bit), then they are
normalised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastdino.config import Config


@dataclass
class RawCrops:
    """A step's crops before the photometric ops (B images, nL local crops, crop-major)."""

    global_crops: torch.Tensor  # [2B, H, W, 3] uint8 (H = max(global, gram) if Gram is distorted)
    local_crops: torch.Tensor  # [nL·B, h, w, 3] uint8
    gram_crops: torch.Tensor | None  # [2B, Hg, Wg, 3] uint8, only without Gram distortions
    global_params: torch.Tensor  # [2B, photometric.N_PARAMS] float32
    local_params: torch.Tensor  # [nL·B, photometric.N_PARAMS] float32

    def _map(self, fn) -> "RawCrops":  # fn on every tensor (gram_crops may be None)
        return RawCrops(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                           for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "RawCrops":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RawCrops":
        return self._map(lambda t: t.pin_memory())


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, size, size, 3] uint8, bicubic with antialiasing (torch's, on the
    crops' device; like DALI's resize, not PIL's to the bit)."""
    y = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size),
                                        mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def finish_crops(raw: RawCrops, cfg: Config
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RawCrops (on the device the work should run on) -> the normalised (global [2B, 3, Hg, Wg],
    local [nL·B, 3, h, w], gram [2B, 3, Hgr, Wgr] | None) float32 crops. The crop tensors are
    modified (they are the kernel's working buffers). kernels/photometric.py where `kernels.impl`
    picks Triton (CUDA under auto), its reference elsewhere: the same values."""
    from fastdino.kernels.photometric import FLIP, photometric_, photometric_ref
    from fastdino.layers.select import use_triton

    c = cfg.crops
    mean, std = tuple(c.mean), tuple(c.std)

    def run(x, p, normalize=True):
        kernel = use_triton(cfg.kernels.impl, x, "photometric")
        return (photometric_ if kernel else photometric_ref)(x, p.contiguous(), mean, std,
                                                            normalize)

    def flip_only(p):  # the crop's flip (if the loader left it to us) and no other op
        q = torch.zeros_like(p)
        q[:, FLIP] = p[:, FLIP]
        return q

    local_crops = run(raw.local_crops, raw.local_params)
    gram_size = c.gram_teacher_crops_size
    if gram_size is None:
        return run(raw.global_crops, raw.global_params), local_crops, None
    if c.gram_teacher_no_distortions:
        if raw.gram_crops is None:
            raise ValueError("finish_crops: crops.gram_teacher_crops_size is set (no distortions) "
                             "but the loader handed over no Gram crops")
        return (run(raw.global_crops, raw.global_params), local_crops,
                run(raw.gram_crops, flip_only(raw.global_params)))
    # distorted at max(global, gram) size, then resized to both (the torch loader's order)
    base = run(raw.global_crops, raw.global_params, normalize=False)
    out = []
    for size in (c.global_crops_size, gram_size):
        x = base if size == base.shape[1] else resize_uint8(base, size)
        out.append(run(x.clone(), flip_only(raw.global_params)))
    return out[0], local_crops, out[1]


# ------------------------------------------------------------------------------------------------
# The torch loader's worker side: PIL geometry from the plan, the photometric ops left to the GPU


def geometric_crops(image, crops, rng) -> dict:
    """One image's crops as `DataAugmentationDINO` cuts them (same Generator draws, in the same
    order: the DALI plan, `dali_plan.plan_image`), cropped, resized and flipped with PIL, without
    the photometric ops: {"global": [2 x uint8 [H, W, 3]], "local": [nL x ...], "gram": [2 x ...]
    (no-distortion Gram crops only), "params": float32 [2 + nL, photometric.N_PARAMS]} with the
    flip already applied (the parameters' FLIP is 0). `image`: PIL (converted to RGB as
    `DataAugmentationDINO` converts it); `crops`: CropsConfig."""
    import numpy as np
    from PIL import Image

    from fastdino.data import dali_plan as P
    from fastdino.data.datasets import full_size
    from fastdino.data.transforms import crop_resize, resize
    from fastdino.kernels.photometric import FLIP

    if image.mode != "RGB":
        image = image.convert("RGB")
    plan = P.plan_image(*full_size(image), crops, rng)  # (a JPEG decoded reduced: its full size)
    gram = crops.gram_teacher_crops_size
    global_max = max(crops.global_crops_size, gram or 0)

    def window(row, size: int):
        top, left, h, w = (int(v) for v in row[[P.TOP, P.LEFT, P.HEIGHT, P.WIDTH]])
        out = crop_resize(image, (top, left, h, w), size)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if row[P.FLIP] else out

    out = {"global": [], "local": [], "gram": []}
    for k in range(2):
        base = window(plan[k], global_max)
        if gram is not None and crops.gram_teacher_no_distortions:
            out["global"].append(resize(base, crops.global_crops_size))
            out["gram"].append(resize(base, gram))
        else:  # no Gram crops, or Gram crops distorted at the large size (finish_crops resizes)
            out["global"].append(base)
    out["local"] = [window(plan[2 + i], crops.local_crops_size)
                    for i in range(crops.local_crops_number)]
    for key in ("global", "local", "gram"):
        out[key] = [np.asarray(im) for im in out[key]]
    params = P.photometric_params(plan)
    params[:, FLIP] = 0  # flipped above, before any distortion (the torch loader's order)
    out["params"] = params
    return out
