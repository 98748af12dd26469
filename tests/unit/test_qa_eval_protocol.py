"""fastdino's probes against the official DINOv3 evaluation code (dinov3/eval/knn.py, linear.py,
data/transforms.py), number by number: the in-training kNN probe's transform, the linear probe's
batches and its default batch size."""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.linear import stream_batches, train_linear_probes


def test_training_knn_probe_sees_what_eval_knn_sees(tmp_path):
    """The in-training probe (train.knn_every -> fastdino.eval.knn) must extract the features of
    `fastdino eval knn`: the official eval transform (shorter side to 256/224 of the crop, centre
    crop), not the whole image squashed to a square, or its logged knn_top1 is another number
    than the eval command's on the same teacher. Non-square images tell the two apart."""
    from fastdino.eval.features import BackboneExtractor
    from fastdino.eval.knn import extract_features

    rng = np.random.default_rng(0)
    samples = []
    for i, (w, h) in enumerate([(64, 32), (30, 70), (48, 48)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i))
    backbone = _Pixels()  # (a random init ViT's CLS barely depends on its input)
    probe_f, probe_y = extract_features(backbone, samples, image_size=32)
    cls = BackboneExtractor(backbone, 32, progress=False)([p for p, _ in samples])["cls"]
    torch.testing.assert_close(probe_f, torch.nn.functional.normalize(cls, dim=-1))
    assert probe_y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("n,batch", [(24, 128), (130, 128), (7, 7), (10, 4)])
def test_stream_batches_are_full_and_cut_from_back_to_back_passes(n, batch):
    """The official linear probe draws its batches from an infinite sampler with drop_last:
    every step has `batch` rows (never a short last batch of a pass), and the stream is whole
    reshuffled passes laid end to end."""
    steps = 9
    batches = list(stream_batches(n, batch, steps, torch.Generator().manual_seed(0)))
    assert len(batches) == steps and all(b.shape == (batch,) for b in batches)
    stream = torch.cat(batches)
    for p in range(len(stream) // n):  # each complete pass: every row exactly once
        assert sorted(stream[p * n:(p + 1) * n].tolist()) == list(range(n))


def test_small_set_cap_counts_real_passes(monkeypatch):
    """`max_epochs` caps a small set at that many passes: with 24 rows and batches of 128 the
    probe takes ceil(100 * 24 / 128) = 19 steps, which must be ~100 passes (19 x 128 rows), not
    19 passes of 24 rows each at the lr scaled for 128."""
    n, batch = 24, 128
    started = []
    real = torch.randperm

    def counting(size, *args, **kwargs):  # a pass over the train rows starts with a shuffle
        if size == n:
            started.append(size)
        return real(size, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = torch.arange(n) % 3
    res = train_linear_probes(x, y, x, y, 3, lrs=(0.1,), iterations=12500, max_epochs=100,
                              batch_size=batch)
    assert res["iterations"] == 19
    assert len(started) == -(-19 * batch // n)  # 102 shuffles: 101.3 passes of 24 rows
    assert res["epochs"] == pytest.approx(19 * batch / n)


def test_linear_probe_default_batch_is_the_official_global_batch():
    """dinov3/eval/linear.py: batch_size 128 per GPU, lr x batch * world_size / 256, launched on
    8 GPUs by default (dinov3/run/submit.py --ngpus 8): 1024 rows per step, and 12,500 steps are
    then its 10 passes over ImageNet-1k. 128 rows would train 8x fewer samples at lr / 8."""
    from fastdino.eval.cli import build_parser

    args = build_parser().parse_args(["linear", "--weights", "random", "--data", "digits"])
    assert args.probe_batch_size == 1024 and args.iterations == 12500
    assert inspect.signature(train_linear_probes).parameters["batch_size"].default == 1024


def _seg_pair(tmp_path, img: np.ndarray, mask: np.ndarray):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp_path / "masks" / "a.png")
    return [(str(tmp_path / "images" / "a.png"), str(tmp_path / "masks" / "a.png"))]


def test_seg_training_crops_avoid_single_class_windows(tmp_path):
    """The official RandomCropWithLabel redraws a crop (up to 10 times) while one class covers
    >= 75% of it: on a 32 x 128 mask of class 0 with class 1 in its last 32 columns, a uniform
    crop of 32 x 32 holds both classes in balance (each < 75%) for 15 of its 97 positions (15%);
    the official crop does in most draws."""
    from fastdino.eval.seg import SegTrainSet

    mask = np.zeros((32, 128), dtype=np.int64)
    mask[:, 96:] = 1
    pairs = _seg_pair(tmp_path, np.full((32, 128, 3), 128, dtype=np.uint8), mask)
    data = SegTrainSet(pairs, 32, scale_range=(1.0, 1.0), flip=False)
    torch.manual_seed(0)
    balanced = 0
    for _ in range(100):
        _, y = data[0]
        share = float((y == 1).float().mean())
        balanced += 0.25 < share < 0.75
    assert balanced >= 60, balanced


def test_seg_training_applies_the_official_photometric_distortion(tmp_path):
    """PhotoMetricDistortion (brightness, contrast, saturation, hue, each with probability 1/2)
    changes all but ~1/16 of the training crops' colours, never the mask; --no-photometric (and
    the official transform's other steps alone) keeps the colour."""
    from fastdino.eval.features import to_normalized_tensor
    from fastdino.eval.seg import SegTrainSet

    colour = np.array([200, 60, 30], dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.int64)
    mask[:, 16:] = 1
    pairs = _seg_pair(tmp_path, np.broadcast_to(colour, (32, 32, 3)).copy(), mask)
    plain = to_normalized_tensor(Image.new("RGB", (32, 32), tuple(int(c) for c in colour)))
    torch.manual_seed(0)
    data = SegTrainSet(pairs, 32, scale_range=(1.0, 1.0), flip=False)
    changed = 0
    for _ in range(64):
        x, y = data[0]
        assert torch.equal(y, torch.from_numpy(mask))
        changed += not torch.allclose(x, plain, atol=1e-6)
    assert 50 <= changed <= 63, changed  # expected 60 of 64
    data.photometric = False
    assert all(torch.allclose(data[0][0], plain, atol=1e-6) for _ in range(8))


def test_adjust_hue_matches_the_hsv_turn():
    """fastdino's adjust_hue (torchvision's, which the official transform calls) turns the HSV
    hue: checked pixel by pixel against Python's colorsys."""
    import colorsys

    from fastdino.eval.seg import adjust_hue

    img = torch.randint(0, 256, (3, 4, 6), generator=torch.Generator().manual_seed(0),
                        dtype=torch.uint8)
    for turn in (0.1, -0.3, 0.5):
        out = adjust_hue(img, turn)
        for yx in np.ndindex(4, 6):
            h, s, v = colorsys.rgb_to_hsv(*(img[(slice(None), *yx)].float() / 255).tolist())
            ref = [int(c * (256 - 1e-3)) for c in colorsys.hsv_to_rgb((h + turn) % 1.0, s, v)]
            assert out[(slice(None), *yx)].tolist() == ref


def test_seg_cli_takes_no_photometric():
    from fastdino.eval.cli import build_parser

    base = ["seg", "--weights", "random", "--data", "x"]
    assert build_parser().parse_args(base).photometric is True
    assert build_parser().parse_args([*base, "--no-photometric"]).photometric is False


def test_seg_head_drops_out_before_its_batch_norm():
    """The official LinearHead runs dropout -> BN -> conv: in training, BN's running variance
    is that of the dropped-out features (a channel-constant input has variance 0 only if BN
    comes first), the statistics it then normalises with at evaluation."""
    from fastdino.eval.seg import LinearSegHead

    torch.manual_seed(0)
    head = LinearSegHead(16, 3).train()
    head(torch.ones(8, 16, 4, 4))
    # running_var = 0.9 * 1 + 0.1 * batch variance: above 0.9 once dropout zeroes channels
    assert bool((head.bn.running_var > 0.9).any()), head.bn.running_var


@pytest.mark.parametrize("flags,message", [
    (["--train-data", "t"], "--train-data given: give either --data, or both"),
    (["--val-data", "v"], "--val-data given: give either --data, or both"),
    ([], "no data flag given"),
    (["--data", "d", "--train-data", "t", "--val-data", "v"], "are exclusive"),
    (["--train-data", "t", "--val-data", "v", "--split-file", "s"],
     "--split-file lists the images of --data"),
])
def test_knn_and_linear_data_flags_are_one_line_errors(flags, message, capsys, monkeypatch):
    """A wrong combination of data flags is one line naming them and exit status 2 (as every
    other bad input), before any backbone is loaded; --split-file with --train-data was
    silently ignored."""
    import fastdino.eval.weights as weights
    from fastdino.eval.cli import main

    def no_backbone(*a, **k):
        raise AssertionError("the backbone is loaded before the flags are checked")

    monkeypatch.setattr(weights, "load_eval_backbone", no_backbone)
    for cmd in ("knn", "linear"):
        with pytest.raises(SystemExit) as e:  # as argparse's usage errors
            main([cmd, "--weights", "random", "--arch", "vit_test", *flags])
        assert e.value.code == 2 and message in str(e.value)
        err = capsys.readouterr().err
        assert err.startswith(f"fastdino eval {cmd}: error: ") and message in err, err
        assert err.count("\n") == 1


@pytest.mark.parametrize("lr", ["0", "-0.1", "nan"])
def test_linear_lrs_must_be_positive(lr, capsys):
    """--lrs 0 trains nothing and a negative lr ascends the loss: refused by argparse (exit 2,
    one line), and by train_linear_probes for library callers."""
    from fastdino.eval.cli import main

    with pytest.raises(SystemExit) as e:
        main(["linear", "--weights", "random", "--data", "digits", "--lrs", "0.1", lr])
    assert e.value.code == 2 and "--lrs" in capsys.readouterr().err
    x, y = torch.randn(6, 4), torch.arange(6) % 2
    with pytest.raises(ValueError, match="--lrs .* allowed are numbers > 0"):
        train_linear_probes(x, y, x, y, 2, lrs=(0.1, float(lr)), iterations=2)


class _Pixels(torch.nn.Module):
    """A stub backbone whose CLS is the input pixels: any change of the view changes it."""

    patch_size = 16

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the extractors' device

    def forward_features(self, x):
        return {"x_norm_clstoken": x.flatten(1), "x_norm_patchtokens": x.flatten(2).mT}


def test_random_resized_crop_is_torchvisions():
    """RandomResizedCrop's parameters: a box of U(0.08, 1) of the area, log-uniform aspect in
    [3/4, 4/3]; the whole image when the box must be all of it; the centre box of the closest
    allowed ratio when no draw fits (a very wide image at full area)."""
    from fastdino.eval.features import random_resized_crop

    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    gen = torch.Generator().manual_seed(0)
    whole = random_resized_crop(square, 16, gen, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(whole),
                          np.asarray(square.resize((16, 16), Image.Resampling.BICUBIC)))
    wide = Image.fromarray(rng.integers(0, 256, (10, 60, 3), dtype=np.uint8))
    centre = random_resized_crop(wide, 8, gen, scale=(1.0, 1.0))  # no 3/4..4/3 box of all of it
    box = (23, 0, 36, 10)  # 10 high, round(10 * 4/3) = 13 wide, left (60 - 13) // 2
    assert np.array_equal(np.asarray(centre), np.asarray(
        wide.resize((8, 8), Image.Resampling.BICUBIC, box=box)))
    views = {np.asarray(random_resized_crop(square, 16, gen)).tobytes() for _ in range(8)}
    assert len(views) == 8  # random boxes


def test_train_views_are_fresh_per_pass_and_reproducible(tmp_path):
    """--augment: each pass of the linear probe sees other random-resized-crop + flip views of
    the same images (not the centre crop), and the same (seed, pass) gives the same views."""
    from fastdino.eval.features import BackboneExtractor

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(paths[-1])
    ex = BackboneExtractor(_Pixels(), 32, progress=False)
    centre = ex(paths)["cls"]
    p0, p1 = ex.views(paths, 0, 0)["cls"], ex.views(paths, 0, 1)["cls"]
    assert p0.shape == centre.shape
    assert not torch.allclose(p0, centre) and not torch.allclose(p0, p1)
    torch.testing.assert_close(ex.views(paths, 0, 0)["cls"], p0, rtol=0, atol=0)


def test_linear_probe_trains_each_pass_on_its_views():
    """train_views(p) is asked once per pass, in order, and its rows are what the heads train
    on: views equal to x_train give x_train's result exactly; views whose labels are scrambled
    (each class's rows swapped with the next class's) teach the wrong classes."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(10)
    x = torch.randn(30, 6, generator=gen)
    x[torch.arange(30), y] += 4.0
    kw = dict(lrs=(0.1,), iterations=12, batch_size=16, seed=0)
    asked = []

    def same(p):
        asked.append(p)
        return x

    plain = train_linear_probes(x, y, x, y, 3, **kw)
    viewed = train_linear_probes(x, y, x, y, 3, train_views=same, **kw)
    assert viewed["per_lr"] == plain["per_lr"] and viewed["augment"] and not plain["augment"]
    assert asked == list(range(-(-12 * 16 // 30)))  # 7 passes: 0..6, once each
    swapped = x[(torch.arange(30) + 10) % 30]  # the rows of class (c + 1) labelled c
    wrong = train_linear_probes(x, y, x, y, 3, train_views=lambda p: swapped, **kw)
    assert plain["per_lr"][0.1] > 0.9 and wrong["per_lr"][0.1] < 0.1


def test_linear_cli_augment(tmp_path):
    from fastdino.eval.cli import build_parser, main

    base = ["linear", "--weights", "random", "--arch", "vit_test", "--data", "digits"]
    assert build_parser().parse_args(base).augment is False
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    out = tmp_path / "r.json"
    assert main(["linear", "--weights", "random", "--arch", "vit_test", "--data",
                 str(tmp_path), "--image-size", "32", "--num-workers", "0", "--cache-dir",
                 "none", "--quiet", "--augment", "--iterations", "3", "--probe-batch-size", "8",
                 "--json", str(out)]) == 0
    import json
    res = json.loads(out.read_text())
    assert res["augment"] is True and res["iterations"] == 3


def test_linear_features_are_the_official_create_linear_input():
    """The CLS of the last n blocks (oldest first), then with avgpool the last block's mean
    patch token (dinov2 / dinov3 eval/linear.py create_linear_input)."""
    from fastdino.eval.linear import linear_features

    blocks = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)  # [N, n, D]
    feats = {"cls": blocks[:, -1], "patch_mean": -torch.ones(2, 3), "cls_blocks": blocks}
    torch.testing.assert_close(linear_features(feats),
                               torch.cat([blocks[:, -1], -torch.ones(2, 3)], 1))
    torch.testing.assert_close(linear_features(feats, 4, avgpool=False), blocks.reshape(2, 12))
    torch.testing.assert_close(linear_features(feats, 2, avgpool=True), torch.cat(
        [blocks[:, 2], blocks[:, 3], -torch.ones(2, 3)], 1))
    with pytest.raises(ValueError, match="n_last_blocks 4: the features hold the CLS of the "
                                         "last 1 block"):
        linear_features({"cls": blocks[:, -1], "patch_mean": -torch.ones(2, 3)}, 4)


def test_extractor_gives_the_last_blocks_cls(tmp_path):
    """n_last_blocks > 1: the normed CLS of each of the last n blocks; the last one is the CLS
    the default features hold (x_norm_clstoken)."""
    from fastdino.eval.features import BackboneExtractor
    from fastdino.models.backbones import vit_test

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 36), (60 * i, 100, 200 - 50 * i)).save(paths[-1])
    torch.manual_seed(0)
    backbone = vit_test()
    feats = BackboneExtractor(backbone, 32, progress=False, n_last_blocks=2)(paths)
    assert feats["cls_blocks"].shape == (3, 2, backbone.embed_dim)
    torch.testing.assert_close(feats["cls_blocks"][:, -1], feats["cls"])
    assert not torch.allclose(feats["cls_blocks"][:, 0], feats["cls"])


def test_linear_cli_searches_the_dinov2_grid(tmp_path):
    """--n-last-blocks 1 2 --avgpool both: one probe per feature set (DINOv2's protocol), the best
    on val reported with its feature set; the cache of the default features is not mistaken
    for the grid's (which hold more)."""
    import json

    from fastdino.eval.cli import main

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "d" / split / c / f"{i}.png")
    common = ["linear", "--weights", "random", "--arch", "vit_test", "--data",
              str(tmp_path / "d"), "--image-size", "32", "--num-workers", "0", "--cache-dir",
              str(tmp_path / "cache"), "--quiet", "--iterations", "3", "--probe-batch-size", "8"]
    assert main([*common, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*common, "--n-last-blocks", "1", "2", "--avgpool", "both",
                 "--json", str(tmp_path / "g.json")]) == 0
    a, g = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "g.json"))
    assert "grid" not in a and a["feature_dim"] == 64  # CLS + patch mean, D = 32
    assert len(g["grid"]) == 4
    assert g["best"]["top1"] == max(v["best"]["top1"] for v in g["grid"].values())
    assert (g["best"]["n_last_blocks"], g["best"]["avgpool"]) in {(1, False), (1, True),
                                                                 (2, False), (2, True)}
    dims = {(1, False): 32, (1, True): 64, (2, False): 64, (2, True): 96}
    assert g["feature_dim"] == dims[g["best"]["n_last_blocks"], g["best"]["avgpool"]]


def test_pca_resize_is_the_official_notebooks():
    """dinov3 notebooks/pca.ipynb: TF.resize(img, (768 // 16 * 16, int(w * 768 / (h * 16)) *
    16)), torchvision's default (bilinear) interpolation."""
    from fastdino.eval.pca import resize_for_pca

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    out = resize_for_pca(img, 32, 16)
    assert out.size == (int(90 * 32 / (50 * 16)) * 16, 32)
    assert np.array_equal(np.asarray(out),
                          np.asarray(img.resize(out.size, Image.Resampling.BILINEAR)))


def test_linear_probe_without_training_rows_is_an_error_not_a_hang():
    """No training row (a library caller's empty split): the stream of full batches can never be
    filled (it drew empty passes forever); a one-line ValueError instead. A batch of 0 rows
    would divide the gradient by 0."""
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="no training rows"):
        train_linear_probes(x[:0], y[:0], x, y, 2, lrs=(0.1,), iterations=3)
    with pytest.raises(ValueError, match="batch_size 0 is invalid"):
        next(stream_batches(4, 0, 3, torch.Generator()))
    with pytest.raises(ValueError, match="no training rows"):
        next(stream_batches(0, 4, 3, torch.Generator()))


def test_more_last_blocks_than_the_backbone_has_names_the_flag(tmp_path):
    """--n-last-blocks above the backbone's depth: one line naming the flag and the allowed
    range, before any image is read (was get_intermediate_layers' "only 2 of the requested
    blocks [-7, ..., 1] exist" after the first batch)."""
    from fastdino.eval.features import BackboneExtractor
    from fastdino.models.backbones import vit_test

    backbone = vit_test()
    depth = len(backbone.blocks)
    ex = BackboneExtractor(backbone, 32, progress=False, n_last_blocks=depth + 1)
    with pytest.raises(ValueError, match=rf"^--n-last-blocks {depth + 1} is invalid: .* "
                                         rf"allowed is 1 \.\. {depth}"):
        ex([str(tmp_path / "never_read.png")])
