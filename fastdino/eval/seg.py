"""Dense linear probe for semantic segmentation (SPEC.md §6, ADE20k "linear" config), with mIoU.

    res = seg_eval(backbone, train_pairs, val_pairs, n_classes=3, crop=512, iterations=2000)
    # {"miou": 0.41, "iou": [...], "pixel_acc": 0.83, ...}

Data: `<folder>/images/<stem>.<jpg|png|...>` + `<folder>/masks/<stem>.png` (integer class ids,
PNG mode L / P / I; 255 = ignore). Splits: `<root>/train/` and `<root>/val/` each laid out like
that, or one folder split deterministically (every 4th image, by sorted stem, is val): dense.py.
The CLI also reads ADE20K, Pascal VOC 2012 and Cityscapes as downloaded, and list files
(dense_layouts.py). `reduce_zero_label` (ADE20K's protocol): id 0 is ignored, ids 1.. become 0..

Head (official linear config): last-layer patch tokens after the backbone's final norm
[B, D, h, w] -> Dropout2d(0.1) -> BatchNorm2d -> 1x1 conv -> C logits at patch resolution (the
official LinearHead's order: BN's running variance is that of the dropped-out features),
bilinearly upsampled to the crop. Frozen backbone (bf16 autocast on CUDA), head in fp32.
Training (the official transforms, dinov3/eval/segmentation/transforms.py): random scale jitter
0.5-2 of "shorter side = crop", random crop x crop redrawn (up to 10 times) while one class
covers >= 75% of it (cat_max_ratio), horizontal flip, photometric distortion (brightness,
contrast, saturation, hue; `photometric=False` / `--no-photometric` leaves it out), padding
(image 0, mask 255); AdamW lr 1e-3, wd 1e-3, linear warmup over the first 3.75% of iterations
(1.5k of the official 40k), then cosine to 0; cross-entropy, ignore 255.
Inference (official): the image resized so its shorter side is the crop, then sliding windows of
crop x crop with stride round(2/3 crop) (512 / 341), logits averaged where windows overlap,
bilinearly resized to the mask's size, argmax. mIoU = mean over classes that occur in the ground
truth or the prediction of TP / (TP + FP + FN), from one confusion matrix over all val pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdino.data.datasets import decode_rgb, white_level_key
from fastdino.eval import dense
from fastdino.eval.dense import Pairs, patch_feature_map, resize_short, sliding_window_logits
from fastdino.eval.features import to_normalized_tensor
from fastdino.eval.head_checkpoint import HeadCheckpoint, head_checkpoint

IGNORE = 255


# ------------------------------------------------------------------------------------------ data
def list_pairs(folder: str | Path) -> Pairs:
    """(image, mask) pairs of `folder/images` and `folder/masks`, matched by stem, sorted."""
    return dense.list_pairs(folder, "masks", (".png",),
                            "masks: integer PNGs with the images' stems")


def seg_splits(root: str | Path) -> tuple[Pairs, Pairs]:
    """(train, val) pairs: `root/train` + `root/val`, or `root` split every 4th image to val."""
    return dense.split_pairs(root, list_pairs)


def load_mask(path: str, reduce_zero_label: bool = False) -> np.ndarray:
    """[H, W] int64 class ids of an integer mask PNG; with `reduce_zero_label` 0 -> IGNORE and
    every other id minus 1 (IGNORE stays IGNORE), as mmseg's ADE20K loader."""
    with Image.open(path) as m:
        if m.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"mask {path!r} has PIL mode {m.mode!r}: allowed are integer PNGs "
                             "(L, P, I, I;16), one class id per pixel (255 = ignore)")
        mask = np.asarray(m, dtype=np.int64)
    if reduce_zero_label:
        mask = np.where((mask == 0) | (mask == IGNORE), IGNORE, mask - 1)
    return mask


class MaskClassError(ValueError):
    """A mask id outside 0..n_classes-1 (and IGNORE). Raised in a DataLoader worker, torch
    re-raises it in the main process as MaskClassError("Caught ... Original Traceback ..."):
    the message is cut back to the original one line, so the CLI prints that line alone."""

    def __init__(self, msg: str):
        if "Original Traceback" in msg:
            last = [line for line in msg.strip().splitlines() if line.strip()][-1]
            msg = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(msg)


def check_mask_ids(mask: np.ndarray, path: str, n_classes: int,
                   reduce_zero_label: bool = False) -> None:
    """MaskClassError naming the mask file, the offending id and --num-classes when `mask` (as
    load_mask returns it) holds an id the head has no class for (cross-entropy would fail with
    torch's "Target N is out of bounds", a device assert on CUDA)."""
    bad = (mask != IGNORE) & ((mask < 0) | (mask >= n_classes))
    if not bool(bad.any()):
        return
    got = int(mask[bad].max()) if bool((mask[bad] >= n_classes).any()) else int(mask[bad].min())
    shown = (f"id {got + 1} ({got} after --reduce-zero-label)" if reduce_zero_label
             else f"id {got}")
    fix = (f"; pass --num-classes {got + 1} or more (or leave it unset: the max mask id + 1)"
           if got >= n_classes else "")
    raise MaskClassError(
        f"mask {path!r} holds class {shown}: with --num-classes {n_classes} allowed are "
        f"0..{n_classes - 1} and {IGNORE} (ignore){fix}")


def count_classes(pairs: Pairs, reduce_zero_label: bool = False) -> int:
    masks = (load_mask(m, reduce_zero_label) for _, m in pairs)
    return max(int(np.where(m == IGNORE, -1, m).max()) for m in masks) + 1


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _coin() -> bool:
    return float(torch.rand(())) < 0.5


def _grey(img: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 -> [1, H, W] uint8 luma (torchvision's rgb_to_grayscale, truncated)."""
    r, g, b = img.float().unbind(0)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8)[None]


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision.transforms.functional.adjust_saturation of a uint8 [3, H, W] image (a blend
    with its grey version, clipped, truncated)."""
    out = factor * img.float() + (1.0 - factor) * _grey(img).float()
    return out.clamp(0, 255).to(torch.uint8)


def adjust_hue(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision.transforms.functional.adjust_hue of a uint8 [3, H, W] image: the hue turned
    by `factor` (in turns, -0.5..0.5) in HSV, back to uint8 as convert_image_dtype does."""
    rgb = img.float() / 255.0
    r, g, b = rgb.unbind(0)
    maxc, minc = rgb.max(0).values, rgb.min(0).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    sat = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hue = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
           + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    hue = torch.fmod(torch.fmod(hue / 6.0 + 1.0, 1.0) + factor, 1.0)
    hue = torch.where(hue < 0, hue + 1.0, hue)  # Python's %: into [0, 1)
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    i = i.long() % 6
    v = maxc
    p = (v * (1.0 - sat)).clamp(0, 1)
    q = (v * (1.0 - sat * f)).clamp(0, 1)
    t = (v * (1.0 - sat * (1.0 - f))).clamp(0, 1)
    table = torch.stack([torch.stack([v, q, p, p, t, v]), torch.stack([t, v, v, q, p, p]),
                         torch.stack([p, p, t, v, v, q])])  # [3 channels, 6 sectors, H, W]
    out = table.gather(1, i[None, None].expand(3, 1, *i.shape))[:, 0]  # [3, H, W]
    return (out * (255.0 + 1.0 - 1e-3)).to(torch.uint8)


def photometric_distortion(img: torch.Tensor) -> torch.Tensor:
    """The official seg training's PhotoMetricDistortion (dinov3/eval/segmentation/transforms.py,
    mmseg's) on a uint8 [3, H, W] image: each step with probability 1/2, brightness + U(-32, 32),
    contrast x U(0.5, 1.5) (first or last, a coin decides), saturation x U(0.5, 1.5), hue +
    U(-0.5, 0.5) turns; clipped to 0..255 and truncated to uint8 after each step, as the official
    code. Torch's RNG: seeded per DataLoader worker (numpy's is not)."""

    def affine(x, alpha=1.0, beta=0.0):
        return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)

    if _coin():
        img = affine(img, beta=_uniform(-32, 32))
    contrast_first = _coin()
    if contrast_first and _coin():
        img = affine(img, alpha=_uniform(0.5, 1.5))
    if _coin():
        img = adjust_saturation(img, _uniform(0.5, 1.5))
    if _coin():
        img = adjust_hue(img, _uniform(-0.5, 0.5))
    if not contrast_first and _coin():
        img = affine(img, alpha=_uniform(0.5, 1.5))
    return img


def crop_box(mask: torch.Tensor, crop: int, cat_max_ratio: float = 0.75,
             tries: int = 10) -> tuple[int, int]:
    """(top, left) of the official RandomCropWithLabel: a uniform crop x crop window (the whole
    side where the image is smaller), redrawn up to `tries` times while one class covers
    `cat_max_ratio` or more of its labelled pixels or it holds a single class (then the last
    draw stands)."""
    H, W = mask.shape

    def draw():
        return (int(torch.randint(0, max(H - crop, 0) + 1, ())),
                int(torch.randint(0, max(W - crop, 0) + 1, ())))

    top, left = draw()
    if cat_max_ratio >= 1.0:
        return top, left
    for _ in range(tries):
        window = mask[top:top + crop, left:left + crop]
        counts = torch.bincount(window[window != IGNORE].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio:
            break
        top, left = draw()
    return top, left


class SegTrainSet(torch.utils.data.Dataset):
    """The official training transform of (image, mask) -> [3, crop, crop] fp32, [crop, crop]:
    shorter side to crop x U(scale_range) (bilinear; mask nearest), random crop (`crop_box`,
    cat_max_ratio 0.75), horizontal flip 1/2, photometric distortion (`photometric`), ImageNet
    normalisation, padding to crop x crop (image 0, mask IGNORE)."""

    def __init__(self, pairs: Pairs, crop: int, scale_range=(0.5, 2.0), flip: bool = True,
                 reduce_zero_label: bool = False, n_classes: int | None = None,
                 photometric: bool = True, cat_max_ratio: float = 0.75,
                 white_level: int | None = None):
        self.pairs, self.crop, self.scale_range, self.flip = pairs, crop, scale_range, flip
        self.white_level = white_level  # --white-level (decode_rgb's)
        self.reduce_zero_label, self.n_classes = reduce_zero_label, n_classes
        self.photometric, self.cat_max_ratio = photometric, cat_max_ratio

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.pairs[i]
        mask = load_mask(mask_path, self.reduce_zero_label)
        if self.n_classes is not None:  # every id a class of the head (or ignored)
            check_mask_ids(mask, mask_path, self.n_classes, self.reduce_zero_label)
        img = decode_rgb(img_path, self.white_level)
        mask = Image.fromarray(mask.astype(np.int32))
        if img.size != mask.size:
            raise ValueError(f"{img_path} is {img.size} but its mask {mask_path} is {mask.size}")
        lo, hi = self.scale_range
        short = round(self.crop * _uniform(lo, hi))
        img = resize_short(img, short, Image.Resampling.BILINEAR)
        mask = resize_short(mask, short, Image.Resampling.NEAREST)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W] uint8
        y = torch.from_numpy(np.asarray(mask, dtype=np.int64))  # [H, W]
        top, left = crop_box(y, self.crop, self.cat_max_ratio)
        x = x[:, top:top + self.crop, left:left + self.crop]
        y = y[top:top + self.crop, left:left + self.crop]
        if self.flip and _coin():
            x, y = x.flip(-1), y.flip(-1)
        if self.photometric:
            x = photometric_distortion(x.contiguous())
        x = to_normalized_tensor(Image.fromarray(x.permute(1, 2, 0).numpy()))
        ph, pw = self.crop - y.shape[0], self.crop - y.shape[1]
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        return x.contiguous(), y.contiguous()


# ------------------------------------------------------------------------------------------ model
class LinearSegHead(nn.Module):
    """[B, D, h, w] patch features -> [B, C, h, w] logits (dropout + BN + 1x1 conv, the order of
    dinov3/eval/segmentation/models/heads/linear_head.py)."""

    def __init__(self, embed_dim: int, n_classes: int, dropout: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(embed_dim, n_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.dropout(feats)))


def seg_logits(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """image [B, 3, H, W] -> logits [B, C, H, W] (head at patch resolution, upsampled)."""
    logits = head(patch_feature_map(backbone, x))
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------ metric
def seg_confusion(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C, C] pixel counts (rows = ground truth, columns = prediction), IGNORE pixels dropped."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    if bool(((t < 0) | (t >= n_classes)).any()):
        raise ValueError(f"mask holds class ids outside 0..{n_classes - 1} (and {IGNORE} = "
                         "ignore): pass --num-classes")
    return torch.bincount(t * n_classes + p, minlength=n_classes ** 2).reshape(n_classes,
                                                                               n_classes)


def miou_from_confusion(conf: torch.Tensor) -> dict:
    """{"miou", "iou" (per class, None where the class is in neither gt nor prediction),
    "pixel_acc"} from a [C, C] confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp  # TP + FP + FN
    valid = union > 0
    iou = torch.where(valid, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"miou": float(iou[valid].mean()) if bool(valid.any()) else float("nan"),
            "iou": [None if math.isnan(v) else v for v in iou.tolist()],
            "pixel_acc": float(tp.sum() / conf.sum().clamp(min=1))}


# ------------------------------------------------------------------------------------------ probe
def train_seg_head(backbone: nn.Module, train: Pairs, n_classes: int, *, crop: int,
                   iterations: int, batch_size: int = 16, lr: float = 1e-3,
                   weight_decay: float = 1e-3, num_workers: int = 0, seed: int = 0,
                   scale_range=(0.5, 2.0), flip: bool = True, reduce_zero_label: bool = False,
                   photometric: bool = True, progress: bool = True,
                   checkpoint: HeadCheckpoint | None = None,
                   white_level: int | None = None) -> LinearSegHead:
    device = next(backbone.parameters()).device
    backbone.eval()
    torch.manual_seed(seed)
    head = LinearSegHead(backbone.embed_dim, n_classes).to(device)

    def loss_fn(x, y, _step):
        logits = seg_logits(backbone, head, x)  # [B, C, crop, crop]
        return F.cross_entropy(logits, y, ignore_index=IGNORE)

    data = SegTrainSet(train, crop, scale_range, flip, reduce_zero_label, n_classes=n_classes,
                       photometric=photometric, white_level=white_level)
    return dense.fit_head(head, data, loss_fn,
                          iterations=iterations, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, num_workers=num_workers, seed=seed,
                          desc="seg head", progress=progress, checkpoint=checkpoint)


@torch.no_grad()
def evaluate_seg(backbone: nn.Module, head: nn.Module, val: Pairs, n_classes: int, *,
                 crop: int, stride: int | None = None, reduce_zero_label: bool = False,
                 progress: bool = True, white_level: int | None = None) -> dict:
    from tqdm.auto import tqdm

    device = next(backbone.parameters()).device
    stride = stride or round(crop * 2 / 3)
    head.eval()
    conf = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for img_path, mask_path in tqdm(val, desc="seg val", unit="img",
                                    disable=None if progress else True):
        mask = load_mask(mask_path, reduce_zero_label)
        check_mask_ids(mask, mask_path, n_classes, reduce_zero_label)  # names the file
        target = torch.from_numpy(mask)  # [H, W]
        img = resize_short(decode_rgb(img_path, white_level), crop, Image.Resampling.BILINEAR)
        x = to_normalized_tensor(img)[None].to(device)  # [1, 3, h, w]
        logits = sliding_window_logits(lambda w: seg_logits(backbone, head, w), x, crop, stride,
                                       n_classes)
        logits = F.interpolate(logits, size=target.shape, mode="bilinear", align_corners=False)
        conf += seg_confusion(logits[0].argmax(0).cpu(), target, n_classes)
    res = miou_from_confusion(conf)
    res.update(window=crop, stride=stride, n_val=len(val), reduce_zero_label=reduce_zero_label)
    return res


def seg_eval(backbone: nn.Module, train: Pairs, val: Pairs, *, n_classes: int | None = None,
             crop: int = 512, iterations: int = 2000, batch_size: int = 16, lr: float = 1e-3,
             num_workers: int = 0, seed: int = 0, scale_range: Sequence[float] = (0.5, 2.0),
             reduce_zero_label: bool = False, photometric: bool = True, progress: bool = True,
             output_dir: str | Path | None = None, checkpoint_every: int = 500,
             weights_digest: str = "", white_level: int | None = None) -> dict:
    """Train the linear head on `train`, report mIoU on `val` (module docstring). With
    `output_dir` the head is saved there while it trains and resumed from it
    (head_checkpoint.py; `weights_digest` names the backbone in its key). `white_level`:
    --white-level, 16-bit images' white (datasets._to_8bit)."""
    if crop % backbone.patch_size != 0:
        raise ValueError(f"--crop {crop} is invalid: allowed is a multiple of the patch size "
                         f"{backbone.patch_size}")
    n_classes = n_classes or count_classes(train + val, reduce_zero_label)
    ckpt = head_checkpoint(output_dir, checkpoint_every, "seg", weights_digest,
                           dense.pairs_digest(train), n_classes=n_classes, crop=crop,
                           iterations=iterations, batch_size=batch_size, lr=lr, seed=seed,
                           scale_range=list(scale_range), reduce_zero_label=reduce_zero_label,
                           photometric=photometric, head="dropout-bn-conv",
                           **white_level_key(white_level))
    head = train_seg_head(backbone, train, n_classes, crop=crop, iterations=iterations,
                          batch_size=batch_size, lr=lr, num_workers=num_workers, seed=seed,
                          scale_range=tuple(scale_range), reduce_zero_label=reduce_zero_label,
                          photometric=photometric, progress=progress, checkpoint=ckpt,
                          white_level=white_level)
    res = evaluate_seg(backbone, head, val, n_classes, crop=crop,
                       reduce_zero_label=reduce_zero_label, progress=progress,
                       white_level=white_level)
    res.update(n_classes=n_classes, n_train=len(train), iterations=iterations,
               photometric=photometric)
    return res
