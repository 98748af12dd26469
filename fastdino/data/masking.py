"""iBOT block-wise masking with exact per-image counts (SPEC.md §1.4).

DINOv3 masks, in the dataloader collate, half of the 2B global crops of a rank. Image i of the
n = int(2B * mask_probability) masked ones gets exactly int(N * r_i) masked patches with
r_i = linspace(0.1, 0.5, n + 1)[i + 1] (spread evenly in (0.1, 0.5], not sampled); the others get
none; the 2B masks are shuffled so masked images land in both crops. Because the counts are
deterministic, the per-rank number of masked tokens M is a constant (ViT-L, B=64, 224 px: 3771;
7B, B=16, 256 px: 1274): every tensor downstream has a static shape.

The block generator is BEiT's (`dinov3/data/masking.py`): up to 10 tries to place one rectangle of
area ~U[min_num_patches, max_mask_patches] and log-aspect ~U[log 0.3, log 1/0.3]; a rectangle is
accepted if it adds at least 1 and at most `max_mask_patches` new patches; blocks are added until
the count is reached or a round of 10 tries adds nothing. DINOv3's `complete_mask_randomly` then
tops the mask up with uniformly random unmasked patches to exactly the requested count.

Randomness comes only from an explicit `numpy.random.Generator`, so a batch's masks are a function
of its seed (exact resume). The official code draws from Python's `random` and the global numpy
state; the distributions are the same, the streams are not.

Shapes: N = h*w patches of a global crop, M = total masked tokens of the rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def max_num_patches_for(global_crops_size: int, patch_size: int) -> int:
    """0.5*N computed exactly as the official trainer does, with Python's left-to-right precedence:
    `0.5 * S // p * S // p` = ((0.5*S) // p * S) // p (98 at 224/16, 128 at 256/16)."""
    return int(0.5 * global_crops_size // patch_size * global_crops_size // patch_size)


class MaskingGenerator:
    """BEiT block-wise mask of a (height, width) patch grid, topped up to an exact count."""

    def __init__(self, input_size: int | tuple[int, int], max_num_patches: int | None = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator input_size={input_size} must be positive")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # The official default (max_num_patches=None) falls back to num_masking_patches=None; the
        # trainer always passes 0.5*N, and so do we by default.
        self.max_num_patches = (int(0.5 * self.num_patches) if max_num_patches is None
                                else max_num_patches)
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}x{self.width}, area [{self.min_num_patches}, "
                f"{self.max_num_patches}], log-aspect {self.log_aspect_ratio[0]:.3f}.."
                f"{self.log_aspect_ratio[1]:.3f})")

    def _mask(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to add one rectangle; return the number of patches it added."""
        delta = 0
        for _ in range(10):
            # random.uniform(a, b) semantics: b < a is allowed (max_mask_patches can be < 4 when
            # few patches are left to mask), numpy's Generator.uniform would refuse it.
            lo = self.min_num_patches
            target_area = lo + (max_mask_patches - lo) * rng.random()
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            # BEiT / DINOv3 orientation: aspect = rows / columns (matters when the aspect range
            # is not symmetric around 1)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))  # randint(0, H-h), inclusive
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # adds something, and not more than allowed
                    block[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """[height, width] bool mask with exactly `num_masking_patches` True entries."""
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches={num_masking_patches} must be in "
                             f"[0, {self.num_patches}]")
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return complete_mask_randomly(mask, num_masking_patches, rng)


def complete_mask_randomly(mask: np.ndarray, num_masking_patches: int,
                           rng: np.random.Generator) -> np.ndarray:
    """Top `mask` up with uniformly chosen unmasked patches to exactly `num_masking_patches`."""
    flat = mask.reshape(-1).copy()
    missing = num_masking_patches - int(flat.sum())
    if missing < 0:
        raise ValueError(f"mask already has {int(flat.sum())} > {num_masking_patches} patches")
    if missing:
        to_add = rng.choice(np.flatnonzero(~flat), size=missing, replace=False)
        flat[to_add] = True
    return flat.reshape(mask.shape)


def mask_counts(n_images: int, n_patches: int, mask_probability: float = 0.5,
                ratio_min_max: tuple[float, float] = (0.1, 0.5)) -> list[int]:
    """Masked patches per image before shuffling: int(N*r_i) for the n masked ones, then zeros.

    The ratios are a float32 `torch.linspace`, multiplied in float32 and truncated, exactly as the
    official collate (`int(N * probs[i + 1])` with a float32 tensor) so the totals match it.
    """
    n_masked_imgs = int(n_images * mask_probability)
    probs = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked_imgs + 1)
    counts = [int(n_patches * probs[i + 1]) for i in range(n_masked_imgs)]
    return counts + [0] * (n_images - n_masked_imgs)


@dataclass
class Masks:
    """The iBOT mask outputs of one rank's batch (M = total masked tokens, constant per config)."""

    masks: torch.Tensor  # [2B, N] bool, True = masked
    mask_indices: torch.Tensor  # [M] long, flat indices of the masked tokens in [2B*N]
    masks_weight: torch.Tensor  # [M] float32, 1/(#masked in its image) for each masked token
    n_masked_patches: torch.Tensor  # [1] long, = M (the SK denominator of the iBOT teacher)


def sample_masks(n_images: int, n_patches_hw: tuple[int, int], generator: np.random.Generator,
                 mask_probability: float = 0.5, ratio_min_max: tuple[float, float] = (0.1, 0.5),
                 max_num_patches: int | None = None,
                 mask_generator: MaskingGenerator | None = None) -> Masks:
    """Masks of the `n_images` (= 2B) global crops of a rank, as DINOv3's collate builds them.

    `max_num_patches` defaults to 0.5*N; pass `max_num_patches_for(S, p)` for the official
    precedence formula (identical whenever S is a multiple of p).
    """
    return masks_from_rows(draw_mask_rows(n_images, n_patches_hw, generator, mask_probability,
                                          ratio_min_max, max_num_patches, mask_generator))


def draw_mask_rows(n_images: int, n_patches_hw: tuple[int, int], generator: np.random.Generator,
                   mask_probability: float = 0.5,
                   ratio_min_max: tuple[float, float] = (0.1, 0.5),
                   max_num_patches: int | None = None,
                   mask_generator: MaskingGenerator | None = None) -> np.ndarray:
    """The random part of `sample_masks`: [n_images, N] bool, row r = global crop r (crop-major).
    ~5-10 ms of Python at 2B = 128: the DALI loader draws it in its source worker processes."""
    h, w = n_patches_hw
    n_patches = h * w
    gen = mask_generator or MaskingGenerator((h, w), max_num_patches=max_num_patches)
    rows = [gen(c, generator) for c in mask_counts(n_images, n_patches, mask_probability,
                                                   ratio_min_max)]
    order = generator.permutation(n_images)  # spread the masked images over both crops
    if not n_images:
        return np.zeros((0, n_patches), dtype=bool)
    return np.stack([rows[i].reshape(-1) for i in order])


def masks_from_rows(masks_np: np.ndarray) -> Masks:
    """The deterministic part of `sample_masks`: indices, weights and count from [2B, N] rows."""
    return masks_from_bool(torch.from_numpy(np.ascontiguousarray(masks_np, dtype=bool)))


def masks_from_bool(masks: torch.Tensor, n_masked: int | None = None) -> Masks:
    """Indices, weights and count of [2B, N] bool mask rows (any device).

    `n_masked`: the number of True entries, when the caller knows it without reading `masks`
    (M is a constant of the config, module docstring). Then nothing here reads the device: the
    indices come from `nonzero_static` (a fixed-size output; `nonzero`'s data-dependent shape is a
    host sync on a GPU) and a wrong count fails an asynchronous device assert instead of padding
    the indices. The weights are gathered by row either way (a boolean-mask index is another
    sync)."""
    flat = masks.reshape(-1)
    if n_masked is None:
        mask_indices = flat.nonzero().reshape(-1)  # [M]
    else:
        torch._assert_async(flat.sum() == n_masked,
                            f"masks_from_bool: the masks do not hold n_masked={n_masked} entries")
        mask_indices = torch.nonzero_static(flat, size=n_masked).reshape(-1)
    per_image = masks.sum(-1).clamp(min=1).to(torch.float32)  # [2B]
    rows = mask_indices // max(masks.shape[-1], 1)  # the image of each masked token
    masks_weight = (1.0 / per_image).index_select(0, rows)  # [M], same values as [masks]
    n = torch.full((1,), mask_indices.numel(), dtype=torch.long, device=masks.device)
    return Masks(masks, mask_indices, masks_weight, n)
