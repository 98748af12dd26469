"""Frozen-backbone features for the probes: the eval transform, batched extraction, a disk cache.

    extractor = BackboneExtractor(backbone, image_size=224, batch_size=64)
    feats = cached_features(extractor, paths, cache_dir, key={"weights": info.digest, ...})
    feats["cls"]         [N, D]  x_norm_clstoken (last block + final norm), fp32, not normalised
    feats["patch_mean"]  [N, D]  mean of x_norm_patchtokens over the patches, fp32
    feats["cls_blocks"]  [N, n, D]  with n_last_blocks = n > 1: the normed CLS of the last n
                         blocks (get_intermediate_layers; DINOv2's linear grid), the last one last
    feats["ok"]          [N] bool  False for an image that could not be decoded (corrupt,
                         truncated, not an image: its rows are zeros, and it is named in a warning)
    feats, labels = drop_unreadable(feats, labels, "--data train")   # the probes' rows

Transform (SPEC.md §6, the official kNN/linear eval): resize the shorter side to 256/224 of the
crop (bicubic, torchvision's output size), centre-crop `image_size` x `image_size`, ImageNet
normalisation. Decoding runs in DataLoader workers; the forward runs under bf16 autocast on CUDA
(fp32 on CPU). The progress bar (tqdm) shows on a terminal and stays quiet in logs.

A large JPEG is decoded at 1/2, 1/4 or 1/8 of its size (`jpeg_draft`, on by default: libjpeg's DCT
scaling, several times faster) when its shorter side still spans the resize target (`EvalDraft`);
the output geometry is computed from the full size as before, the pixels within a resampling's
difference. The cache key says which decoding made the features.

Cache: one file per (weights digest, architecture, image size, data file list with sizes and
mtimes, transform version) under `cache_dir`, written atomically (temp + rename) and read with
`torch.load(weights_only=True)`. Anything that could change the features changes the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fastdino.data.datasets import (
    _DECODE_ERRORS,
    DRAFT_INFO,
    decode_location,
    draft_of,
    say_bit_depth,
)
from fastdino.data.labelled import locate
from fastdino.data.sources import read_bytes
from fastdino.data.transforms import CropNeeds
from fastdino.eval.knn import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger("fastdino.eval")

TRANSFORM_VERSION = "resize256-center224-bicubic-imagenet-v2"  # v2: torchvision's rounding
# the transform's version with reduced JPEG decoding (the features differ within resampling)
DRAFT_TRANSFORM_VERSION = TRANSFORM_VERSION + "+jpeg-draft"
# An extractor maps image paths to {"cls": [N, D], "patch_mean": [N, D]} (tests use stubs).
Extractor = Callable[[Sequence[str]], dict[str, torch.Tensor]]


def resize_short(size: int) -> int:
    """The shorter side the eval transform resizes to before its size x size centre crop."""
    return int(size * 256 / 224)


@dataclass(frozen=True)
class EvalDraft:
    """decode_rgb's draft rule for the eval transform: (W, H) -> its room, min(W, H) / the
    resize target's shorter side (a JPEG reduced by at most that still gets a downscale).
    Picklable (DataLoader workers)."""

    short: int

    def __call__(self, width: int, height: int) -> float:
        return min(width, height) / self.short


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """The official eval transform's geometry (torchvision Resize(short) + CenterCrop(size)):
    the shorter side to short = int(size * 256 / 224) (256 for 224, the official
    RESIZE_DEFAULT_SIZE formula), the longer to int(short * longer / shorter) (truncated, as
    torchvision), bicubic; then the size x size crop at int(round((side - size) / 2)). A JPEG
    decoded at 1/k (`EvalDraft`): the sizes come from its full size, and the resize reads the
    reduced image's [0, W / k) x [0, H / k) (its last pixel may cover block padding)."""
    short = resize_short(size)
    w, h, k = draft_of(img)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC,
                     box=None if k == 1 else (0, 0, w / k, h / k))
    img.info.pop(DRAFT_INFO, None)  # (PIL copies info: the resized image is its own full size)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] fp32, ImageNet-normalised."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def random_resized_crop(img: Image.Image, size: int, gen: torch.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (the official linear probe's training view): a box of
    U(scale) of the area and log-uniform aspect ratio (10 tries, else the centre box of the
    closest allowed ratio), resized to size x size, bicubic. Drawn from the full size of a JPEG
    decoded reduced (the box then read at 1/k)."""
    W, H, k = draft_of(img)

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    for _ in range(10):
        area = W * H * uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (), generator=gen))
            left = int(torch.randint(0, W - w + 1, (), generator=gen))
            break
    else:
        if W / H < min(ratio):
            w, h = W, round(W / min(ratio))
        elif W / H > max(ratio):
            w, h = round(H * max(ratio)), H
        else:
            w, h = W, H
        top, left = (H - h) // 2, (W - w) // 2
    box = (left, top, left + w, top + h)
    out = img.resize((size, size), Image.Resampling.BICUBIC,
                     box=box if k == 1 else tuple(v / k for v in box))
    out.info.pop(DRAFT_INFO, None)  # (PIL copies info: the crop is its own full size)
    return out


class _Located:
    """The images' locations, found as asked (say_bit_depth looks at a few of them)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return locate(self.paths[i])


class _EvalImages(torch.utils.data.Dataset):
    """The eval transform of each image; with `view` = (seed, pass) the official linear
    training view instead (random resized crop + horizontal flip 1/2), drawn from a generator
    seeded by (seed, pass, index): the same views in every worker layout and on a rerun."""

    def __init__(self, paths: Sequence[str], image_size: int,
                 view: tuple[int, int] | None = None, white_level: int | None = None,
                 jpeg_draft: bool = True):
        self.paths, self.image_size, self.view = list(paths), image_size, view
        self.white_level = white_level  # --white-level (data.white_level): decode_rgb's
        # reduced JPEG decoding: down to the resize target, or for the training views to the
        # smallest box (scale 0.08) at image_size
        self.draft = None if not jpeg_draft else (
            EvalDraft(resize_short(image_size)) if view is None
            else CropNeeds(((0.08, image_size),)))
        self.locations = _Located(self.paths)  # (datasets.say_bit_depth's view)

    def read(self, i: int) -> bytes:
        return read_bytes(self.locations[i])

    def decode(self, i: int) -> Image.Image:
        return decode_location(self.locations[i], self.white_level, self.paths[i], self.draft)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        """(the image's tensor, True), or (zeros, False) for an image that cannot be decoded:
        one bad file in a labelled folder (a corrupt scan, a macOS ._ file) must not end the
        evaluation (`drop_unreadable` leaves its row out)."""
        try:  # a file, or a `<shard>/<member>` name
            img = self.decode(i)
        except _DECODE_ERRORS:
            return torch.zeros(3, self.image_size, self.image_size), False
        if self.view is None:
            return to_normalized_tensor(resize_center_crop(img, self.image_size)), True
        seed, pass_ = self.view
        gen = torch.Generator().manual_seed(hash((seed, pass_, i)) & (2**63 - 1))
        img = random_resized_crop(img.convert("RGB"), self.image_size, gen)
        if float(torch.rand((), generator=gen)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img), True


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the released models run in bf16), a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class BackboneExtractor:
    """Callable: image paths -> {"cls", "patch_mean"} of a frozen backbone (module docstring)."""

    def __init__(self, backbone: nn.Module, image_size: int = 224, batch_size: int = 64,
                 num_workers: int = 0, progress: bool = True, n_last_blocks: int = 1,
                 white_level: int | None = None, jpeg_draft: bool = True):
        patch = backbone.patch_size
        if image_size % patch != 0:
            raise ValueError(f"--image-size {image_size} is invalid: allowed is a multiple of the "
                             f"patch size {patch}")
        self.backbone, self.image_size = backbone, image_size
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.n_last_blocks = n_last_blocks  # > 1: also "cls_blocks" (DINOv2's linear grid)
        # --white-level: 16-bit images' white (datasets._to_8bit); part of the features' cache
        # key where it is set (the CLI's)
        self.white_level = white_level
        # large JPEGs decoded reduced (module docstring); part of the cache key (`transform`)
        self.jpeg_draft = jpeg_draft

    @property
    def transform(self) -> str:
        """The transform's version, for the features' cache key (`cached_features`)."""
        return DRAFT_TRANSFORM_VERSION if self.jpeg_draft else TRANSFORM_VERSION

    def __call__(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._features(_EvalImages(paths, self.image_size, white_level=self.white_level,
                                          jpeg_draft=self.jpeg_draft),
                              f"features {self.image_size}px")

    def _forward(self, x: torch.Tensor) -> tuple:
        """One backbone forward of a batch -> (normed CLS [b, D], normed patch tokens [b, N, D],
        the last n blocks' (patches, CLS) or None when n_last_blocks = 1). With n > 1,
        get_intermediate_layers(norm=True) alone: its last block, normed by the final norm, is
        forward_features' x_norm_clstoken and x_norm_patchtokens bit for bit (the same blocks,
        the same norm), so a second forward for those would only repeat the work."""
        if self.n_last_blocks == 1:
            out = self.backbone.forward_features(x)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"], None
        layers = self.backbone.get_intermediate_layers(
            x, n=self.n_last_blocks, return_class_token=True, norm=True)
        patches, cls = layers[-1]
        return cls, patches, layers

    def views(self, paths: Sequence[str], seed: int, pass_: int) -> dict[str, torch.Tensor]:
        """The features of one random-resized-crop + flip view of each image (`_EvalImages`),
        the views of training pass `pass_` of the linear probe (`--augment`)."""
        return self._features(_EvalImages(paths, self.image_size, view=(seed, pass_),
                                          white_level=self.white_level,
                                          jpeg_draft=self.jpeg_draft),
                              f"train views, pass {pass_}")

    @torch.no_grad()
    def _features(self, dataset: torch.utils.data.Dataset, desc: str
                  ) -> dict[str, torch.Tensor]:
        from tqdm.auto import tqdm

        blocks_of = getattr(self.backbone, "blocks", None)
        if self.n_last_blocks > 1 and blocks_of is None:  # a ConvNeXt: stages of other widths
            raise ValueError(f"--n-last-blocks {self.n_last_blocks} is invalid: a "
                             f"{type(self.backbone).__name__} backbone gives its last stage's "
                             "features only, allowed is 1")
        depth = len(blocks_of or ())
        if self.n_last_blocks > 1 and self.n_last_blocks > depth:
            raise ValueError(f"--n-last-blocks {self.n_last_blocks} is invalid: the backbone has "
                             f"{depth} blocks, allowed is 1 .. {depth}")
        self.backbone.eval()
        device = next(self.backbone.parameters()).device
        if self.num_workers > 0:
            # the bit-depth notes (a 16-bit image without --white-level, ...) said here once:
            # forked workers inherit that they were said, instead of each saying them
            say_bit_depth(dataset)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size,
            num_workers=self.num_workers, pin_memory=device.type == "cuda")
        cls, patch_mean, blocks, oks = [], [], [], []
        bar = tqdm(loader, desc=desc, unit="batch", disable=None if self.progress else True)
        for x, ok in bar:
            oks.append(ok)
            x = x.to(device, non_blocking=True)
            with autocast_for(device):
                cls_b, patches, layers = self._forward(x)
            cls.append(cls_b.float().cpu())  # [b, D]
            patch_mean.append(patches.float().mean(1).cpu())  # [b, D]
            if layers is not None:
                blocks.append(torch.stack([c for _, c in layers], 1).float().cpu())  # [b, n, D]
        feats = {"cls": torch.cat(cls), "patch_mean": torch.cat(patch_mean),
                 "ok": torch.cat(oks)}
        if self.n_last_blocks > 1:
            feats["cls_blocks"] = torch.cat(blocks)  # [N, n, D], the last block last
        bad = [dataset.paths[i] for i in (~feats["ok"]).nonzero().flatten().tolist()]
        if bad:
            logger.warning("%s: %d image(s) could not be decoded and are left out of the probe: "
                           "%s%s", desc, len(bad), ", ".join(bad[:3]),
                           f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        return feats


def drop_unreadable(feats: dict[str, torch.Tensor], labels: torch.Tensor, what: str
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The rows of the images that were decoded (feats["ok"]; features without it, such as an
    older cache's or a stand-in extractor's: all), and their labels; "ok" itself dropped.
    ValueError naming `what` when none is left."""
    feats = dict(feats)
    ok = feats.pop("ok", None)
    if ok is None or bool(ok.all()):
        return feats, labels
    if not bool(ok.any()):
        raise ValueError(f"{what}: none of its {len(ok)} images could be decoded")
    return {k: v[ok] for k, v in feats.items()}, labels[ok]


def files_fingerprint(paths: Sequence[str]) -> str:
    """sha256 over (path, size, mtime_ns) of every file (a shard member: of its shard, and its
    offset), in order: an edited, added, removed or reordered image changes it."""
    h = hashlib.sha256()
    for p in paths:
        loc = locate(p)  # a shard member: its shard's size and mtime, and where it lies in it
        f, where = (loc, "") if isinstance(loc, str) else (loc.shard, f"|{loc.offset}")
        st = os.stat(f)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}{where}\n".encode())
    return h.hexdigest()


def cache_key(key: dict, paths: Sequence[str], transform: str = TRANSFORM_VERSION) -> str:
    full = {**key, "files": files_fingerprint(paths), "n_files": len(paths),
            "transform": transform}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]


def cached_features(extractor: Extractor, paths: Sequence[str], cache_dir: str | Path | None,
                    key: dict) -> dict[str, torch.Tensor]:
    """extractor(paths), read from / written to `cache_dir` (None: no cache). `key` must name
    everything about the extractor that changes its output (weights digest, arch, image size)."""
    if cache_dir is None:
        return extractor(paths)
    cache_dir = Path(cache_dir)
    # (an extractor's `transform`: BackboneExtractor's says whether JPEGs were decoded reduced)
    name = cache_key(key, paths, getattr(extractor, "transform", TRANSFORM_VERSION))
    file = cache_dir / f"{name}.pt"
    if file.is_file():
        feats = torch.load(file, map_location="cpu", weights_only=True)
        logger.info("features: cache hit %s (%d images)", file, len(paths))
        return feats
    feats = extractor(paths)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
    torch.save({k: v.contiguous() for k, v in feats.items()}, tmp)
    os.replace(tmp, file)  # atomic: a reader sees the old state or the complete file
    logger.info("features: cached %s (%d images)", file, len(paths))
    return feats
