"""Embedded sample data: real images that ship inside pip wheels, written to a cache on first use.

- `sample_images_dir()`: scikit-image's bundled photographs (no download: only files inside the
  skimage 0.26 wheel), as JPEG (colour) and PNG (greyscale), for smoke training runs.
- `digits_labelled_dir()`: scikit-learn's 8x8 digits upscaled to RGB PNGs in `train/<digit>/` and
  `val/<digit>/`, a small labelled set for the kNN learning check.

The cache folder is $FASTDINO_CACHE, else ~/.cache/fastdino. Each folder is built in a temporary
sibling and renamed into place, so a crash or a concurrent first use (several ranks) never leaves a
half-written folder: whoever renames first wins, the others discard their copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

# skimage.data loaders of photographs shipped in the wheel (checked offline with skimage 0.26).
# Textures and photos only: no synthetic patterns, no files that need `pooch` to download.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "moon", "coins", "clock", "brick", "grass", "gravel", "cell",
    "microaneurysms",
)


def cache_dir() -> Path:
    return Path(os.environ.get("FASTDINO_CACHE") or Path.home() / ".cache" / "fastdino")


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic on POSIX; fails if another process got there first
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _skimage_photos() -> dict[str, np.ndarray]:
    try:
        import skimage.data as skd
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the embedded sample images need scikit-image: pip install "
                          "'fastdino[eval]' (or pass data.root=<your image folder>)") from e
    photos = {name: getattr(skd, name)() for name in SKIMAGE_PHOTOS}
    left, right, _disparity = skd.stereo_motorcycle()
    photos["motorcycle_left"], photos["motorcycle_right"] = left, right
    return photos


def _write_photos(folder: Path) -> None:
    for name, arr in _skimage_photos().items():
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            raise TypeError(f"skimage.data.{name} is {arr.dtype}, expected uint8")
        if arr.ndim == 3:  # colour -> JPEG (drop alpha if any)
            Image.fromarray(arr[..., :3]).save(folder / f"{name}.jpg", quality=95)
        else:  # greyscale -> PNG (the loader converts to RGB)
            Image.fromarray(arr).save(folder / f"{name}.png")


def sample_images_dir() -> Path:
    """Folder of ~18 real photographs (JPEG + PNG), written on first use."""
    return _build_atomically(cache_dir() / "sample_images", _write_photos)


def _write_digits(folder: Path, size: int, val_fraction: float, seed: int) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("the digits sample set needs scikit-learn: pip install "
                          "'fastdino[eval]'") from e
    digits = load_digits()
    images = digits.images  # [1797, 8, 8] float in [0, 16]
    labels = digits.target
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        gray = (images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        out = folder / split / str(labels[i])
        out.mkdir(parents=True, exist_ok=True)
        img.save(out / f"{i:04d}.png")


def digits_labelled_dir(size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """`<dir>/train/<digit>/*.png` and `<dir>/val/<digit>/*.png` (sklearn digits, RGB, size px)."""
    name = f"digits_{size}px_val{val_fraction:g}_seed{seed}"
    return _build_atomically(cache_dir() / name,
                             lambda d: _write_digits(d, size, val_fraction, seed))


def _write_benchmark_jpegs(folder: Path, n: int, seed: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    photos = [Image.fromarray(np.asarray(a)).convert("RGB") for a in _skimage_photos().values()]

    def one(i: int) -> None:
        rng = np.random.default_rng([seed, i])  # per image: the same folder whatever the threads
        src = photos[i % len(photos)]
        w, h = src.size
        # a random crop of 40-100 % of each side, resized to an ImageNet-typical 500 x 375
        # (landscape or portrait), quality 90
        cw, ch = (max(16, int(s * rng.uniform(0.4, 1.0))) for s in (w, h))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = (500, 375) if rng.random() < 0.75 else (375, 500)
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(out, Image.Resampling.BILINEAR)
        img = np.asarray(img)
        # sensor-like noise: upscaled crops are smoother than photographs, and JPEG decode time
        # grows with the entropy-coded bytes (~70 KB per image with it; ImageNet's average is ~110)
        img = np.clip(img + rng.normal(0.0, 10.0, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)

    # PIL's resize and JPEG encoder release the GIL: threads scale on a many-core GPU machine
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(n)))


def benchmark_jpeg_dir(n: int = 2048, seed: int = 0) -> Path:
    """Folder of `n` ImageNet-like JPEGs (500 x 375 or 375 x 500, quality 90, ~70 KB) cut from
    the embedded photographs, for loader benchmarks where no dataset can be reached (the GPU
    machine). Written on first use (~27 ms per image on one core; threads share the work)."""
    if n < 1:
        raise ValueError(f"benchmark_jpeg_dir: n={n}, need at least 1 image")
    return _build_atomically(cache_dir() / f"benchmark_jpegs_{n}_seed{seed}",
                             lambda d: _write_benchmark_jpegs(d, n, seed))
