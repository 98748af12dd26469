"""Dense linear probe for monocular depth (SPEC.md §6, the NYU "linear" config), with the standard
depth metrics (RMSE, AbsRel, log10, δ1..δ3).

    res = depth_eval(backbone, train_pairs, val_pairs, crop=(416, 544), iterations=2000)
    # {"rmse": 0.41, "abs_rel": 0.12, "delta1": 0.86, ...}

Data: `<folder>/images/<stem>.<jpg|png|...>` + `<folder>/depth/<stem>.png` (16-bit PNG, depth in
metres = value / depth_scale: 1000 for millimetres as NYU-v2 exports, 256 as KITTI) or
`<folder>/depth/<stem>.npy` (float metres); 0 or non-finite = no measurement. Splits as the
segmentation probe (dense.py): `train/` + `val/`, or every 4th image of one folder is val. The
CLI also reads NYU-v2 in the official DINOv3 / BTS layout and list files (dense_layouts.py).

Head (official NYU linear config; DINOv2 `BNHead`, classify=True): last-layer patch tokens after
the backbone's final norm [B, D, h, w] -> BatchNorm2d -> 1x1 conv -> 256 bin logits; bins
uniform in [min_depth, max_depth] = [0.001, 10] m ("UD"), "linear" normalisation (relu(logit) +
0.1, divided by its sum over bins: AdaBins' rule), depth = Σ_k p_k · bin_k at patch resolution,
bilinearly upsampled to the crop. Frozen backbone (bf16 autocast on CUDA), head in fp32.
Loss: DINOv2's SigLoss, the scale-invariant log error sqrt(Var(g) + 0.15 · mean(g)²) with
g = log(pred + 1e-3) - log(gt + 1e-3) over the valid pixels (0 < gt <= max_depth); its first 100
iterations use sqrt(0.15 · mean(g)²) only (warm-up: fits the global scale first).
Training: random crop (416 x 544 by default, padded where the image is smaller; padding has no
depth), horizontal flip; AdamW lr 3e-4, wd 1e-4, gradient clip 35; linear warm-up over the first
3.75 % of iterations, then cosine to 0 (the official run: 38.4k iterations).
Inference: sliding windows of the crop size, stride 2/3 of it, depth averaged where windows
overlap (+ the horizontally flipped image's, `flip_tta`), upsampled to the depth map's size.
Metrics per image over its valid pixels (min_depth < gt <= max_depth, inside the Eigen crop with
`eigen_crop` for 480 x 640 NYU maps), the prediction clamped to [min_depth, max_depth], then
averaged over images (the depth toolbox's convention): RMSE (m), AbsRel, log10 error, δ_i the
share of pixels with max(pred/gt, gt/pred) < 1.25^i.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdino.data.datasets import decode_rgb, white_level_key
from fastdino.eval import dense
from fastdino.eval.dense import Pairs, patch_feature_map, sliding_window_logits
from fastdino.eval.features import to_normalized_tensor
from fastdino.eval.head_checkpoint import HeadCheckpoint, head_checkpoint

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0  # official NYU config (metres)
N_BINS = 256
EIGEN_CROP = (45, 471, 41, 601)  # rows, columns of a 480 x 640 NYU map (Eigen et al.)
SIGLOSS_EPS, SIGLOSS_WARMUP = 1e-3, 100


# ------------------------------------------------------------------------------------------ data
def list_pairs(folder: str | Path) -> Pairs:
    """(image, depth) pairs of `folder/images` and `folder/depth`, matched by stem, sorted."""
    return dense.list_pairs(folder, "depth", (".png", ".npy"),
                            "depth: 16-bit PNGs (value / --depth-scale = metres) or float .npy "
                            "metres, with the images' stems")


def depth_splits(root: str | Path) -> tuple[Pairs, Pairs]:
    """(train, val) pairs: `root/train` + `root/val`, or `root` split every 4th image to val."""
    return dense.split_pairs(root, list_pairs)


def load_depth(path: str, depth_scale: float) -> np.ndarray:
    """[H, W] float32 metres; 0 where there is no measurement."""
    if path.endswith(".npy"):
        d = np.load(path).astype(np.float32)
        if d.ndim != 2:
            raise ValueError(f"depth map {path!r} has shape {d.shape}: allowed is [H, W] metres")
    else:
        with Image.open(path) as m:
            if m.mode not in ("I;16", "I;16B", "I", "L"):
                raise ValueError(f"depth map {path!r} has PIL mode {m.mode!r}: allowed are "
                                 "16-bit (I;16) or integer (I, L) PNGs of depth x --depth-scale")
            d = np.asarray(m, dtype=np.float32) / depth_scale
    return np.where(np.isfinite(d), d, 0.0).astype(np.float32)


class DepthTrainSet(torch.utils.data.Dataset):
    """Random crop + flip of (image, depth): [3, ch, cw] fp32, [ch, cw] metres (0 = none)."""

    def __init__(self, pairs: Pairs, crop: tuple[int, int], depth_scale: float,
                 flip: bool = True, white_level: int | None = None):
        self.pairs, self.crop, self.depth_scale, self.flip = pairs, crop, depth_scale, flip
        self.white_level = white_level  # --white-level (decode_rgb's)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, depth_path = self.pairs[i]
        img = decode_rgb(img_path, self.white_level)
        y = torch.from_numpy(load_depth(depth_path, self.depth_scale))  # [H, W]
        if (img.size[1], img.size[0]) != tuple(y.shape):
            raise ValueError(f"{img_path} is {img.size[0]}x{img.size[1]} but its depth map "
                             f"{depth_path} is {y.shape[1]}x{y.shape[0]}")
        x = to_normalized_tensor(img)  # [3, H, W]
        ch, cw = self.crop
        ph, pw = max(0, ch - y.shape[0]), max(0, cw - y.shape[1])
        x = F.pad(x, (0, pw, 0, ph), value=0.0)
        y = F.pad(y, (0, pw, 0, ph), value=0.0)
        top = int(torch.randint(0, y.shape[0] - ch + 1, ()))
        left = int(torch.randint(0, y.shape[1] - cw + 1, ()))
        x, y = x[:, top:top + ch, left:left + cw], y[top:top + ch, left:left + cw]
        if self.flip and float(torch.rand(())) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()


# ------------------------------------------------------------------------------------------ model
class LinearDepthHead(nn.Module):
    """[B, D, h, w] patch features -> [B, 1, h, w] depth in metres (BN + 1x1 conv to bins)."""

    def __init__(self, embed_dim: int, n_bins: int = N_BINS, min_depth: float = MIN_DEPTH,
                 max_depth: float = MAX_DEPTH):
        super().__init__()
        self.bn = nn.BatchNorm2d(embed_dim)
        self.conv = nn.Conv2d(embed_dim, n_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins),
                             persistent=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        logit = torch.relu(self.conv(self.bn(feats))) + 0.1  # "linear" normalisation
        p = logit / logit.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", p, self.bins).unsqueeze(1)


def depth_map(backbone: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """image [B, 3, H, W] -> depth [B, 1, H, W] (head at patch resolution, upsampled)."""
    d = head(patch_feature_map(backbone, x))
    return F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)


def sigloss(pred: torch.Tensor, target: torch.Tensor, warm_up: bool = False,
            max_depth: float = MAX_DEPTH) -> torch.Tensor:
    """DINOv2's scale-invariant log loss over the pixels with 0 < target <= max_depth."""
    valid = (target > 0) & (target <= max_depth)
    g = torch.log(pred[valid] + SIGLOSS_EPS) - torch.log(target[valid] + SIGLOSS_EPS)
    if g.numel() == 0:
        return pred.sum() * 0.0  # no measurement in this batch: no gradient, no NaN
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    return torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2)


# ------------------------------------------------------------------------------------------ metric
def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = MIN_DEPTH,
                  max_depth: float = MAX_DEPTH, eigen_crop: bool = False) -> dict | None:
    """The standard metrics of one image over its valid pixels; None when it has none."""
    valid = (gt > min_depth) & (gt <= max_depth)
    if eigen_crop:
        if tuple(gt.shape) != (480, 640):
            raise ValueError(f"--eigen-crop is defined for 480 x 640 NYU depth maps, got "
                             f"{tuple(gt.shape)}")
        r0, r1, c0, c1 = EIGEN_CROP
        inside = torch.zeros_like(valid)
        inside[r0:r1, c0:c1] = True
        valid &= inside
    if not bool(valid.any()):
        return None
    p = pred[valid].double().clamp(min_depth, max_depth)
    t = gt[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {"rmse": float(((p - t) ** 2).mean().sqrt()),
            "abs_rel": float(((p - t).abs() / t).mean()),
            "log10": float((torch.log10(p) - torch.log10(t)).abs().mean()),
            **{f"delta{i}": float((ratio < 1.25 ** i).double().mean()) for i in (1, 2, 3)}}


# ------------------------------------------------------------------------------------------ probe
def train_depth_head(backbone: nn.Module, train: Pairs, *, crop: tuple[int, int],
                     iterations: int, depth_scale: float, batch_size: int = 8, lr: float = 3e-4,
                     weight_decay: float = 1e-4, clip: float = 35.0, num_workers: int = 0,
                     seed: int = 0, progress: bool = True,
                     checkpoint: HeadCheckpoint | None = None,
                     white_level: int | None = None) -> LinearDepthHead:
    device = next(backbone.parameters()).device
    backbone.eval()
    torch.manual_seed(seed)
    head = LinearDepthHead(backbone.embed_dim).to(device)

    def loss_fn(x, y, step):
        pred = depth_map(backbone, head, x)[:, 0]  # [B, ch, cw]
        return sigloss(pred, y, warm_up=step < SIGLOSS_WARMUP)

    return dense.fit_head(head, DepthTrainSet(train, crop, depth_scale,
                                              white_level=white_level), loss_fn,
                          iterations=iterations, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, clip=clip, num_workers=num_workers,
                          seed=seed, desc="depth head", progress=progress,
                          checkpoint=checkpoint)


@torch.no_grad()
def evaluate_depth(backbone: nn.Module, head: nn.Module, val: Pairs, *, crop: tuple[int, int],
                   depth_scale: float, flip_tta: bool = True, eigen_crop: bool = False,
                   progress: bool = True, white_level: int | None = None) -> dict:
    from tqdm.auto import tqdm

    device = next(backbone.parameters()).device
    head.eval()
    window = crop
    stride = (round(crop[0] * 2 / 3), round(crop[1] * 2 / 3))
    per_image = []
    for img_path, depth_path in tqdm(val, desc="depth val", unit="img",
                                     disable=None if progress else True):
        gt = torch.from_numpy(load_depth(depth_path, depth_scale))  # [H, W]
        x = to_normalized_tensor(decode_rgb(img_path, white_level))[None].to(device)  # [1,3,H,W]

        def predict(img):
            return sliding_window_logits(lambda w: depth_map(backbone, head, w), img, window,
                                         stride, 1)

        d = predict(x)
        if flip_tta:
            d = (d + predict(x.flip(-1)).flip(-1)) / 2
        d = F.interpolate(d, size=gt.shape, mode="bilinear", align_corners=False)[0, 0].cpu()
        m = depth_metrics(d, gt, eigen_crop=eigen_crop)
        if m is not None:
            per_image.append(m)
    if not per_image:
        raise ValueError("no validation image has a valid depth pixel (0 < depth <= "
                         f"{MAX_DEPTH} m after --depth-scale): check --depth-scale")
    res = {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
    res.update(window=list(window), stride=list(stride), n_val=len(per_image), flip_tta=flip_tta,
               eigen_crop=eigen_crop)
    return res


def depth_eval(backbone: nn.Module, train: Pairs, val: Pairs, *,
               crop: Sequence[int] = (416, 544), iterations: int = 2000, batch_size: int = 8,
               lr: float = 3e-4, depth_scale: float = 1000.0, num_workers: int = 0,
               seed: int = 0, flip_tta: bool = True, eigen_crop: bool = False,
               progress: bool = True, output_dir: str | Path | None = None,
               checkpoint_every: int = 500, weights_digest: str = "",
               white_level: int | None = None) -> dict:
    """Train the linear depth head on `train`, report the depth metrics on `val` (module
    docstring). With `output_dir` the head is saved there while it trains and resumed from it
    (head_checkpoint.py; `weights_digest` names the backbone in its key). `white_level`:
    --white-level, 16-bit images' white (datasets._to_8bit)."""
    crop = tuple(crop)
    if len(crop) != 2 or any(c % backbone.patch_size for c in crop):
        raise ValueError(f"--crop {' '.join(map(str, crop))} is invalid: allowed is H W, both "
                         f"multiples of the patch size {backbone.patch_size}")
    if depth_scale <= 0:
        raise ValueError(f"--depth-scale {depth_scale} is invalid: allowed is a float > 0")
    ckpt = head_checkpoint(output_dir, checkpoint_every, "depth", weights_digest,
                           dense.pairs_digest(train), crop=list(crop), iterations=iterations,
                           batch_size=batch_size, lr=lr, seed=seed, depth_scale=depth_scale,
                           **white_level_key(white_level))
    head = train_depth_head(backbone, train, crop=crop, iterations=iterations,
                            depth_scale=depth_scale, batch_size=batch_size, lr=lr,
                            num_workers=num_workers, seed=seed, progress=progress,
                            checkpoint=ckpt, white_level=white_level)
    res = evaluate_depth(backbone, head, val, crop=crop, depth_scale=depth_scale,
                         flip_tta=flip_tta, eigen_crop=eigen_crop, progress=progress,
                         white_level=white_level)
    res.update(n_train=len(train), iterations=iterations, crop=list(crop))
    return res
