"""The official kNN protocol (SPEC.md §6, dinov3/eval/knn.py) on frozen, cached CLS features.

    res = knn_eval(extractor, train_samples, val_samples, ks=(10, 20, 100, 200), temperature=0.07)
    # {"k10": {"top1": 0.91, "top5": 0.99}, ..., "best_k": 20, "n_train": ..., "n_val": ...}

Features: L2-normalised CLS. For each query, the k most cosine-similar training features vote for
their class with weight softmax(top-k similarities / T) (normalised over the k neighbours); the
class scores are the summed weights; top-1 / top-5 from those scores (ties: lowest class id).
k is clipped to the number of training images (a k larger than the train set means "all").

Data: a labelled folder `<root>/train/<class>/*` + `<root>/val/<class>/*`, or `<root>/<class>/*`
with a split file (lines "train <relative path>" / "val <relative path>", '#' comments), or
`<root>/<class>/*` alone (every 4th image of each class is a query: fastdino.eval.knn); or two
labelled sources, WebDataset tar shards with `.cls` members included (`labelled_sources`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdino.data.datasets import IMAGE_EXTENSIONS
from fastdino.eval.features import Extractor, cached_features, drop_unreadable
from fastdino.eval.knn import split_samples

Samples = list[tuple[str, int]]


def read_split_file(root: str | Path, split_file: str | Path) -> tuple[Samples, Samples, list[str]]:
    """(train, val, classes) from a split file; the class is the first folder of each path."""
    root, split_file = Path(root), Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"--split-file {str(split_file)!r} does not exist")
    rows = []
    for n, line in enumerate(split_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or parts[0] not in ("train", "val"):
            raise ValueError(f"{split_file}:{n}: {line!r} is invalid: allowed is "
                             "'train <relative path>' or 'val <relative path>'")
        rel = Path(parts[1])
        if len(rel.parts) < 2 or not rel.name.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"{split_file}:{n}: {str(rel)!r} must be <class>/<image file>")
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{split_file}:{n}: {root / rel} does not exist")
        rows.append((parts[0], str(root / rel), rel.parts[0]))
    classes = sorted({c for _, _, c in rows})
    ids = {c: i for i, c in enumerate(classes)}
    train = [(p, ids[c]) for s, p, c in rows if s == "train"]
    val = [(p, ids[c]) for s, p, c in rows if s == "val"]
    if not train or not val:
        raise ValueError(f"--split-file {str(split_file)!r} needs both train and val lines "
                         f"(has {len(train)} train, {len(val)} val)")
    return train, val, classes


def labelled_sources(train_spec: str, val_spec: str) -> tuple[Samples, Samples, list[str]]:
    """(train, val, class names) of two labelled sources (fastdino.data.labelled: class folders,
    tar shards with `.cls` members, or patterns of them); class ids over both sets' labels."""
    from fastdino.data.labelled import labelled_images

    train, train_labels = labelled_images(train_spec)
    val, val_labels = labelled_images(val_spec)
    unseen = sorted(set(val_labels) - set(train_labels))
    if unseen:
        raise ValueError(f"the query set {val_spec!r} has classes the training set {train_spec!r} "
                         f"lacks: {unseen[:10]}")
    ids = {c: i for i, c in enumerate(train_labels)}
    return ([(p, ids[c]) for p, c in train], [(p, ids[c]) for p, c in val], train_labels)


def labelled_splits(root: str | Path, split_file: str | Path | None = None
                    ) -> tuple[Samples, Samples, list[str]]:
    """(train, val, class names) of a labelled folder (module docstring)."""
    root = Path(root)
    if split_file is not None:
        return read_split_file(root, split_file)
    train, val = split_samples(root)
    base = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    return train, val, classes


def check_knn_args(ks: Sequence[int], temperature: float) -> None:
    """ValueError naming the flag for a k below 1 (k = 0 votes with no neighbour; topk rejects
    k < 0) or a temperature that is not a finite number > 0 (T = 0 divides by zero, T < 0
    weights the farthest of the k neighbours most)."""
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"--k {k!r} is invalid: allowed are integers >= 1 (the number of "
                             "nearest neighbours that vote)")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"--temperature {temperature!r} is invalid: allowed is a number > 0 "
                         "(the softmax temperature of the neighbours' similarities; official 0.07)")


def knn_scores(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, k: int,
               temperature: float, n_classes: int, chunk: int | None = None) -> torch.Tensor:
    """Class scores [Q, C] of the softmax-weighted vote of the k nearest training features
    (features L2-normalised: train_f [N, D], train_y [N] long, query_f [Q, D]). Queries go in
    chunks whose [q, N] similarity block stays near 1 GiB (ImageNet: N = 1.28M)."""
    k = min(k, train_f.shape[0])
    chunk = chunk or max(1, min(4096, 2**28 // train_f.shape[0]))
    out = []
    for i in range(0, query_f.shape[0], chunk):
        sim = query_f[i:i + chunk] @ train_f.T  # [q, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # [q, k]
        w = F.softmax(top_sim / temperature, dim=1)  # [q, k], sums to 1 per query
        scores = torch.zeros(top_sim.shape[0], n_classes, dtype=w.dtype, device=w.device)
        out.append(scores.scatter_add_(1, train_y[top_idx], w))  # [q, C]
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    # stable sort on -score: among equal scores the lowest class id ranks first
    top = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return float((top == y[:, None]).any(1).float().mean())


def knn_from_features(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                      val_y: torch.Tensor, ks: Sequence[int] = (10, 20, 100, 200),
                      temperature: float = 0.07, n_classes: int | None = None,
                      device: str | torch.device = "cpu") -> dict:
    """{"k<k>": {"top1", "top5"}, "best_k"} from raw (un-normalised) CLS features."""
    check_knn_args(ks, temperature)
    train_f = F.normalize(train_f.float().to(device), dim=-1)
    val_f = F.normalize(val_f.float().to(device), dim=-1)
    train_y, val_y = train_y.to(device), val_y.to(device)
    if n_classes is None:
        n_classes = int(max(train_y.max(), val_y.max())) + 1
    res: dict = {}
    for k in ks:
        scores = knn_scores(train_f, train_y, val_f, k, temperature, n_classes)
        res[f"k{k}"] = {"top1": topk_accuracy(scores, val_y, 1),
                        "top5": topk_accuracy(scores, val_y, 5),
                        "k_used": min(k, train_f.shape[0])}
    res["best_k"] = max(ks, key=lambda k: res[f"k{k}"]["top1"])
    return res


def knn_eval(extractor: Extractor, train: Samples, val: Samples, *,
             ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
             cache_dir: str | Path | None = None, cache_key: dict | None = None,
             n_classes: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Extract (or read cached) CLS features of train and val, then the kNN protocol (the
    similarity search on `device`)."""
    check_knn_args(ks, temperature)  # before the extraction, not after
    key = cache_key or {}
    feats, labels = {}, {}
    for name, samples in (("train", train), ("val", val)):
        got = cached_features(extractor, [p for p, _ in samples], cache_dir, key)
        got, labels[name] = drop_unreadable(  # (an image that cannot be decoded: left out)
            got, torch.tensor([y for _, y in samples], dtype=torch.long), f"the {name} images")
        feats[name] = got["cls"]
    res = knn_from_features(feats["train"], labels["train"], feats["val"], labels["val"], ks,
                            temperature, n_classes, device)
    res.update(n_train=len(labels["train"]), n_val=len(labels["val"]), temperature=temperature)
    return res
