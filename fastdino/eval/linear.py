"""Linear probe on frozen, cached features (SPEC.md §6, dinov3/eval/linear.py), many lrs at once.

    res = train_linear_probes(x_train, y_train, x_val, y_val, n_classes)
    # res["best"] = {"lr": 0.02, "top1": 0.97}; res["per_lr"] = {lr: top1}; res["confused"] = [...]

Features: last-block CLS ⊕ mean patch token ([N, 2D], `linear_features`), not normalised (as the
official probe). One linear classifier per learning rate, all held in one batched weight
W [L, F, C] and trained together on the same batches: a step costs one einsum for all L heads.
SGD, momentum 0.9, no weight decay, lr = base_lr * batch_size / 256 (the official scaling),
cosine decay to 0 over `iterations` steps (default 12,500 = the official 10 "epochs" of 1,250
iterations), batches of 1024 rows (the official global batch: 128 per GPU on the 8 GPUs its
launcher starts by default, so 12,500 steps = 10 passes over ImageNet-1k; lrs x 4), full
batches cut from reshuffled passes back to back (`stream_batches`), capped at `max_epochs`
(100) passes for small sets (logged when it applies; the result's `iterations` is the steps
taken, `iterations_requested` the ones asked for). Gradients are written out (softmax - one-hot), no
autograd: a step is 2 einsums. Init N(0, 0.01), bias 0 (official).

Training views: by default the heads train on the cached features of the centre crop (one
feature extraction); with `train_views` (`fastdino eval linear --augment`) on the official
random-resized-crop + flip views instead, fresh in every pass over the train set (one feature
extraction per pass: each row is visited once per pass, so this is the official protocol's
distribution of views). The best lr is chosen on val and the same val top-1 is reported (no
separate test split), as the official probe does when it is given one eval set.

Feature grid (`train_linear_probe_grid`, `--n-last-blocks 1 4 --avgpool both`): every feature
set is cut from the same extracted features (the CLS of the last max(n) blocks + the last
block's patch mean), and all sets' heads train in one loop, as the official probe trains its
grid's classifiers on one forward: one extraction per pass for the whole grid, not per set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger("fastdino.eval")

# dinov3/eval/linear.py: 13 base learning rates, scaled by batch/256
OFFICIAL_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def linear_features(feats: dict[str, torch.Tensor], n_last_blocks: int = 1,
                    avgpool: bool = True) -> torch.Tensor:
    """The official create_linear_input: the CLS of the last `n_last_blocks` blocks
    concatenated (oldest first), then with `avgpool` the last block's mean patch token:
    {"cls": [N, D], "patch_mean": [N, D], "cls_blocks": [N, n, D]} -> [N, (n + avgpool) D].
    DINOv3's probe: n = 1 with avgpool; DINOv2's searched n in {1, 4} x avgpool on / off."""
    if n_last_blocks == 1:
        parts = [feats["cls"]]
    else:
        blocks = feats.get("cls_blocks")
        if blocks is None or blocks.shape[1] < n_last_blocks:
            have = 1 if blocks is None else blocks.shape[1]
            raise ValueError(f"n_last_blocks {n_last_blocks}: the features hold the CLS of the "
                             f"last {have} block(s) only (extract with n_last_blocks >= "
                             f"{n_last_blocks})")
        parts = list(blocks[:, -n_last_blocks:].unbind(1))
    if avgpool:
        parts.append(feats["patch_mean"])
    return torch.cat(parts, dim=1).float()


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C, C] counts, rows = true class, columns = predicted class."""
    idx = y.long() * n_classes + pred.long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def most_confused(conf: torch.Tensor, top: int = 5, classes: Sequence[str] | None = None
                  ) -> list[dict]:
    """The `top` largest off-diagonal cells: {"true", "pred", "count", "frac_of_true"}."""
    off = conf.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:top]
    n = conf.shape[0]
    names = classes if classes is not None else [str(i) for i in range(n)]
    out = []
    for i in order.tolist():
        if flat[i] == 0:
            break
        t, p = divmod(i, n)
        out.append({"true": names[t], "pred": names[p], "count": int(flat[i]),
                    "frac_of_true": int(flat[i]) / max(1, int(conf[t].sum()))})
    return out


def _predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             chunk: int = 8192) -> torch.Tensor:
    """argmax class of every head: x [N, F] -> [L, N] (chunked: [L, N, C] logits of an
    ImageNet-sized train set would not fit in memory)."""
    return torch.cat([(torch.einsum("nf,lfc->lnc", x[i:i + chunk], weight)
                       + bias[:, None]).argmax(-1) for i in range(0, x.shape[0], chunk)], dim=1)


def stream_batches(n: int, batch_size: int, steps: int, gen: torch.Generator,
                   with_pass: bool = False):
    """`steps` index batches [batch_size] of the official training stream (dinov3 linear.py:
    an infinite sampler, drop_last): reshuffled passes over the n rows, back to back, cut into
    full batches; a batch may straddle two passes, and holds a row more than once when
    n < batch_size. Every step thus sees batch_size rows, as the lr scaling (x batch / 256)
    and the passes counted by `max_epochs` assume (never a short last batch of a pass).
    `with_pass`: (indices, pass number of each) pairs instead."""
    if n < 1:  # every pass would be empty: the batch would never fill
        raise ValueError("linear probe: no training rows (the train split is empty)")
    if batch_size < 1:
        raise ValueError(f"linear probe batch_size {batch_size} is invalid: allowed is an "
                         "integer >= 1")
    pending: list[torch.Tensor] = []
    pass_of: list[torch.Tensor] = []
    have = passes = 0
    for _ in range(steps):
        while have < batch_size:
            pending.append(torch.randperm(n, generator=gen))
            pass_of.append(torch.full((n,), passes, dtype=torch.long))
            have, passes = have + n, passes + 1
        stream, stream_pass = torch.cat(pending), torch.cat(pass_of)
        yield (stream[:batch_size], stream_pass[:batch_size]) if with_pass else stream[:batch_size]
        pending, pass_of = [stream[batch_size:]], [stream_pass[batch_size:]]
        have -= batch_size


@torch.no_grad()
def train_linear_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                        y_val: torch.Tensor, n_classes: int, *,
                        lrs: Sequence[float] = OFFICIAL_LRS, iterations: int = 12500,
                        max_epochs: float | None = 100, batch_size: int = 1024,
                        momentum: float = 0.9, seed: int = 0, device: str | torch.device = "cpu",
                        classes: Sequence[str] | None = None,
                        train_views: Callable[[int], torch.Tensor] | None = None) -> dict:
    """Train one linear head per lr on (x_train [N, F], y_train [N]); evaluate all on val.
    `train_views(p)`: the [N, F] features of the rows in training pass p (0, 1, ...; asked for
    once each, in order), e.g. of fresh random-resized-crop + flip views as the official probe
    trains on; None: x_train in every pass. x_train gives the reported train top-1."""
    views = None if train_views is None else (lambda p: {"x": train_views(p)})
    return _train_heads([lambda f: f["x"]], {"x": x_train}, y_train, {"x": x_val}, y_val,
                        n_classes, lrs=lrs, iterations=iterations, max_epochs=max_epochs,
                        batch_size=batch_size, momentum=momentum, seed=seed, device=device,
                        classes=classes, train_views=views)[0]


@torch.no_grad()
def train_linear_probe_grid(train: dict[str, torch.Tensor], y_train: torch.Tensor,
                            val: dict[str, torch.Tensor], y_val: torch.Tensor, n_classes: int,
                            grid: Sequence[tuple[int, bool]], *,
                            train_views: Callable[[int], dict[str, torch.Tensor]] | None = None,
                            **kwargs) -> dict[tuple[int, bool], dict]:
    """The probes of every feature set (n_last_blocks, avgpool) of `grid` built from the same
    extracted features (`linear_features` of the dicts `train`, `val`), all trained in one loop
    over the passes, as the official probe trains its whole grid on one forward: with
    `train_views(p)` (the feature dict of pass p's views, `BackboneExtractor.views`) each
    pass's views are extracted once for the grid, not once per feature set. Each set's heads
    draw their init and batches from their own generator seeded `seed`: a set's result is
    train_linear_probes' on its features alone, whatever else the grid holds.
    kwargs: train_linear_probes'. Returns {(n, avgpool): its result}."""
    grid = list(grid)
    if not grid:  # nothing would train, and nothing be reported
        raise ValueError("linear probe grid is empty: give at least one (n_last_blocks, "
                         "avgpool) feature set")
    makes = [lambda f, n=n, pool=pool: linear_features(f, n, pool) for n, pool in grid]
    results = _train_heads(makes, train, y_train, val, y_val, n_classes,
                           train_views=train_views, **kwargs)
    return dict(zip(grid, results, strict=True))


def _rows(feats: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in feats.items()}


def _predict_sets(make: Callable, feats: dict[str, torch.Tensor], weight: torch.Tensor,
                  bias: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """_predict on make(feats), built chunk by chunk (one feature set of the grid at a time,
    never all of them in memory): the same chunks, hence the same numbers."""
    n = next(iter(feats.values())).shape[0]
    return torch.cat([_predict(make(_rows(feats, slice(i, i + chunk))).to(weight.device),
                               weight, bias, chunk) for i in range(0, n, chunk)], dim=1)


def _train_heads(makes: Sequence[Callable[[dict], torch.Tensor]], train: dict[str, torch.Tensor],
                 y_train: torch.Tensor, val: dict[str, torch.Tensor], y_val: torch.Tensor,
                 n_classes: int, *, lrs: Sequence[float] = OFFICIAL_LRS,
                 iterations: int = 12500, max_epochs: float | None = 100,
                 batch_size: int = 1024, momentum: float = 0.9, seed: int = 0,
                 device: str | torch.device = "cpu", classes: Sequence[str] | None = None,
                 train_views: Callable[[int], dict[str, torch.Tensor]] | None = None
                 ) -> list[dict]:
    """The heads of every feature set make(feats) -> [rows, F] (one result each, as
    train_linear_probes'), trained side by side on the rows of `train` (a dict of [N, ...]
    tensors) or of `train_views(p)` in pass p; each set has its own generator (its init, then
    its stream of batches), so that its result is the one it would have trained alone."""
    bad = [lr for lr in lrs if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0)]
    if bad or not lrs:  # lr 0 never moves the head, lr < 0 ascends the loss
        raise ValueError(f"--lrs {bad or list(lrs)} is invalid: allowed are numbers > 0 (base "
                         "learning rates, scaled by batch/256)")
    device = torch.device(device)
    # with train_views the centre crops' features only give the reported train top-1: they
    # stay on the host (moved a chunk at a time), the device holds the passes' views
    train = {k: v.float().to(device if train_views is None else "cpu") for k, v in train.items()}
    val = {k: v.float().to(device) for k, v in val.items()}
    y_train, y_val = y_train.long().to(device), y_val.long().to(device)
    n = y_train.shape[0]
    dims = [make(_rows(train, slice(0, 0))).shape[1] for make in makes]  # F of each set
    L = len(lrs)
    gens = [torch.Generator().manual_seed(seed) for _ in makes]
    weights = [(torch.randn(L, f, n_classes, generator=gen) * 0.01).to(device)  # [L, F, C]
               for f, gen in zip(dims, gens, strict=True)]
    biases = [torch.zeros(L, n_classes, device=device) for _ in makes]  # [L, C]
    bufs_w = [torch.zeros_like(w) for w in weights]
    bufs_b = [torch.zeros_like(b) for b in biases]
    base = torch.tensor(lrs, dtype=torch.float32, device=device) * batch_size / 256  # [L]
    # a small train set does not need 12.5k steps: cap at `max_epochs` passes
    total = iterations if max_epochs is None else min(
        iterations, max(1, math.ceil(max_epochs * n / batch_size)))
    if total < iterations:  # said, not silent: the probe trains fewer steps than asked
        logger.info("linear probe: --iterations %d capped at %d (%g passes over the %d training "
                    "images at batch %d; a small set needs no more)", iterations, total,
                    max_epochs, n, batch_size)
    views: dict[int, dict] = {}  # pass -> its features (at most the two a batch spans)
    streams = [stream_batches(n, batch_size, total, gen, True) for gen in gens]
    for step, batches in enumerate(zip(*streams, strict=True)):
        # every set's stream has the same pass boundaries (its own order inside each pass)
        if train_views is not None:
            for p in sorted(set().union(*(b[1].unique().tolist() for b in batches))):
                if p not in views:
                    views[p] = {k: v.float().to(device) for k, v in train_views(p).items()}
            first = min(int(b[1].min()) for b in batches)
            for p in [p for p in views if p < first]:
                del views[p]  # a finished pass
        lr = base * 0.5 * (1 + math.cos(math.pi * step / total))  # [L] cosine to 0
        for s, (idx, pass_of) in enumerate(batches):
            make, weight, bias = makes[s], weights[s], biases[s]
            idx = idx.to(device)
            yb = y_train[idx]  # [B]
            if train_views is None:
                xb = make(_rows(train, idx))  # [B, F]
            else:
                pass_of = pass_of.to(device)
                xb = torch.empty(len(idx), dims[s], device=device)
                for p, feats in views.items():
                    here = pass_of == p
                    xb[here] = make(_rows(feats, idx[here]))
            logits = torch.einsum("bf,lfc->lbc", xb, weight) + bias[:, None]  # [L, B, C]
            # d(mean CE)/d logits = (softmax - onehot) / B, for each head independently
            g = torch.softmax(logits, dim=-1)
            g[:, torch.arange(len(yb), device=device), yb] -= 1.0
            g /= len(yb)
            gw = torch.einsum("bf,lbc->lfc", xb, g)  # [L, F, C]
            gb = g.sum(1)  # [L, C]
            bufs_w[s].mul_(momentum).add_(gw)
            bufs_b[s].mul_(momentum).add_(gb)
            weight.sub_(lr[:, None, None] * bufs_w[s])
            bias.sub_(lr[:, None] * bufs_b[s])
    views.clear()
    results = []
    for make, f, weight, bias in zip(makes, dims, weights, biases, strict=True):
        val_pred = _predict_sets(make, val, weight, bias)  # [L, Nv]
        top1 = (val_pred == y_val).float().mean(1)  # [L]
        train_top1 = (_predict_sets(make, train, weight, bias) == y_train).float().mean(1)
        # best on val; ties -> the smaller lr (first in the list)
        best = int(torch.argmax(top1).item())
        pred = val_pred[best]
        conf = confusion_matrix(pred.cpu(), y_val.cpu(), n_classes)
        results.append({
            "best": {"lr": float(lrs[best]), "top1": float(top1[best]),
                     "train_top1": float(train_top1[best])},
            "per_lr": {float(lr): float(a) for lr, a in zip(lrs, top1.tolist(), strict=True)},
            "confused": most_confused(conf, 5, classes),
            "confusion": conf.tolist(),
            "iterations": total, "iterations_requested": iterations,
            "epochs": total * batch_size / n, "batch_size": batch_size,
            "n_train": n, "n_val": int(y_val.shape[0]), "feature_dim": f,
            "augment": train_views is not None,
        })
    return results
