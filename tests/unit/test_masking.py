"""iBOT block masking (SPEC.md §1.4): exact counts, static shapes, determinism, weights, blocks."""

import numpy as np
import pytest
import torch

from fastdino.data.masking import (
    MaskingGenerator,
    complete_mask_randomly,
    mask_counts,
    max_num_patches_for,
    sample_masks,
)


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("size,patch,expected", [(224, 16, 98), (256, 16, 128), (512, 16, 512)])
def test_max_num_patches_official_precedence(size, patch, expected):
    # Values stated in SPEC.md §1.4 for `0.5*S//p*S//p`.
    assert max_num_patches_for(size, patch) == expected


@pytest.mark.parametrize("batch,grid,total", [(64, 14, 3771), (16, 16, 1274)])
def test_total_masked_tokens_match_official_constants(batch, grid, total):
    # ViT-L IN1k B=64 at 224 px: 3771; 7B B=16 at 256 px: 1274 (SPEC.md §1.4).
    m = sample_masks(2 * batch, (grid, grid), rng(1))
    assert int(m.n_masked_patches) == total
    assert m.mask_indices.numel() == total
    assert int(m.masks.sum()) == total


def test_per_image_counts_are_int_n_times_linspace_ratios():
    n_images, n = 16, 14 * 14
    m = sample_masks(n_images, (14, 14), rng(3))
    n_masked_imgs = n_images // 2
    ratios = np.linspace(0.1, 0.5, n_masked_imgs + 1)[1:]  # independent float64 computation
    expected = sorted([int(n * r) for r in ratios] + [0] * (n_images - n_masked_imgs))
    assert sorted(m.masks.sum(-1).tolist()) == expected
    assert mask_counts(n_images, n) == [int(n * r) for r in ratios] + [0] * 8


def test_static_shapes_across_seeds():
    shapes = {tuple(sample_masks(8, (14, 14), rng(s)).mask_indices.shape) for s in range(10)}
    assert len(shapes) == 1


def test_deterministic_under_a_seed_and_different_across_seeds():
    a, b = sample_masks(8, (14, 14), rng(5)), sample_masks(8, (14, 14), rng(5))
    c = sample_masks(8, (14, 14), rng(6))
    assert torch.equal(a.masks, b.masks) and torch.equal(a.masks_weight, b.masks_weight)
    assert not torch.equal(a.masks, c.masks)


def test_indices_weights_and_counts_are_consistent():
    n_images = 12
    m = sample_masks(n_images, (16, 16), rng(2))
    flat = m.masks.reshape(-1)
    assert torch.equal(m.mask_indices, torch.arange(flat.numel())[flat])
    assert m.mask_indices.dtype == torch.long and m.masks_weight.dtype == torch.float32
    assert m.n_masked_patches.shape == (1,) and m.n_masked_patches.dtype == torch.long
    image_of_token = m.mask_indices // 256
    per_image = m.masks.sum(-1)
    assert torch.allclose(m.masks_weight, 1.0 / per_image[image_of_token].float())
    # each masked image contributes weights summing to 1, so the total is n_masked_imgs
    assert m.masks_weight.sum().item() == pytest.approx(n_images // 2, rel=1e-5)


def test_masked_images_are_shuffled_over_both_crops():
    # Without the shuffle the masked images would always be the first half (= global crop 0).
    second_half_masked = sum(int(sample_masks(8, (14, 14), rng(s)).masks[4:].any(-1).sum())
                             for s in range(20))
    assert second_half_masked > 0


def test_generator_exact_count_for_every_target():
    gen = MaskingGenerator((7, 9))
    g = rng(0)
    for target in range(0, 64):
        m = gen(target, g)
        assert m.shape == (7, 9) and m.dtype == bool and int(m.sum()) == target


def test_one_block_is_a_rectangle():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    for s in range(20):
        mask = np.zeros((14, 14), dtype=bool)
        added = gen._mask(mask, 98, rng(s))
        if added == 0:
            continue
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == added == mask.sum()  # a filled rectangle
        assert 1 <= added <= 98


def _adjacent_pairs(mask: np.ndarray) -> int:
    return int((mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum())


def test_block_masks_are_contiguous_compared_to_random_masks():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    g = rng(4)
    block = np.mean([_adjacent_pairs(gen(60, g)) for _ in range(30)])
    random = np.mean([_adjacent_pairs(complete_mask_randomly(np.zeros((14, 14), bool), 60, g))
                      for _ in range(30)])
    # 60 of 196 patches: uniformly random masks have ~2*182*(60/196)^2 ~ 34 adjacent pairs; BEiT
    # blocks have far more.
    assert block > 1.5 * random


def test_complete_mask_randomly_only_adds():
    base = np.zeros((5, 5), dtype=bool)
    base[0, :3] = True
    out = complete_mask_randomly(base, 10, rng(0))
    assert out.sum() == 10 and out[0, :3].all()
    with pytest.raises(ValueError):
        complete_mask_randomly(out, 5, rng(0))


def test_no_masked_images_when_probability_zero():
    m = sample_masks(4, (2, 2), rng(0), mask_probability=0.0)
    assert m.mask_indices.numel() == 0 and int(m.n_masked_patches) == 0


def test_block_orientation_follows_the_aspect_ratio_as_beit():
    """BEiT / DINOv3 `_mask`: h = round(sqrt(area·aspect)) rows, w = round(sqrt(area/aspect))
    columns. With the default symmetric log-aspect range the orientation cannot be seen; an
    aspect range above 1 must give blocks taller (more rows) than wide."""
    gen = MaskingGenerator((14, 14), max_num_patches=98, min_aspect=2.0, max_aspect=3.0)
    tall = 0
    for s in range(20):
        mask = np.zeros((14, 14), dtype=bool)
        if gen._mask(mask, 98, rng(s)) == 0:
            continue
        rows, cols = np.nonzero(mask)
        n_rows, n_cols = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert n_rows >= n_cols, (s, n_rows, n_cols)
        tall += n_rows > n_cols
    assert tall >= 10
