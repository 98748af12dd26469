"""Weighted kNN probe on frozen CLS features (the DINO protocol: cosine similarity, T = 0.07).

    acc = knn_probe(backbone, "labelled/", image_size=224, ks=(10, 20), temperature=0.07)
    # {"knn_top1_k10": 0.83, "knn_top1_k20": 0.84}

Folder layout: `<root>/train/<class>/*` and `<root>/val/<class>/*`; a folder with class subfolders
only is split deterministically (every 4th image of each class is a query). With `val` given,
`root` and `val` are the training and query sources, anything `data.root` takes that carries labels
(class folders, WebDataset shards with `.cls` members, patterns: fastdino.data.labelled).

Features are the L2-normalised `x_norm_clstoken` of the backbone in eval mode on the official eval
transform (`fastdino eval knn`'s: shorter side to 256/224 of `image_size`, bicubic, centre crop
`image_size` x `image_size`, normalised), so that the logged `knn_top1_k<k>` is the number `eval
knn` gives for the teacher (a squashed whole image would give another). Vote: for each query,
the k most similar training features vote for their class with weight softmax(sim / T) over
the k; the class with the largest sum wins (ties: lowest id), scored by `eval knn`'s own
functions (knn_protocol.py) so that near-ties resolve alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdino.data.datasets import _DECODE_ERRORS, LabelledImageFolder, decode_location
from fastdino.data.labelled import locate

logger = logging.getLogger("fastdino.eval")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    """The official classification eval transform (features.resize_center_crop): not a resize
    of the whole image to size x size, which changes the aspect ratio and the object's scale."""
    from fastdino.eval.features import resize_center_crop  # (features imports this module)

    img = resize_center_crop(img.convert("RGB"), size)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3,H,W]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def extract_features(backbone: nn.Module, samples: list[tuple[str, int]], image_size: int,
                     batch_size: int = 64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     white_level: int | None = None,
                     jpeg_draft: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] L2-normalised fp32, labels [N] long) of (path, label) samples;
    `white_level`: data.white_level (16-bit images' white, datasets._to_8bit); `jpeg_draft`:
    large JPEGs decoded reduced down to the resize target, as `eval knn` decodes them. An image
    that cannot be decoded is left out (with its label), named in a warning: one corrupt file
    of the probe's folder disabled the probe for the whole run."""
    from fastdino.eval.features import EvalDraft, resize_short  # (features imports this module)

    draft = EvalDraft(resize_short(image_size)) if jpeg_draft else None
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats, labels, bad = [], [], []
    try:
        for i in range(0, len(samples), batch_size):
            xs = []
            for p, label in samples[i:i + batch_size]:  # a file, or a `<shard>/<member>` name
                try:
                    img = decode_location(locate(p), white_level, p, draft)
                except _DECODE_ERRORS:
                    bad.append(p)
                    continue
                xs.append(_to_tensor(img, image_size, mean, std))
                labels.append(label)
            if xs:
                cls = backbone.forward_features(torch.stack(xs).to(device))["x_norm_clstoken"]
                feats.append(F.normalize(cls.float(), dim=-1).cpu())  # [b, D]
    finally:
        backbone.train(was_training)
    if bad:
        logger.warning("kNN probe: %d image(s) could not be decoded and are left out: %s%s",
                       len(bad), ", ".join(bad[:3]), f" (+{len(bad) - 3} more)" if len(bad) > 3
                       else "")
    if not feats:
        raise ValueError(f"none of the {len(samples)} kNN probe images could be decoded")
    return torch.cat(feats), torch.tensor(labels, dtype=torch.long)


def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                 test_y: torch.Tensor, ks: tuple[int, ...], temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, float]:
    """Top-1 accuracy of the weighted kNN vote for each k (features already normalised), scored
    by `eval knn`'s own functions (knn_protocol.knn_scores / topk_accuracy: its neighbours per
    k, softmax weights, tie order). A vote of its own (exp weights over the top max(ks)) has the
    same winner in exact arithmetic, but not where similarities tie or nearly tie (collapsed
    or early features): there the two disagreed by several points on identical features."""
    from fastdino.eval.knn_protocol import knn_scores, topk_accuracy  # (it imports this module)

    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return {k: topk_accuracy(knn_scores(train_f, train_y, test_f, k, temperature, n_classes,
                                        chunk), test_y, 1)
            for k in ks}


def split_samples(root: str | Path) -> tuple[list, list]:
    """(train, query) (path, label) lists from a labelled folder (module docstring)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = LabelledImageFolder(root / "train"), LabelledImageFolder(root / "val")
        if train.classes != val.classes:
            raise ValueError(f"{root}: train classes {train.classes} differ from val classes "
                             f"{val.classes}")
        return train.samples, val.samples
    ds = LabelledImageFolder(root)
    train, query, seen = [], [], {}
    for path, label in ds.samples:
        n = seen.get(label, 0)
        seen[label] = n + 1
        (query if n % 4 == 3 else train).append((path, label))
    return train, query


def knn_samples(root: str | Path, val: str | None = None) -> tuple[list, list]:
    """(train, query) (path, label) lists of the probe's data: the labelled folder `root` (or
    'digits', the embedded scikit-learn digits as eval's --data takes it), or with `val` the
    query source `val` against the training source `root`."""
    if str(root) == "digits":
        from fastdino.data.sample_data import digits_labelled_dir

        root = digits_labelled_dir()
    if val is None:
        return split_samples(root)
    from fastdino.eval.knn_protocol import labelled_sources

    train, query, _ = labelled_sources(str(root), val)
    return train, query


def knn_probe(backbone: nn.Module, root: str | Path, image_size: int,
              ks: tuple[int, ...] = (10, 20), temperature: float = 0.07, batch_size: int = 64,
              mean=IMAGENET_MEAN, std=IMAGENET_STD, val: str | None = None,
              samples: tuple[list, list] | None = None,
              white_level: int | None = None, jpeg_draft: bool = True) -> dict[str, float]:
    """{"knn_top1_k<k>": accuracy} on the labelled folder `root`, or with `val`, of the query
    source `val` against the training source `root` (module docstring); `samples`: their
    `knn_samples` listing, when the caller has it already; `white_level`, `jpeg_draft`: the
    run's data.white_level and data.jpeg_draft (its images are decoded as the training images
    are; `eval knn` drafts by default, --no-jpeg-draft not)."""
    train, query = samples if samples is not None else knn_samples(root, val)
    train_f, train_y = extract_features(backbone, train, image_size, batch_size, mean, std,
                                        white_level, jpeg_draft)
    test_f, test_y = extract_features(backbone, query, image_size, batch_size, mean, std,
                                      white_level, jpeg_draft)
    acc = knn_classify(train_f, train_y, test_f, test_y, ks, temperature)
    return {f"knn_top1_k{k}": a for k, a in acc.items()}
