"""The `Batch` contract (DESIGN.md "One training step") and the collate that builds it.

Every loader (torch here, DALI later) produces a `Batch`. Crops are crop-major, as the official
collate stacks them: global_crops = [all images' crop 0, then all images' crop 1], locals likewise,
so `global_crops.view(2, B, ...)[g]` is crop g of the whole batch. iBOT masks are drawn in the
collate, as DINOv3 does, from an explicit numpy Generator (SPEC.md §1.4).

Legend: B = images per rank, nL = local crops per image, Ng = patches of a global crop,
M = masked tokens of the rank (a constant of the config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from fastdino.data.gpu_photometric import RawCrops, finish_crops
from fastdino.data.masking import MaskingGenerator, sample_masks


@dataclass
class Batch:
    global_crops: torch.Tensor  # [2B, 3, Hg, Wg] float32, crop-major, normalised
    local_crops: torch.Tensor  # [nL*B, 3, Hl, Wl] float32, crop-major, normalised
    masks: torch.Tensor  # [2B, Ng] bool, True = masked patch (student sees the mask token)
    mask_indices: torch.Tensor  # [M] long, flat indices of masked tokens in [2B*Ng]
    masks_weight: torch.Tensor  # [M] float32, 1/(#masked in its image)
    n_masked_patches: torch.Tensor  # [1] long, = M
    gram_crops: torch.Tensor | None  # [2B, 3, Hgr, Wgr] float32, crop-major, or None
    n_images: int  # B
    # Bookkeeping outside the tensor contract: paths replaced because they could not be decoded
    # while this batch was built (the loader counts and reports them in the main process), and
    # why each could not be (the decoder's exception, from the worker that met it; "" if unknown).
    skipped_files: tuple[str, ...] = ()
    skipped_reasons: tuple[str, ...] = ()

    def _map(self, fn) -> "Batch":
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
        return Batch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        # Called by DataLoader's pin-memory thread (it looks for a `pin_memory` method).
        return self._map(lambda t: t.pin_memory())


@dataclass
class RawBatch:
    """A `Batch` whose crops still need their photometric ops (`gpu_photometric.RawCrops`): what
    the torch loader's workers make with `data.torch_photometric: gpu`. `finish` -> `Batch`."""

    crops: RawCrops
    masks: torch.Tensor
    mask_indices: torch.Tensor
    masks_weight: torch.Tensor
    n_masked_patches: torch.Tensor
    n_images: int
    skipped_files: tuple[str, ...] = ()
    skipped_reasons: tuple[str, ...] = ()

    def _map(self, fn) -> "RawBatch":
        return RawBatch(crops=fn(self.crops), **{f: fn(getattr(self, f)) for f in _MASK_FIELDS},
                        n_images=self.n_images, skipped_files=self.skipped_files,
                        skipped_reasons=self.skipped_reasons)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "RawBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "RawBatch":
        return self._map(lambda t: t.pin_memory())

    def finish(self, cfg) -> Batch:
        """The photometric ops where the crops are (`gpu_photometric.finish_crops`)."""
        global_crops, local_crops, gram_crops = finish_crops(self.crops, cfg)
        return Batch(global_crops=global_crops, local_crops=local_crops, masks=self.masks,
                     mask_indices=self.mask_indices, masks_weight=self.masks_weight,
                     n_masked_patches=self.n_masked_patches, gram_crops=gram_crops,
                     n_images=self.n_images, skipped_files=self.skipped_files,
                     skipped_reasons=self.skipped_reasons)


def _skips(samples: list[dict]) -> dict:
    """The samples' skipped files and their reasons, in order (Batch bookkeeping fields)."""
    files = tuple(p for s in samples for p in s.get("skipped_files", ()))
    reasons = tuple(r for s in samples
                    for r in s.get("skipped_reasons", ("",) * len(s.get("skipped_files", ()))))
    return {"skipped_files": files, "skipped_reasons": reasons}


_MASK_FIELDS = ("masks", "mask_indices", "masks_weight", "n_masked_patches")


def collate_raw(samples: list[dict], patch_size: int, global_size: int,
                generator: np.random.Generator, mask_generator: MaskingGenerator,
                mask_probability: float = 0.5,
                ratio_min_max: tuple[float, float] = (0.1, 0.5)) -> RawBatch:
    """Stack per-image `gpu_photometric.geometric_crops` dicts into a crop-major `RawBatch`; the
    masks as `collate_fn` draws them (on the `global_size` patch grid; the raw global crops can
    be larger, see `gpu_photometric`)."""
    if not samples:
        raise ValueError("collate_raw needs at least one sample")
    if global_size % patch_size:
        raise ValueError(f"global crop {global_size} is not a multiple of patch_size={patch_size}")

    def crop_major(key: str) -> torch.Tensor:  # crop 0 of every image, then crop 1, ...
        n_crops = len(samples[0][key])
        return torch.from_numpy(np.stack([s[key][c] for c in range(n_crops) for s in samples]))

    def params(rows: range) -> torch.Tensor:  # those crops' parameter rows, in the same order
        return torch.from_numpy(np.stack([s["params"][r] for r in rows for s in samples]))

    n_local = len(samples[0]["local"])
    crops = RawCrops(global_crops=crop_major("global"), local_crops=crop_major("local"),
                     gram_crops=crop_major("gram") if samples[0]["gram"] else None,
                     global_params=params(range(2)), local_params=params(range(2, 2 + n_local)))
    g = global_size // patch_size
    m = sample_masks(2 * len(samples), (g, g), generator, mask_probability=mask_probability,
                     ratio_min_max=ratio_min_max, mask_generator=mask_generator)
    return RawBatch(crops=crops, masks=m.masks, mask_indices=m.mask_indices,
                    masks_weight=m.masks_weight, n_masked_patches=m.n_masked_patches,
                    n_images=len(samples), **_skips(samples))


def collate_fn(samples: list[dict], patch_size: int, generator: np.random.Generator,
               mask_probability: float = 0.5, ratio_min_max: tuple[float, float] = (0.1, 0.5),
               mask_generator: MaskingGenerator | None = None) -> Batch:
    """Stack per-image crop dicts (from `DataAugmentationDINO`) into a crop-major `Batch`.

    samples[b] = {"global_crops": [2 x [3,Hg,Wg]], "local_crops": [nL x [3,Hl,Wl]],
                  "gram_crops": [2 x [3,Hgr,Wgr]] (optional)}
    """
    if not samples:
        raise ValueError("collate_fn needs at least one sample")
    n_images = len(samples)

    def crop_major(key: str) -> torch.Tensor:
        n_crops = len(samples[0][key])
        # np.stack: torch.stack of many CPU tensors was 10x slower in loader workers here
        return torch.from_numpy(np.stack([s[key][c].numpy() for c in range(n_crops)
                                          for s in samples]))

    global_crops = crop_major("global_crops")  # [2B, 3, Hg, Wg]
    local_crops = crop_major("local_crops")  # [nL*B, 3, Hl, Wl]
    gram_crops = crop_major("gram_crops") if samples[0].get("gram_crops") else None
    hg, wg = global_crops.shape[-2:]
    if hg % patch_size or wg % patch_size:
        raise ValueError(f"global crop {hg}x{wg} is not a multiple of patch_size={patch_size}")
    m = sample_masks(global_crops.shape[0], (hg // patch_size, wg // patch_size), generator,
                     mask_probability=mask_probability, ratio_min_max=ratio_min_max,
                     max_num_patches=None if mask_generator else
                     int(0.5 * hg // patch_size * wg // patch_size),  # official precedence
                     mask_generator=mask_generator)
    return Batch(global_crops=global_crops, local_crops=local_crops, masks=m.masks,
                 mask_indices=m.mask_indices, masks_weight=m.masks_weight,
                 n_masked_patches=m.n_masked_patches, gram_crops=gram_crops, n_images=n_images,
                 **_skips(samples))
