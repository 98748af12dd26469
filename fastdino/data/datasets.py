"""Image readers: any folder of images (no labels), or a labelled folder for kNN evaluation.

`ImageFolderUnlabeled` lists a folder recursively (or reads a text file of paths), keeps the files
whose extension is one of IMAGE_EXTENSIONS (case-insensitive) and sorts them, so index i names the
same file on every rank and every run. A file that cannot be decoded is never fatal: `load(i)`
returns the next readable file in that order (i+1, i+2, ... wrapping around), which is the same
whichever process asks; the bad path is counted in `skipped` and logged once per process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("fastdino.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | Path) -> list[str]:
    """Sorted image paths under `root` (recursive, symlinked folders followed)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data.root {str(root)!r} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def read_file_list(file_list: str | Path) -> list[str]:
    """Image paths from a text file, one per line (blank lines and '#' comments ignored);
    relative paths are taken relative to the list's folder."""
    file_list = Path(file_list)
    if not file_list.is_file():
        raise FileNotFoundError(f"file list {str(file_list)!r} does not exist")
    paths = []
    for line in file_list.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(str(p if p.is_absolute() else file_list.parent / p))
    return paths


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale (medical, satellite) -> 8-bit "L". PIL's own convert would clip
    every value above 255 to white. Range: 16-bit modes 0..65535; "I"/"F" 0..255 if the data fits,
    else 0..65535 if it fits, else 0..max of the image."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        hi = 65535.0
    else:
        top = float(np.nanmax(arr)) if arr.size else 0.0
        hi = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray(np.clip(arr * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), "L")


def decode_rgb(path: str) -> Image.Image:
    """Fully decode `path` as an RGB PIL image (raises on unreadable or corrupt files)."""
    with Image.open(path) as img:
        img.load()  # decode now, so truncated files fail here and not inside a transform
        if img.mode.startswith("I") or img.mode == "F":
            return _to_8bit(img).convert("RGB")
        return img.convert("RGB")


class ImageFolderUnlabeled:
    """All images under `root` (recursive) or listed in `file_list`, in a sorted, fixed order."""

    def __init__(self, root: str | Path | None = None, file_list: str | Path | None = None) -> None:
        if (root is None) == (file_list is None):
            raise ValueError("ImageFolderUnlabeled needs exactly one of root= or file_list=")
        if root is not None:
            self.source = str(root)
            self.paths = list_images(root)
        else:
            self.source = str(file_list)
            self.paths = [p for p in read_file_list(file_list) if _is_image(p)]
        if not self.paths:
            raise FileNotFoundError(
                f"no images found in {self.source!r}: allowed extensions are "
                f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive), searched recursively")
        self.skipped: set[str] = set()  # paths found unreadable by this process
        self.log_skipped = True  # the train loader turns this off and reports skips itself

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        """(RGB image, index actually used, paths skipped on the way). Raises only if no file of
        the dataset can be decoded."""
        n = len(self.paths)
        bad = []
        for k in range(n):
            i = (index + k) % n
            path = self.paths[i]
            if path in self.skipped:
                bad.append(path)
                continue
            try:
                return decode_rgb(path), i, tuple(bad)
            except _DECODE_ERRORS as e:
                self.skipped.add(path)
                bad.append(path)
                if self.log_skipped:
                    logger.warning("skipping unreadable image %s (%s: %s)", path,
                                   type(e).__name__, e)
        raise RuntimeError(f"none of the {n} files in {self.source!r} could be decoded as images")


class LabelledImageFolder:
    """`root/<class>/**/<image>`: the class is the first-level subfolder (sorted -> label id)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"labelled image folder {str(root)!r} does not exist")
        self.root = str(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            self.samples.extend((p, label) for p in list_images(root / cls))
        if not self.samples:
            raise FileNotFoundError(
                f"no labelled images found in {self.root!r}: expected <root>/<class>/<image> with "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return decode_rgb(path), label
