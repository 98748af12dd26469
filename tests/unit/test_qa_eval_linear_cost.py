"""The cost of `fastdino eval linear` with the official options: --augment over a feature grid
extracts each pass's views once (not once per feature set), and the CLS of the last n blocks
come from the same backbone forward as the final features; the results stay those of the
per-feature-set probes, bit for bit."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval import linear
from fastdino.eval.features import BackboneExtractor, resize_center_crop, to_normalized_tensor
from fastdino.eval.linear import linear_features, train_linear_probe_grid, train_linear_probes
from fastdino.models.vision_transformer import DinoVisionTransformer


def _images(folder, n, size=(40, 36), seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _count_forwards(backbone) -> list:
    """One entry per backbone forward, whatever the call (forward_features,
    get_intermediate_layers): each embeds the patches once."""
    calls = []
    backbone.patch_embed.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


def test_augment_grid_extracts_each_pass_once(tmp_path, monkeypatch):
    """`--augment --n-last-blocks 1 2 --avgpool both`: a backbone forward per batch of the
    centre crops and per batch of each pass's views, for the whole grid of 4 feature sets (was
    4 x 2 forwards per batch of views: one extraction per feature set, each with a second
    forward for the blocks' CLS); the grid's results are the per-set probes' on those
    features."""
    import fastdino.eval.weights as weights
    from fastdino.eval.cli import main
    from fastdino.eval.knn_protocol import labelled_splits

    n_train, n_val, batch = 8, 4, 4
    for k, (split, n) in enumerate((("train", n_train // 2), ("val", n_val // 2))):
        for j, c in enumerate(("a", "b")):
            _images(tmp_path / "d" / split / c, n, seed=2 * k + j)
    real, loaded = weights.load_eval_backbone, []

    def counted(*a, **k):
        backbone, info = real(*a, **k)
        loaded.append((backbone, _count_forwards(backbone)))
        return backbone, info

    monkeypatch.setattr(weights, "load_eval_backbone", counted)
    out = tmp_path / "r.json"
    assert main(["linear", "--weights", "random", "--arch", "vit_test", "--data",
                 str(tmp_path / "d"), "--image-size", "32", "--batch-size", str(batch),
                 "--num-workers", "0", "--cache-dir", "none", "--quiet", "--augment",
                 "--n-last-blocks", "1", "2", "--avgpool", "both", "--iterations", "3",
                 "--probe-batch-size", "8", "--lrs", "0.01", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (backbone, calls), = loaded
    passes = math.ceil(res["iterations"] * 8 / n_train)
    train_batches, val_batches = math.ceil(n_train / batch), math.ceil(n_val / batch)
    assert len(res["grid"]) == 4 and passes > 1
    assert len(calls) == train_batches * (1 + passes) + val_batches, calls

    # the same numbers as the probes of each feature set trained on its own
    train, val, classes = labelled_splits(str(tmp_path / "d"), None)
    ex = BackboneExtractor(backbone, 32, batch, progress=False, n_last_blocks=2)
    paths = [p for p, _ in train]
    feats = {"train": ex(paths), "val": ex([p for p, _ in val])}
    y_tr, y_va = (torch.tensor([c for _, c in s]) for s in (train, val))
    for (n, pool), name in zip([(1, False), (1, True), (2, False), (2, True)], res["grid"],
                               strict=True):
        alone = train_linear_probes(
            linear_features(feats["train"], n, pool), y_tr, linear_features(feats["val"], n, pool),
            y_va, len(classes), lrs=(0.01, 1.0), iterations=3, batch_size=8, seed=0,
            train_views=lambda q, n=n, pool=pool: linear_features(ex.views(paths, 0, q), n, pool))
        assert res["grid"][name]["best"] == alone["best"], name
        assert res["grid"][name]["per_lr"] == {str(k): v for k, v in alone["per_lr"].items()}


@pytest.mark.parametrize("kw", [
    {},  # DINOv3: RoPE, storage tokens
    {"pos_embed": "learned", "pos_embed_grid": 2, "n_storage_tokens": 0,
     "untie_cls_and_patch_norms": True},  # DINOv2-like, with the untied CLS norm
])
@pytest.mark.parametrize("n_last", [4, 2])
def test_last_blocks_cls_come_from_one_forward(tmp_path, kw, n_last):
    """n_last_blocks > 1: one backbone forward per batch (was two: forward_features for the
    CLS and patch mean, get_intermediate_layers for the blocks' CLS), and the same features bit
    for bit as those two calls give."""
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(patch_size=16, embed_dim=32, depth=4, num_heads=2,
                                     **kw).eval()
    paths = _images(tmp_path, 5)
    calls = _count_forwards(backbone)
    feats = BackboneExtractor(backbone, 32, batch_size=2, progress=False,
                              n_last_blocks=n_last)(paths)
    assert len(calls) == 3, calls  # batches of 2, 2, 1

    # the two calls of the old extractor, batch by batch
    x = torch.stack([to_normalized_tensor(resize_center_crop(Image.open(p), 32)) for p in paths])
    with torch.no_grad():
        parts = []
        for b in x.split(2):
            out = backbone.forward_features(b)
            layers = backbone.get_intermediate_layers(b, n=n_last, return_class_token=True,
                                                      norm=True)
            parts.append((out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1),
                          torch.stack([c for _, c in layers], 1)))
    cls, patch_mean, blocks = (torch.cat(t) for t in zip(*parts, strict=True))
    assert torch.equal(feats["cls"], cls)
    assert torch.equal(feats["patch_mean"], patch_mean)
    assert torch.equal(feats["cls_blocks"], blocks)


@pytest.mark.parametrize("augment", [True, False])
def test_grid_heads_are_the_per_set_heads(monkeypatch, augment):
    """train_linear_probe_grid trains every feature set's heads in one loop over the passes
    (asking for each pass's views once): the trained heads are torch.equal to those of
    train_linear_probes on each set alone (its own init and batches), and so are the results.
    The heads are read where both evaluate them (linear._predict)."""
    gen = torch.Generator().manual_seed(0)
    n, d, n_classes = 40, 6, 3
    y = torch.arange(n) % n_classes

    def feats(rows, g):
        blocks = torch.randn(rows, 4, d, generator=g)
        blocks[torch.arange(rows), -1, y[:rows] % d] += 2.0
        return {"cls": blocks[:, -1].clone(), "patch_mean": torch.randn(rows, d, generator=g),
                "cls_blocks": blocks}

    train, val = feats(n, gen), feats(n, gen)
    asked = []

    def views(p):  # the raw features of pass p's views
        asked.append(p)
        return feats(n, torch.Generator().manual_seed(100 + p))

    heads = []
    real = linear._predict

    def recording(x, weight, bias, chunk=8192):
        heads.append((weight.clone(), bias.clone()))
        return real(x, weight, bias, chunk)

    monkeypatch.setattr(linear, "_predict", recording)
    grid = [(1, False), (1, True), (4, False), (4, True)]
    kw = dict(lrs=(1e-3, 0.1, 1.0), iterations=7, batch_size=16, seed=3)
    got = train_linear_probe_grid(train, y, val, y, n_classes, grid,
                                  train_views=views if augment else None, **kw)
    grid_heads, grid_asked = heads[:], asked[:]
    heads.clear()
    asked.clear()
    for m, pool in grid:
        alone = train_linear_probes(
            linear_features(train, m, pool), y, linear_features(val, m, pool), y, n_classes,
            train_views=(lambda q, m=m, pool=pool: linear_features(views(q), m, pool))
            if augment else None, **kw)
        assert got[m, pool] == alone, (m, pool)
    passes = math.ceil(7 * 16 / n)
    assert grid_asked == (list(range(passes)) if augment else [])
    assert asked == (list(range(passes)) * len(grid) if augment else [])
    assert len(grid_heads) == len(heads) == 2 * len(grid)  # val, then train, of each set
    for (w, b), (w_alone, b_alone) in zip(grid_heads, heads, strict=True):
        assert torch.equal(w, w_alone) and torch.equal(b, b_alone)


def test_convnext_last_blocks_names_the_flag(tmp_path):
    """--n-last-blocks 2 on a ConvNeXt (its stages have other widths: no CLS per block): one
    line naming the flag and what is allowed, before any image is read (was the backbone's
    "get_intermediate_layers gives the last stage only (n=1), got n=2" after the first batch
    was decoded)."""
    from fastdino.models.convnext import build_convnext

    ex = BackboneExtractor(build_convnext("convnext_test"), 32, progress=False, n_last_blocks=2)
    with pytest.raises(ValueError, match=r"^--n-last-blocks 2 is invalid: a ConvNeXt backbone "
                                         r".*allowed is 1$"):
        ex([str(tmp_path / "never_read.png")])


def test_empty_grid_is_an_error():
    """No feature set: a one-line ValueError, not an empty result (nothing trained)."""
    feats = {"cls": torch.randn(4, 3), "patch_mean": torch.randn(4, 3)}
    with pytest.raises(ValueError, match="grid is empty"):
        train_linear_probe_grid(feats, torch.arange(4) % 2, feats, torch.arange(4) % 2, 2, [])
