"""What the dense linear probes (seg.py, depth.py) share: (image, target) folder pairs and their
train / val split, shorter-side resizing, the frozen backbone's patch-feature map, the head's
training loop (AdamW, linear warm-up over the first 3.75 % of iterations, the official 1.5k of
40k, then cosine to 0) and mmseg-style sliding-window inference.

Data layout: `<folder>/images/<stem>.<jpg|png|...>` + `<folder>/<targets>/<stem>.<ext>`; splits
`<root>/train/` and `<root>/val/` each laid out like that, or one folder split deterministically
(every 4th image, by sorted stem, is val).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdino.data.datasets import IMAGE_EXTENSIONS
from fastdino.eval.features import autocast_for
from fastdino.eval.head_checkpoint import HeadCheckpoint

Pairs = list[tuple[str, str]]  # (image path, target path)


def list_pairs(folder: str | Path, targets: str, exts: tuple[str, ...], hint: str) -> Pairs:
    """(image, target) pairs of `folder/images` and `folder/<targets>`, matched by stem, sorted.
    `exts`: the target file suffixes looked for, in order of preference."""
    folder = Path(folder)
    img_dir, tgt_dir = folder / "images", folder / targets
    if not img_dir.is_dir() or not tgt_dir.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} needs images/ and {targets}/ subfolders "
                                f"({hint})")
    return stem_pairs(img_dir, tgt_dir, exts)


def stem_pairs(img_dir: Path, tgt_dir: Path, exts: tuple[str, ...]) -> Pairs:
    """(image, target) pairs of the images in `img_dir` and the files of `tgt_dir` with the same
    stem (the first of `exts` present), sorted by image name; a missing target is an error."""
    images = sorted(p for p in img_dir.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    found: dict[str, Path] = {}
    for ext in reversed(exts):  # the preferred suffix wins a stem present twice
        found.update({p.stem: p for p in tgt_dir.glob(f"*{ext}")})
    missing = [p.name for p in images if p.stem not in found]
    if missing:
        raise FileNotFoundError(f"{tgt_dir}: no {' / '.join(exts)} file for {len(missing)} "
                                "image(s): " + ", ".join(missing[:5]))
    if not images:
        raise FileNotFoundError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(str(p), str(found[p.stem])) for p in images]


def pairs_digest(pairs: Pairs) -> str:
    """A short digest of a list of pairs (their paths, in order): which data a head saw."""
    import hashlib

    h = hashlib.sha256("\n".join(f"{a}\t{b}" for a, b in pairs).encode())
    return f"{len(pairs)}:{h.hexdigest()[:16]}"


def split_pairs(root: str | Path, lister: Callable[[Path], Pairs]) -> tuple[Pairs, Pairs]:
    """(train, val): `root/train` + `root/val`, or `root` split every 4th image to val."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return lister(root / "train"), lister(root / "val")
    pairs = lister(root)
    if len(pairs) < 2:
        raise ValueError(f"{root}: a single folder needs at least 2 images to split train/val")
    train = [p for i, p in enumerate(pairs) if i % 4 != 3]
    val = [p for i, p in enumerate(pairs) if i % 4 == 3]
    return train, val


def resize_short(img: Image.Image, short: int, resample) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), resample)


@torch.no_grad()
def patch_feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """image [B, 3, H, W] -> last-layer normed patch tokens [B, D, H/p, W/p], fp32."""
    with autocast_for(x.device):
        feats = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
    return feats.float()


def sliding_window_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor,
                          window: int | tuple[int, int], stride: int | tuple[int, int],
                          n_classes: int) -> torch.Tensor:
    """mmseg-style slide inference: img [B, 3, H, W] -> logits [B, C, H, W], the mean over every
    window covering a pixel. `window` / `stride`: one size or (height, width). Windows start
    every stride pixels, the last one flush with the border; an image smaller than the window is
    zero-padded (and the padding cropped off)."""
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    B, _, H, W = img.shape
    ph, pw = max(0, wh - H), max(0, ww - W)
    x = F.pad(img, (0, pw, 0, ph)) if ph or pw else img
    Hp, Wp = x.shape[-2:]
    n_h = max(Hp - wh + sh - 1, 0) // sh + 1
    n_w = max(Wp - ww + sw - 1, 0) // sw + 1
    out = x.new_zeros(B, n_classes, Hp, Wp, dtype=torch.float32)
    count = x.new_zeros(1, 1, Hp, Wp, dtype=torch.float32)
    for i in range(n_h):
        for j in range(n_w):
            y0, x0 = min(i * sh, Hp - wh), min(j * sw, Wp - ww)
            out[:, :, y0:y0 + wh, x0:x0 + ww] += logits_fn(
                x[:, :, y0:y0 + wh, x0:x0 + ww]).float()
            count[:, :, y0:y0 + wh, x0:x0 + ww] += 1
    assert bool((count > 0).all()), "sliding windows left a pixel uncovered"
    return (out / count)[:, :, :H, :W]


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit_head(head: nn.Module, dataset: torch.utils.data.Dataset,
             loss_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], *,
             iterations: int,
             batch_size: int, lr: float, weight_decay: float, clip: float | None = None,
             num_workers: int = 0, seed: int = 0, desc: str = "head",
             progress: bool = True, checkpoint: HeadCheckpoint | None = None) -> nn.Module:
    """Train `head` (on the device of its parameters) for `iterations` steps of
    loss_fn(images, targets, step) over shuffled batches of `dataset`; returns it in eval mode.
    `checkpoint`: resume from it and save to it (head_checkpoint.py)."""
    from tqdm.auto import tqdm

    device = next(head.parameters()).device
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    step = checkpoint.load(head, opt) if checkpoint is not None else 0
    if step >= iterations:
        return head.eval()  # a finished fit: evaluated again as it is
    warmup = max(1, round(iterations * 1.5 / 40))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
        num_workers=num_workers, generator=torch.Generator().manual_seed(seed + step))
    bar = tqdm(total=iterations, initial=step, desc=desc, unit="it",
               disable=None if progress else True)
    while step < iterations:
        for x, y in loader:
            if step >= iterations:
                break
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, iterations, warmup)
            loss = loss_fn(x.to(device), y.to(device), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
            opt.step()
            step += 1
            if checkpoint is not None and checkpoint.due(step, iterations):
                checkpoint.save(head, opt, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return head.eval()
