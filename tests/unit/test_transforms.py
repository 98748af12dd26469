"""Multi-crop augmentation (SPEC.md §3.4): geometry, ops, probabilities, Gram crops."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fastdino.config import CropsConfig
from fastdino.data.transforms import (
    DataAugmentationDINO,
    adjust_hue,
    gaussian_blur,
    gaussian_kernel1d,
    random_resized_crop_params,
    resize,
    solarize,
)


def rng(seed=0):
    return np.random.default_rng(seed)


def noise_image(h=40, w=48, seed=0):
    return Image.fromarray(rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def smooth_image(h=120, w=160):
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) * 255 / (h + w)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_random_resized_crop_params_respect_scale_and_ratio():
    g = rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(300, 200, (0.32, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        # rounding of h and w moves area and ratio by at most a pixel each
        assert 0.32 * 60000 * 0.97 <= h * w <= 60000
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_random_resized_crop_fallback_is_the_clamped_centre_crop():
    # A 100x1 strip: no crop with area >= 90% and ratio in [3/4, 4/3] fits in 10 tries, so
    # torchvision's fallback takes h = 1, w = round(1 * 4/3) = 1, centred: left = (100-1)//2.
    assert random_resized_crop_params(100, 1, (0.9, 1.0), (3 / 4, 4 / 3), rng(0)) == (0, 49, 1, 1)
    # A 10x100 column: in_ratio 0.1 < 3/4 -> w = 10, h = round(10 / 0.75) = 13, top = (100-13)//2
    params = random_resized_crop_params(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), rng(0))
    assert params == (43, 0, 13, 10)


def test_gaussian_kernel_is_torchvisions():
    sigma = 0.7
    k = gaussian_kernel1d(9, sigma)
    x = np.arange(-4, 5)
    ref = np.exp(-0.5 * (x / sigma) ** 2)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), rtol=1e-6)


def test_gaussian_blur_equals_2d_convolution_with_reflect_border():
    img = noise_image(23, 31)
    sigma = 1.3
    out = np.asarray(gaussian_blur(img, sigma)).astype(np.float64)
    k1 = gaussian_kernel1d(9, sigma).double().numpy()
    k2 = np.outer(k1, k1)  # the full 9x9 kernel
    arr = np.asarray(img).astype(np.float64)
    # torch's "reflect" padding = scipy's "mirror" (the edge pixel is not repeated)
    ref = np.stack([ndimage.correlate(arr[..., c], k2, mode="mirror") for c in range(3)], -1)
    assert np.abs(out - np.clip(np.round(ref), 0, 255)).max() <= 1


def test_solarize_threshold_128():
    img = Image.fromarray(np.array([[[0, 127, 128], [200, 255, 50]]], dtype=np.uint8))
    out = np.asarray(solarize(img))
    assert out.tolist() == [[[0, 127, 127], [55, 0, 50]]]


def test_hue_shift_turns_red_into_green():
    red = Image.fromarray(np.full((2, 2, 3), (255, 0, 0), dtype=np.uint8))
    r, g, b = np.asarray(adjust_hue(red, 1 / 3))[0, 0].astype(int)
    assert g > 200 and r < 60 and b < 60  # +120 degrees


def test_resize_shorter_side():
    assert resize(smooth_image(120, 160), 60).size == (80, 60)


def _aug(**kw):
    return DataAugmentationDINO(CropsConfig(global_crops_size=32, local_crops_size=16,
                                            local_crops_number=3, **kw), record_ops=True)


def test_output_shapes_and_normalisation():
    out = _aug()(noise_image(), rng(0))
    assert [t.shape for t in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 16, 16)] * 3
    assert "gram_crops" not in out
    flat = DataAugmentationDINO(CropsConfig(global_crops_size=16, local_crops_size=16))
    x = flat.normalize(Image.new("RGB", (4, 4), (255, 0, 128)))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = [(255 / 255 - mean[0]) / std[0], (0 - mean[1]) / std[1], (128 / 255 - mean[2]) / std[2]]
    np.testing.assert_allclose(x[:, 0, 0].numpy(), want, rtol=1e-6)


def test_normalize_is_the_float32_arithmetic_bit_for_bit():
    """The lookup-table normalisation equals ToTensor + Normalize's float32 arithmetic on the HWC
    image for every uint8 value of every channel (each output depends on (channel, value) only,
    so this covers all images), channel-major, on an odd-sized image."""
    crops = CropsConfig(global_crops_size=16, local_crops_size=16, mean=(0.5, 0.41, 0.3),
                        std=(0.2, 0.27, 0.31))
    aug = DataAugmentationDINO(crops)
    g = np.random.default_rng(3)
    a = np.stack([g.permutation(256), g.permutation(256), np.arange(256)], -1)  # [256, 3]
    a = np.concatenate([a, a[:5]]).reshape(3, 87, 3).astype(np.uint8)  # 261 pixels, 3 x 87
    mean, std = np.float32(crops.mean), np.float32(crops.std)
    want = (a.astype(np.float32) / 255.0 - mean) / std
    got = aug.normalize(Image.fromarray(a, "RGB"))
    assert got.shape == (3, 3, 87) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want.transpose(2, 0, 1))))


def test_same_generator_seed_same_crops():
    a = _aug()(noise_image(), rng(7))
    b = _aug()(noise_image(), rng(7))
    c = _aug()(noise_image(), rng(8))
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"], b["global_crops"], strict=True))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def _rates(aug, n):
    img = noise_image(20, 20)
    g = rng(123)
    counts = {"g1_blur": 0, "g2_blur": 0, "l_blur": 0, "g1_sol": 0, "g2_sol": 0, "l_sol": 0,
              "flip": 0, "jitter": 0, "gray": 0}
    n_local = 0
    for _ in range(n):
        ops = aug(img, g)["ops"]
        (o1, o2), locs = ops["global"], ops["local"]
        counts["g1_blur"] += o1.blur
        counts["g2_blur"] += o2.blur
        counts["g1_sol"] += o1.solarize
        counts["g2_sol"] += o2.solarize
        for o in locs:
            counts["l_blur"] += o.blur
            counts["l_sol"] += o.solarize
        for o in (o1, o2, *locs):
            counts["flip"] += o.flip
            counts["jitter"] += o.jitter
            counts["gray"] += o.grayscale
        n_local += len(locs)
    return counts, n_local


@pytest.mark.parametrize("mode,g1,g2,loc",
                         [("intended", 1.0, 0.1, 0.5), ("official", 0.0, 0.9, 0.5)])
def test_blur_and_solarize_probabilities(mode, g1, g2, loc):
    n = 400
    aug = DataAugmentationDINO(CropsConfig(global_crops_size=8, local_crops_size=8,
                                           local_crops_number=2, blur_probabilities=mode),
                               record_ops=True)
    c, n_local = _rates(aug, n)

    def close(count, total, p):  # within 4.5 standard deviations of the binomial
        return abs(count / total - p) <= 4.5 * math.sqrt(p * (1 - p) / total) + 1e-12

    assert close(c["g1_blur"], n, g1) and close(c["g2_blur"], n, g2)
    assert close(c["l_blur"], n_local, loc)
    # solarise: global crop 2 only, p = 0.2
    assert c["g1_sol"] == 0 and c["l_sol"] == 0 and close(c["g2_sol"], n, 0.2)
    n_crops = 2 * n + n_local
    assert close(c["flip"], n_crops, 0.5)
    assert close(c["jitter"], n_crops, 0.8) and close(c["gray"], n_crops, 0.2)


def test_no_flip_when_disabled():
    c, _ = _rates(DataAugmentationDINO(CropsConfig(global_crops_size=8, local_crops_size=8,
                                                   local_crops_number=1, horizontal_flip=False),
                                       record_ops=True), 50)
    assert c["flip"] == 0


def _undistorted_seed(aug, img):
    for s in range(200):
        out = aug(img, rng(s))
        o = out["ops"]["global"][0]
        if not (o.jitter or o.grayscale or o.blur):
            return out
    raise AssertionError("no undistorted global crop in 200 seeds")


def test_gram_crops_share_the_geometry_and_skip_distortions():
    img = smooth_image()
    aug = DataAugmentationDINO(CropsConfig(global_crops_size=32, local_crops_size=16,
                                           local_crops_number=1, gram_teacher_crops_size=64,
                                           blur_probabilities="official"), record_ops=True)
    out = _undistorted_seed(aug, img)
    assert [t.shape for t in out["gram_crops"]] == [(3, 64, 64)] * 2
    # Downsized to the student size, the Gram crop is the student crop (same crop box and flip;
    # bicubic resampling differs by a few levels).
    gram_small = torch.nn.functional.interpolate(out["gram_crops"][0][None], size=32,
                                                 mode="bilinear", antialias=True)[0]
    student = out["global_crops"][0]
    same = (gram_small - student).abs().mean()
    other = (gram_small - out["global_crops"][1]).abs().mean()  # a different crop box
    assert same < 0.05 and other > 4 * same


def test_gram_crops_are_never_distorted():
    img = noise_image(30, 30)
    aug = DataAugmentationDINO(CropsConfig(global_crops_size=16, local_crops_size=16,
                                           local_crops_number=1, gram_teacher_crops_size=16),
                               record_ops=False)
    # With equal sizes and no distortions the Gram crop is the undistorted base crop; the student
    # crop differs whenever jitter/greyscale/blur/solarise fired, which "intended" blur guarantees
    # for global crop 1 (p=1.0).
    g = rng(0)
    out = aug(img, g)
    assert not torch.equal(out["gram_crops"][0], out["global_crops"][0])
    # Same image with every distortion impossible: identical.
    class NoDistort(DataAugmentationDINO):
        def _distort(self, img, blur_p, solarize_p, rng, ops):
            return img
    out2 = NoDistort(aug.crops)(img, rng(0))
    assert torch.equal(out2["gram_crops"][0], out2["global_crops"][0])


def test_gaussian_kernels1d_equals_gaussian_kernel1d_row_by_row():
    """The DALI loader's blur taps (one batched call per step) are the torch loader's, to the bit,
    for double sigmas and their float32 roundings (the plan stores sigma as float32)."""
    from fastdino.data.transforms import gaussian_kernels1d

    sigmas = np.random.default_rng(0).uniform(0.1, 2.0, 3000)
    batched = gaussian_kernels1d(9, torch.from_numpy(sigmas.astype(np.float32)))
    for s, row in zip(sigmas, batched, strict=True):
        assert torch.equal(row, gaussian_kernel1d(9, float(s)))
    assert not torch.equal(batched[0], batched[1])
