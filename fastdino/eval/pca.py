"""PCA of last-layer patch features -> RGB images (SPEC.md §8, USERS.md §11).

    maps = pca_rgb([feats_img1, feats_img2], shared=True)   # feats [h, w, D] -> RGB [h, w, 3]
    write_pca_images(backbone, ["cat.jpg"], "out/", resolution=448)  # out/cat_pca.png, ...

Features: `get_intermediate_layers(n=1, norm=True)` of the last block = the patch tokens after the
final LayerNorm, CLS and register tokens sliced off. The image is resized so its height is
`resolution` and its width keeps the aspect ratio, floored to a multiple of the patch size (the
official notebook); ImageNet normalisation.

Foreground (`fg="threshold"`, DINOv2 paper Fig. 1): a first PCA over all patches; component 1 is
oriented so that the patches on the image border are in majority negative (the border is mostly
background), and the foreground is `component 1 > threshold` (default 0). The 3-component PCA that
gives the colours is then fitted on the foreground patches only and applied to them; background is
black. `fg="none"` fits and colours every patch. (The official DINOv3 notebook's foreground is a
logistic-regression classifier trained on labelled masks; it needs labels and is not done here.)

Orientation: a principal component is defined only up to sign. Component 1 of the first PCA uses
the border rule above; the colour components are oriented so the third moment (skew) of their
projections is positive (ties: the largest |projection| positive). Both rules are computed from
the projections, so negating every feature gives exactly the same images.

Token norms (`norms=True`, USERS.md §11: "finding high-norm tokens"): the L2 norm of every patch
token of the last block before the final norm, as a grey map with the tokens above 2x the image's
median in red (the artifact tokens of "Vision Transformers Need Registers", Darcet et al. 2024,
which storage tokens absorb), and their positions in norms.json.

Colour (`color="sigmoid"`, the official notebook): projections whitened (unit variance over the
fitted patches), colour = sigmoid(2 * projection) per channel. `color="minmax"`: each channel
min-max scaled over the fitted patches. With `shared=True` one PCA (both stages) is fitted on the
patches of all images together, so colours are comparable across images (DINOv2's multi-image
figures); otherwise each image gets its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fastdino.data.datasets import _DECODE_ERRORS, IMAGE_EXTENSIONS, decode_rgb
from fastdino.eval.features import autocast_for, to_normalized_tensor

logger = logging.getLogger("fastdino.eval")
# unreadable inputs said, once per process (train.pca_images writes maps at every checkpoint)
_skipped_said: set[str] = set()


@dataclass
class PCABasis:
    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [k, D], rows oriented (module docstring)
    std: torch.Tensor  # [k] std of the projections over the fitted patches (whitening)

    def project(self, x: torch.Tensor, whiten: bool = True) -> torch.Tensor:
        """x [N, D] -> [N, k]."""
        p = (x.double() - self.mean) @ self.components.T
        return p / self.std.clamp(min=1e-12) if whiten else p


def fit_pca(x: torch.Tensor, k: int = 3) -> PCABasis:
    """Unoriented top-k principal components of x [N, D] (fp64 SVD, deterministic)."""
    x = x.double()
    if x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 patches, got {x.shape[0]}")
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(k, vh.shape[0])
    return PCABasis(mean, vh[:k].clone(), s[:k] / (x.shape[0] - 1) ** 0.5)


def _flip(basis: PCABasis, i: int) -> None:
    basis.components[i] = -basis.components[i]


def orient_by_border(basis: PCABasis, x: torch.Tensor, border: torch.Tensor) -> None:
    """Flip component 0 so that the border patches (border [N] bool) are majority negative
    (ties: their mean negative)."""
    p = basis.project(x[border], whiten=False)[:, 0]
    pos, neg = int((p > 0).sum()), int((p < 0).sum())
    if pos > neg or (pos == neg and float(p.mean()) > 0):
        _flip(basis, 0)


def orient_by_skew(basis: PCABasis, x: torch.Tensor, first: int = 0) -> None:
    """Flip components first.. so their projections of x have positive skew."""
    p = basis.project(x, whiten=False)  # [N, k]
    for i in range(first, p.shape[1]):
        col = p[:, i]
        m3 = float(((col - col.mean()) ** 3).mean())
        scale = float(col.abs().max()) ** 3
        if abs(m3) > 1e-9 * max(scale, 1e-300):
            flip = m3 < 0
        else:  # symmetric: make the largest |projection| positive
            flip = float(col[col.abs().argmax()]) < 0
        if flip:
            _flip(basis, i)


def border_mask(h: int, w: int) -> torch.Tensor:
    """[h * w] bool, True on the outermost ring of the patch grid."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m.flatten()


def _colours(basis: PCABasis, x: torch.Tensor, fitted: torch.Tensor, color: str) -> torch.Tensor:
    p = basis.project(x)  # [N, k] whitened
    if color == "sigmoid":
        rgb = torch.sigmoid(2.0 * p)
    elif color == "minmax":
        ref = basis.project(fitted)
        lo, hi = ref.min(0).values, ref.max(0).values
        rgb = ((p - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1)
    else:
        raise ValueError(f"color={color!r} is invalid: allowed is sigmoid | minmax")
    if rgb.shape[1] < 3:  # fewer than 3 components (tiny inputs): pad with grey
        rgb = torch.cat([rgb, rgb.new_full((rgb.shape[0], 3 - rgb.shape[1]), 0.5)], 1)
    return rgb


def pca_rgb(feats: Sequence[torch.Tensor], *, shared: bool = False, fg: str = "threshold",
            threshold: float = 0.0, color: str = "sigmoid") -> list[dict]:
    """Patch features [h, w, D] per image -> [{"rgb": [h, w, 3] float in 0..1,
    "foreground": [h, w] bool}] (module docstring)."""
    if fg not in ("threshold", "none"):
        raise ValueError(f"fg={fg!r} is invalid: allowed is threshold | none")
    groups = [list(range(len(feats)))] if shared else [[i] for i in range(len(feats))]
    out: list[dict] = [{} for _ in feats]
    for group in groups:
        x = torch.cat([feats[i].reshape(-1, feats[i].shape[-1]) for i in group]).double()
        border = torch.cat([border_mask(*feats[i].shape[:2]) for i in group])
        if fg == "threshold":
            first = fit_pca(x, 1)
            orient_by_border(first, x, border)
            keep = first.project(x, whiten=False)[:, 0] > threshold  # [N] foreground
            if int(keep.sum()) < 4:
                logger.warning("pca: only %d foreground patches; colouring all patches",
                               int(keep.sum()))
                keep = torch.ones_like(keep)
        else:
            keep = torch.ones(x.shape[0], dtype=torch.bool)
        fitted = x[keep]
        basis = fit_pca(fitted, 3)
        if fg == "none":
            orient_by_border(basis, x, border)
            orient_by_skew(basis, fitted, first=1)
        else:
            orient_by_skew(basis, fitted)
        rgb = _colours(basis, x, fitted, color) * keep[:, None]  # background black
        start = 0
        for i in group:
            h, w = feats[i].shape[:2]
            n = h * w
            out[i] = {"rgb": rgb[start:start + n].reshape(h, w, 3).float(),
                      "foreground": keep[start:start + n].reshape(h, w)}
            start += n
    return out


# ----------------------------------------------------------------------------------------- images
def resize_for_pca(img: Image.Image, resolution: int, patch: int) -> Image.Image:
    """Height = resolution, width keeps the aspect ratio floored to a multiple of `patch`;
    bilinear, as the official notebook's TF.resize (torchvision's default interpolation)."""
    if resolution % patch != 0:
        raise ValueError(f"--resolution {resolution} is invalid: allowed is a multiple of the "
                         f"patch size {patch}")
    w, h = img.size
    new_w = max(patch, int(w * resolution / h) // patch * patch)
    return img.resize((new_w, resolution), Image.Resampling.BILINEAR)


@torch.no_grad()
def image_patch_features(backbone: nn.Module, img: Image.Image) -> torch.Tensor:
    """[h, w, D] last-layer normed patch tokens (registers and CLS excluded), fp32 on CPU."""
    device = next(backbone.parameters()).device
    x = to_normalized_tensor(img)[None].to(device)  # [1, 3, H, W]
    backbone.eval()
    with autocast_for(device):
        f = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]  # [1, D, h, w]
    return f[0].permute(1, 2, 0).float().cpu()


@torch.no_grad()
def image_token_norms(backbone: nn.Module, img: Image.Image) -> torch.Tensor:
    """[h, w] L2 norms of the last block's patch tokens before the final norm (where the
    high-norm "artifact" tokens of Darcet et al. 2024 show; registers absorb them)."""
    device = next(backbone.parameters()).device
    x = to_normalized_tensor(img)[None].to(device)
    backbone.eval()
    with autocast_for(device):
        f = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=False)[0]  # [1, D, h, w]
    return f[0].float().norm(dim=0).cpu()


def high_norm_tokens(norms: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """[h, w] bool: tokens whose norm exceeds `factor` x the image's median token norm."""
    return norms > factor * norms.median()


def _norm_map(norms: torch.Tensor, high: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """Grey = norm / max norm, high-norm tokens in red, one block per patch."""
    g = (norms / norms.max().clamp(min=1e-12)).clamp(0, 1)
    rgb = torch.stack([g, g, g], -1)
    rgb[high] = torch.tensor([1.0, 0.0, 0.0])
    return _to_pil(rgb, size)


def _is_image(q: Path) -> bool:
    return q.is_file() and q.name.lower().endswith(IMAGE_EXTENSIONS)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files, and the images inside given folders (sorted, non-recursive). A folder whose
    images are all in subfolders (patient / study folders) is said, naming one: it gives none."""
    paths: list[Path] = []
    nested: list[str] = []  # folders with images in subfolders only
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if _is_image(q))
            if not found:
                deeper = next((q for q in sorted(p.rglob("*")) if _is_image(q)), None)
                if deeper is not None:
                    nested.append(f"{p} (e.g. {deeper})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"pca input {str(p)!r} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(
            "pca: no input images (extensions: " + ", ".join(IMAGE_EXTENSIONS) + ")"
            + (f"; folders are not searched recursively and {'; '.join(nested)} hold images "
               "only in subfolders: name those folders or files" if nested else ""))
    for folder in nested:
        logger.warning("pca: %s holds images only in its subfolders, which are not searched: "
                       "name those folders or files", folder)
    return paths


def _readable(paths: list[Path], white_level: int | None) -> tuple[list[Path], list[Image.Image]]:
    """The inputs that decode, and their RGB images: an unreadable one (a corrupt scan in a
    folder) is left out with a warning naming it and why, once per process, instead of
    failing every map; none readable raises ValueError naming the first and why."""
    kept, images, first = [], [], None
    for p in paths:
        try:
            images.append(decode_rgb(str(p), white_level))
            kept.append(p)
        except _DECODE_ERRORS as e:
            why = f"{type(e).__name__}: {e}"
            first = first or f"{p}: {why}"
            if str(p) not in _skipped_said:
                _skipped_said.add(str(p))
                logger.warning("pca: skipped unreadable image %s (%s)", p, why)
    if not kept:
        raise ValueError(f"pca: none of the {len(paths)} input images could be read ({first})")
    return kept, images


def _to_pil(rgb: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    arr = (rgb.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(arr).resize(size, Image.Resampling.NEAREST)  # one block per patch


def _side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    out = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return out


def _grid(rows: list[Image.Image], height: int = 256) -> Image.Image:
    rows = [r.resize((max(1, round(r.width * height / r.height)), height),
                     Image.Resampling.BILINEAR) for r in rows]
    out = Image.new("RGB", (max(r.width for r in rows), height * len(rows)))
    for i, r in enumerate(rows):
        out.paste(r, (0, i * height))
    return out


def write_pca_images(backbone: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, *,
                     resolution: int = 448, shared: bool = False, fg: str = "threshold",
                     threshold: float = 0.0, color: str = "sigmoid", norms: bool = False,
                     norm_factor: float = 2.0, white_level: int | None = None) -> list[Path]:
    """For each input <stem>: <out>/<stem>_pca.png (the PCA map at the resized image's size) and
    <out>/<stem>_side.png (image | map); with several inputs also <out>/grid.png. With `norms`:
    <out>/<stem>_norms.png (token norms before the final norm, grey, and in red the tokens above
    `norm_factor` x the image's median) and <out>/norms.json (per image: median, max, the
    high-norm tokens' (row, column) patch positions). `white_level`: 16-bit images' white
    (--white-level, data.white_level: datasets._to_8bit). Unreadable inputs are left out,
    said once (`_readable`); none readable raises ValueError."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, images = _readable(expand_inputs(inputs), white_level)
    images = [resize_for_pca(img, resolution, backbone.patch_size) for img in images]
    feats = [image_patch_features(backbone, img) for img in images]
    maps = pca_rgb(feats, shared=shared, fg=fg, threshold=threshold, color=color)
    written, sides, used, report = [], [], set(), {}
    for p, img, m in zip(paths, images, maps, strict=True):
        stem, n = p.stem, 1
        while stem in used:  # two inputs with the same name from different folders
            stem, n = f"{p.stem}_{n}", n + 1
        used.add(stem)
        pca_img = _to_pil(m["rgb"], img.size)
        pca_img.save(out_dir / f"{stem}_pca.png")
        side = _side_by_side(img, pca_img)
        side.save(out_dir / f"{stem}_side.png")
        written += [out_dir / f"{stem}_pca.png", out_dir / f"{stem}_side.png"]
        sides.append(side)
        if norms:
            n = image_token_norms(backbone, img)
            high = high_norm_tokens(n, norm_factor)
            _norm_map(n, high, img.size).save(out_dir / f"{stem}_norms.png")
            written.append(out_dir / f"{stem}_norms.png")
            report[stem] = {"median": float(n.median()), "max": float(n.max()),
                            "factor": norm_factor, "n_tokens": n.numel(),
                            "high_norm": [list(map(int, rc)) for rc in high.nonzero().tolist()]}
            if report[stem]["high_norm"]:
                logger.info("pca: %s has %d of %d patch tokens above %gx the median norm (max "
                            "%.1f, median %.1f): high-norm artifact tokens", stem,
                            len(report[stem]["high_norm"]), n.numel(), norm_factor,
                            report[stem]["max"], report[stem]["median"])
    if len(sides) > 1:
        _grid(sides).save(out_dir / "grid.png")
        written.append(out_dir / "grid.png")
    if norms:
        (out_dir / "norms.json").write_text(json.dumps(report, indent=1))
        written.append(out_dir / "norms.json")
    return written
