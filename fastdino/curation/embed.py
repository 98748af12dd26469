"""`curate embed`: the CLS embedding of every image of a folder, L2-normalised, on disk.

The images are found as the trainer's `data.root` finds them (fastdino.data.sources): a folder
(recursive, with the images inside its .tar shards), a tar shard, or a glob / brace pattern of
them; a member of a shard is named `<shard>/<member>`, which file lists (data.file_list) accept.

    embed_folder("/imgs", backbone, "E/", image_size=224, batch_size=256)
    E/files.txt        one absolute image name per line (row i of the matrix = line i)
    E/embeddings.npy   [N, D] fp16, np.lib.format.open_memmap (np.load(..., mmap_mode="r"))
    E/progress.json    {"done": rows on disk, "key": what was embedded how, "complete": bool}
    E/skipped.txt      images that could not be decoded (their rows are NaN: no cluster)
    E/patches.npy      with patches=True: [N, h, w, D] fp16 x_norm_patchtokens (after the final
                       norm, not L2-normalised; h = w = image_size / patch), the patch features
                       for your own dense heads or retrieval, rows as embeddings.npy

Transform: the evaluation one (fastdino.eval.features: resize to 256/224 of the crop, centre crop,
ImageNet normalisation); bf16 autocast on CUDA. Resumable: rows are flushed to the memory map
before progress.json is rewritten (atomically), so after an interruption a rerun with the same
folder and weights continues at the first row not on disk; a different folder listing, weights or
image size is refused rather than mixed into the same matrix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdino.curation.progress import Progress
from fastdino.data.datasets import decode_location, white_level_key
from fastdino.data.packed import PackedLocations, PackedStrings
from fastdino.data.sources import find_images
from fastdino.eval.features import (
    EvalDraft,
    autocast_for,
    resize_center_crop,
    resize_short,
    to_normalized_tensor,
)

logger = logging.getLogger("fastdino.curation")

FILES, EMBEDDINGS, PROGRESS, SKIPPED = "files.txt", "embeddings.npy", "progress.json", "skipped.txt"
PATCHES = "patches.npy"
# what decode_rgb raises on a corrupt or truncated file (as fastdino.data.datasets skips them)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Images(torch.utils.data.Dataset):
    """(image tensor, ok) of images start, start + 1, ...: an unreadable file gives zeros and
    ok=False (never fatal). `locations` is packed: the loader's forked workers share it."""

    def __init__(self, locations: PackedLocations, start: int, image_size: int,
                 white_level: int | None = None, jpeg_draft: bool = True):
        self.locations, self.start, self.image_size = locations, start, image_size
        self.white_level = white_level  # --white-level (decode_rgb's)
        # large JPEGs decoded reduced down to the resize target, as eval's features
        self.draft = EvalDraft(resize_short(image_size)) if jpeg_draft else None

    def __len__(self) -> int:
        return len(self.locations) - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            img = decode_location(self.locations[self.start + i], self.white_level,
                                  draft=self.draft)
        except DECODE_ERRORS:
            return torch.zeros(3, self.image_size, self.image_size), False
        return to_normalized_tensor(resize_center_crop(img, self.image_size)), True


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic: a reader sees the old or the new progress, never half


def write_names(path: str | Path, names) -> None:
    """Image names, one a line. UTF-8 with surrogateescape: a file name that is not UTF-8
    (b'caf\\xe9.jpg', a str with surrogates to os) is written as its own bytes, and read back
    (`read_names`) as the same str."""
    Path(path).write_text("".join(name + "\n" for name in names), encoding="utf-8",
                          errors="surrogateescape")


def read_names(path: str | Path) -> list[str]:
    return Path(path).read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def read_files(out: str | Path) -> list[str]:
    return read_names(Path(out) / FILES)


def check_image_size(image_size: int, patch: int, what: str = "image_size") -> None:
    """The centre crop must be whole patches (the patch grid, and patches.npy's h = w)."""
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"{what} {image_size}: must be a positive multiple of the "
                         f"backbone's patch size {patch} (e.g. "
                         f"{max(1, round(image_size / patch)) * patch})")


@torch.no_grad()
def embed_folder(data: str | Path, backbone: nn.Module, out: str | Path, key: dict,
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 0,
                 progress: bool = True, patches: bool = False,
                 white_level: int | None = None, jpeg_draft: bool = True) -> Path:
    """Embed every image under `data` into `out` (module docstring); returns the matrix path.
    `key` names the weights (e.g. {"weights": digest}): a rerun must present the same one.
    `patches`: also the patch-token matrix (patches.npy), written and resumed in lockstep.
    `white_level`: 16-bit images' white (--white-level, data.white_level: datasets._to_8bit),
    in the key where it is set (a rerun with another is refused). `jpeg_draft`: large JPEGs
    decoded at 1/2, 1/4 or 1/8 down to the resize target (eval's features alike; --no-jpeg-draft
    off), in the key when on (a folder embedded before it, or with it off, is continued only
    with it off: no matrix mixes rows decoded both ways)."""
    patch = int(backbone.patch_size)
    check_image_size(image_size, patch)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # absolute names: each piece of the pattern made so after its brace expansion (the whole
    # pattern made absolute turned `{/a,/b}` into `/cwd/{/a,/b}`)
    found = find_images(str(data), what="--data", absolute=True)
    if not found:
        raise FileNotFoundError(f"--data {str(data)!r} holds no images")
    paths = PackedStrings(name for name, _ in found)
    locations = PackedLocations(paths, (loc for _, loc in found))
    del found
    device = next(backbone.parameters()).device
    dim = int(backbone.embed_dim)
    full_key = {**key, "image_size": image_size, "n": len(paths), "dim": dim}
    grid = image_size // patch
    if patches:  # (only then: folders embedded before this option keep their key)
        full_key["patches"] = [grid, grid]
    full_key.update(white_level_key(white_level))  # (the same: nothing when None)
    if jpeg_draft:
        full_key["decode"] = "jpeg-draft"
    state_file, matrix = out / PROGRESS, out / EMBEDDINGS
    done = 0
    if state_file.is_file() and matrix.is_file():
        state = json.loads(state_file.read_text())
        old = state.get("key") or {}
        # name what differs (adding --patches to a rerun was "other images, weights or size")
        differ = [k for k in {**old, **full_key} if old.get(k) != full_key.get(k)]
        if not differ and read_files(out) != paths:
            differ = ["image list"]
        if differ:
            # (an option not given shows as None: "{} now" said nothing)
            keys = [k for k in differ if k != "image list"]
            values = (f": { {k: old.get(k) for k in keys} } on disk, "
                      f"{ {k: full_key.get(k) for k in keys} } now" if keys else "")
            raise ValueError(f"{out} holds embeddings made otherwise ({', '.join(differ)} "
                             f"differ{values}): use a new --out folder, or the same arguments "
                             "to resume")
        done = int(state["done"])
        emb = np.lib.format.open_memmap(matrix, mode="r+")
        pat = np.lib.format.open_memmap(out / PATCHES, mode="r+") if patches else None
        logger.info("embed: resuming at row %d of %d", done, len(paths))
    else:
        write_names(out / FILES, paths)
        emb = np.lib.format.open_memmap(matrix, mode="w+", dtype=np.float16,
                                        shape=(len(paths), dim))
        pat = (np.lib.format.open_memmap(out / PATCHES, mode="w+", dtype=np.float16,
                                         shape=(len(paths), grid, grid, dim))
               if patches else None)
        _write_json(state_file, {"done": 0, "key": full_key, "complete": False})
    skipped_file = out / SKIPPED
    skipped = read_names(skipped_file) if skipped_file.is_file() else []

    backbone.eval()
    loader = torch.utils.data.DataLoader(_Images(locations, done, image_size, white_level,
                                                 jpeg_draft),
                                         batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    # a bar on a terminal, else a log line every ~10 s (tqdm alone showed nothing in a job's log)
    bar = Progress(len(paths), "embed", "images", "img", initial=done, enabled=progress)
    row = done
    for x, ok in loader:
        with autocast_for(device):
            f = backbone.forward_features(x.to(device, non_blocking=True))
        e = F.normalize(f["x_norm_clstoken"].float(), dim=-1).cpu()  # [b, D]
        e[~ok] = float("nan")  # unreadable image: no embedding
        b = len(e)
        emb[row:row + b] = e.numpy().astype(np.float16)
        emb.flush()  # rows on disk before the progress file says so
        if pat is not None:
            t = f["x_norm_patchtokens"].float().cpu().reshape(b, grid, grid, dim)
            t[~ok] = float("nan")
            pat[row:row + b] = t.numpy().astype(np.float16)
            pat.flush()
        bad = [paths[row + i] for i in np.nonzero(~ok.numpy())[0]]
        if bad:  # (once each: a batch redone after an interruption lists its own again)
            skipped = list(dict.fromkeys(skipped + bad))
            write_names(skipped_file, skipped)
            logger.warning("embed: %d unreadable image(s), e.g. %s", len(bad), bad[0])
        row += b
        _write_json(state_file, {"done": row, "key": full_key, "complete": row == len(paths)})
        bar.update(b)
    bar.close()
    if row == len(paths):  # also when resuming a finished run
        _write_json(state_file, {"done": row, "key": full_key, "complete": True})
    return matrix
