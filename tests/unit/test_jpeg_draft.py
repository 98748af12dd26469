"""Reduced JPEG decoding (data.jpeg_draft): Pillow's draft decodes a large JPEG at 1/2, 1/4 or 1/8,
the crop boxes and random draws stay those of the full decode, the pixels stay close, and no
crop ever becomes an upscale."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.config import CropsConfig, load_config
from fastdino.data import transforms as T
from fastdino.data.datasets import (
    DRAFT_INFO,
    ImageFolderUnlabeled,
    decode_rgb,
    draft_of,
    largest_reduction,
)
from fastdino.data.loader import MultiCropBatches, augmentation_rng
from fastdino.data.transforms import (
    CropNeeds,
    DataAugmentationDINO,
    crop_resize,
    min_crop_side,
    random_resized_crop_params,
)
from fastdino.eval.features import (
    TRANSFORM_VERSION,
    BackboneExtractor,
    EvalDraft,
    _EvalImages,
    resize_center_crop,
    resize_short,
    to_normalized_tensor,
)

# a 4.4 MP photo, sides not multiples of 8 (the reduced ones are ceil'd): DINOv3's 2 x 224 +
# 8 x 96 crops allow 1/4
W, H = 2431, 1827
PSNR_MIN = 40.0  # dB, drafted vs full-decode crops of the smooth image below (measured 47-50;
# boxes scaled by the reduced / full size ratio instead of 1/k give 34-37, shifted by half a
# reduced pixel ~25)


def smooth_rgb(w: int = W, h: int = H, detail: int = 120, seed: int = 0) -> Image.Image:
    """Random colours `detail` across, bicubic-upscaled: smooth, with structure every ~20 px."""
    small = np.random.default_rng(seed).integers(0, 256, (detail * h // w, detail, 3), np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 10 * math.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return jpeg_bytes(smooth_rgb())


NEEDS = CropNeeds.of([CropsConfig()])


def test_large_jpeg_is_decoded_reduced_and_records_its_full_size(large_jpeg):
    # the smallest local box: sqrt(0.05 * 0.75 * W * H) - 0.5 ~ 408 >= 4 * 96
    assert largest_reduction(NEEDS(W, H)) == 4
    img = decode_rgb(large_jpeg, draft=NEEDS)
    assert img.size == (-(-W // 4), -(-H // 4)) and img.mode == "RGB"
    assert draft_of(img) == (W, H, 4)
    assert draft_of(decode_rgb(large_jpeg)) == (W, H, 1)  # no draft: the full decode


def test_same_boxes_ops_and_random_stream_with_and_without_draft(large_jpeg, monkeypatch):
    """The crop plans are drawn from the full size: the same boxes (full-image coordinates), the
    same ops, and the Generator left in the same state."""
    boxes = []
    draw = T.random_resized_crop_params

    def recording(*args):
        boxes[-1].append((args[:2], draw(*args)))
        return boxes[-1][-1][1]

    monkeypatch.setattr(T, "random_resized_crop_params", recording)
    aug = DataAugmentationDINO(CropsConfig(), record_ops=True)
    outs, after = [], []
    for draft in (None, NEEDS):
        boxes.append([])
        rng = np.random.default_rng(7)
        outs.append(aug(decode_rgb(large_jpeg, draft=draft), rng))
        after.append(rng.integers(0, 2**62))
    assert boxes[0] == boxes[1] and len(boxes[0]) == 10
    assert all(size == (W, H) for size, _ in boxes[1])  # drawn from the full size
    assert outs[0]["ops"] == outs[1]["ops"]
    assert after[0] == after[1]
    for key in ("global_crops", "local_crops"):
        assert [c.shape for c in outs[0][key]] == [c.shape for c in outs[1][key]]


def test_drafted_crops_are_close_to_the_full_decode_crops(large_jpeg):
    full, reduced = decode_rgb(large_jpeg), decode_rgb(large_jpeg, draft=NEEDS)
    rng = np.random.default_rng(1)
    for _ in range(20):
        for scale, size in (((0.05, 0.32), 96), ((0.32, 1.0), 224)):
            box = random_resized_crop_params(W, H, scale, (3 / 4, 4 / 3), rng)
            a, b = crop_resize(full, box, size), crop_resize(reduced, box, size)
            assert a.size == b.size == (size, size)
            assert DRAFT_INFO not in b.info  # a crop is its own full size (its resizes after)
            assert psnr(a, b) > PSNR_MIN, box


class _Extreme:
    """A Generator stand-in drawing the ends of the ranges: scale at its minimum, the aspect at
    its low or high end, boxes at the top-left (the smallest boxes random_resized_crop_params
    can give; the fallback box when they do not fit)."""

    def __init__(self, aspect_end: int) -> None:
        self.calls, self.aspect_end = 0, aspect_end

    def uniform(self, lo, hi):
        self.calls += 1
        return lo if self.calls % 2 else (lo, hi)[self.aspect_end]

    def integers(self, lo, hi):
        return lo


CONFIGS = [
    [CropsConfig()],
    [CropsConfig(gram_teacher_crops_size=448)],
    [CropsConfig(local_crops_number=0, global_crops_scale=(0.08, 1.0))],
    [CropsConfig(global_crops_size=g, local_crops_size=lo) for g, lo in
     ((224, 96), (256, 112), (512, 224))],  # a resolution mix: every entry
    [CropsConfig(local_crops_scale=(0.01, 0.1), local_crops_size=32)],
]


@pytest.mark.parametrize("configs", CONFIGS)
def test_the_reduction_never_makes_a_crop_an_upscale(configs):
    """Over image sizes (small, large, elongated): after the chosen reduction k, the smallest
    box of every crop kind (minimum scale, both extreme aspects, the fallback box) and random
    boxes still span at least the crop's output side; min_crop_side is a lower bound."""
    needs = CropNeeds.of(configs)
    sizes = np.random.default_rng(0).integers(64, 12000, (150, 2)).tolist()
    sizes += [[500, 375], [4000, 3000], [12000, 300], [300, 12000], [8000, 8000], [1024, 768]]
    seen = set()
    for w, h in sizes:
        k = largest_reduction(needs(w, h))
        seen.add(k)
        for c in configs:
            kinds = [(c.global_crops_scale, max(c.global_crops_size,
                                                c.gram_teacher_crops_size or 0))]
            if c.local_crops_number:
                kinds.append((c.local_crops_scale, c.local_crops_size))
            for scale, size in kinds:
                rngs = [_Extreme(0), _Extreme(1)] + [np.random.default_rng(s) for s in range(5)]
                for rng in rngs:
                    _, _, bh, bw = random_resized_crop_params(w, h, scale, (3 / 4, 4 / 3), rng)
                    assert min(bh, bw) >= min_crop_side(w, h, scale[0]), (w, h, scale)
                    if k > 1:
                        assert min(bh, bw) / k >= size, (w, h, k, scale, size)
    assert 1 in seen and max(seen) > 1  # both cases met


@pytest.mark.parametrize("w,h", [(1001, 777), (403, 301), (640, 480), (97, 1203)])
def test_pillow_takes_exactly_the_reduction_asked(w, h):
    """Odd sizes: libjpeg's reduced side is ceil(side / k), and Pillow's draft of
    (W // k, H // k) takes k itself."""
    needs = CropNeeds(((0.5, 16),))
    k = largest_reduction(needs(w, h))
    assert k > 1
    img = decode_rgb(jpeg_bytes(smooth_rgb(w, h, detail=20)), draft=needs)
    assert draft_of(img) == (w, h, k)
    assert img.size == (-(-w // k), -(-h // k))


def test_imagenet_size_image_is_not_reduced():
    data = jpeg_bytes(smooth_rgb(500, 375, detail=50))
    assert largest_reduction(NEEDS(500, 375)) == 1
    img, full = decode_rgb(data, draft=NEEDS), decode_rgb(data)
    assert DRAFT_INFO not in img.info and img.size == (500, 375)
    aug = DataAugmentationDINO(CropsConfig())
    a, b = aug(img, np.random.default_rng(3)), aug(full, np.random.default_rng(3))
    assert all(torch.equal(x, y) for x, y in zip(a["local_crops"], b["local_crops"], strict=True))


def test_non_jpeg_is_decoded_in_full():
    img = smooth_rgb(1600, 1200, detail=40)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_rgb(buf.getvalue(), draft=NEEDS)
    assert out.size == (1600, 1200) and DRAFT_INFO not in out.info
    assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize("mode", ["L", "CMYK", "MPO"])
def test_greyscale_cmyk_and_mpo_jpegs_are_reduced_alike(mode):
    """MPO: a phone / camera JPEG with more pictures appended, which PIL opens as format MPO."""
    if mode == "MPO":
        src, buf = smooth_rgb(), io.BytesIO()
        src.save(buf, "MPO", save_all=True, append_images=[src.resize((320, 240))], quality=90)
        data = buf.getvalue()
        assert Image.open(io.BytesIO(data)).format == "MPO"
    else:
        data = jpeg_bytes(smooth_rgb().convert(mode))
    full, reduced = decode_rgb(data), decode_rgb(data, draft=NEEDS)
    assert reduced.mode == "RGB" and draft_of(reduced) == (W, H, 4)
    box = random_resized_crop_params(W, H, (0.05, 0.32), (3 / 4, 4 / 3),
                                     np.random.default_rng(0))
    assert psnr(crop_resize(full, box, 96), crop_resize(reduced, box, 96)) > PSNR_MIN


def _loader_cfg(root, *overrides):
    return load_config(None, [f"data.root={root}", *overrides])


def test_loader_key_on_drafts_and_off_gives_the_full_decode_pixels(tmp_path, large_jpeg):
    (tmp_path / "a.jpg").write_bytes(large_jpeg)
    off = _loader_cfg(tmp_path, "data.jpeg_draft=false")
    images = ImageFolderUnlabeled(root=tmp_path)
    got = MultiCropBatches(images, off, 0, 1).sample(0, 0)
    assert images.draft is None
    # the old pipeline: a full PIL decode and the augmentation from the same Generator
    want = DataAugmentationDINO(off.crops)(Image.open(tmp_path / "a.jpg").convert("RGB"),
                                          augmentation_rng(off.data.seed, 0, 0))
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(a, b) for a, b in zip(got[key], want[key], strict=True))

    on = _loader_cfg(tmp_path)
    assert on.data.jpeg_draft is True  # the default
    images = ImageFolderUnlabeled(root=tmp_path)
    drafted = MultiCropBatches(images, on, 0, 1).sample(0, 0)
    assert images.draft == NEEDS and draft_of(images.decode(0))[2] == 4
    for key in ("global_crops", "local_crops"):
        for a, b in zip(got[key], drafted[key], strict=True):
            assert a.shape == b.shape
            # the same ops on close pixels (solarise / jitter can amplify a level here and there)
            assert (a - b).abs().gt(0.1).float().mean() < 0.02


def test_loader_gpu_photometric_drafts_with_the_same_plan(tmp_path, large_jpeg):
    """torch_photometric=gpu's workers cut the crops (gpu_photometric.geometric_crops) from a
    reduced decode too: the same plan (boxes drawn from the full size, the same photometric
    parameters), pixels close to the full decode's."""
    from fastdino.data.gpu_photometric import geometric_crops

    (tmp_path / "a.jpg").write_bytes(large_jpeg)
    images = ImageFolderUnlabeled(root=tmp_path)
    cfg = _loader_cfg(tmp_path, "data.torch_photometric=gpu")
    MultiCropBatches(images, cfg, 0, 1)
    assert images.draft == NEEDS
    full = geometric_crops(decode_rgb(large_jpeg), cfg.crops, augmentation_rng(0, 0, 0))
    reduced = geometric_crops(decode_rgb(large_jpeg, draft=NEEDS), cfg.crops,
                              augmentation_rng(0, 0, 0))
    np.testing.assert_array_equal(full["params"], reduced["params"])
    for key in ("global", "local"):
        for a, b in zip(full[key], reduced[key], strict=True):
            assert a.shape == b.shape and psnr(a, b) > 40, key


def test_eval_transform_drafts_close_to_the_full_decode(tmp_path, large_jpeg):
    path = tmp_path / "a.jpg"
    path.write_bytes(large_jpeg)
    assert largest_reduction(EvalDraft(256)(W, H)) == 4  # 1827 / 4 >= 256
    full, reduced = decode_rgb(str(path)), decode_rgb(str(path), draft=EvalDraft(256))
    assert draft_of(reduced)[2] == 4
    a, b = resize_center_crop(full, 224), resize_center_crop(reduced, 224)
    assert a.size == b.size == (224, 224) and psnr(a, b) > PSNR_MIN
    assert DRAFT_INFO not in b.info
    # the dataset: drafted by default, the old pixels exactly with jpeg_draft=False
    x_on = _EvalImages([str(path)], 224)[0][0]
    x_off = _EvalImages([str(path)], 224, jpeg_draft=False)[0][0]
    assert torch.equal(x_off, to_normalized_tensor(resize_center_crop(full, 224)))
    assert torch.equal(x_on, to_normalized_tensor(b))
    # the linear probe's random views: boxes drawn from the full size
    v_on = _EvalImages([str(path)], 224, view=(0, 1))[0][0]
    v_off = _EvalImages([str(path)], 224, view=(0, 1), jpeg_draft=False)[0][0]
    assert (v_on - v_off).abs().mean() < 0.02


def test_eval_cache_key_names_the_decoding():
    backbone = torch.nn.Linear(1, 1)
    backbone.patch_size = 16
    assert BackboneExtractor(backbone, 224).transform != TRANSFORM_VERSION
    assert BackboneExtractor(backbone, 224, jpeg_draft=False).transform == TRANSFORM_VERSION


def test_truncated_jpeg_is_still_skipped_and_counted(tmp_path, large_jpeg):
    """A reduced decode of a cut-short JPEG fails at load as the full one does: the dataset
    passes over it to the next image and counts it."""
    (tmp_path / "a.jpg").write_bytes(large_jpeg[: len(large_jpeg) // 2])
    (tmp_path / "b.jpg").write_bytes(large_jpeg)
    images = ImageFolderUnlabeled(root=tmp_path)
    images.draft = NEEDS
    img, used, skipped = images.load(0)
    assert used == 1 and len(skipped) == 1 and skipped[0].endswith("a.jpg")
    assert draft_of(img) == (W, H, 4) and len(images.skipped) == 1


def test_loader_drafts_both_sources_of_homogeneous_batches(tmp_path, large_jpeg):
    for sub in ("main", "homo"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.jpg").write_bytes(large_jpeg)
    from fastdino.data.loader import build_dataset

    cfg = load_config(None, [f"data.root={tmp_path / 'main'}",
                             f"data.homogeneous_root={tmp_path / 'homo'}"])
    images = build_dataset(cfg)
    MultiCropBatches(images, cfg, 0, 1)
    assert [draft_of(images.decode(i))[2] for i in range(2)] == [4, 4]


@pytest.mark.parametrize("subsampling,k", [(0, 4), (1, 2), (2, 4)])
def test_non_square_chroma_subsampling_is_reduced_less(subsampling, k):
    """4:2:2 (many cameras' JPEGs): libjpeg's reduced decode keeps its chroma at 1/(2k)
    horizontally (square IDCT scaling only), so it is reduced half as much as 4:4:4 and 4:2:0,
    and its crops keep their colour detail (at 1/4 the chroma alone was ~38 dB off)."""
    data = jpeg_bytes(smooth_rgb(), subsampling=subsampling)
    full, reduced = decode_rgb(data), decode_rgb(data, draft=NEEDS)
    assert draft_of(reduced)[2] == k
    rng = np.random.default_rng(0)
    for _ in range(5):
        box = random_resized_crop_params(W, H, (0.05, 0.32), (3 / 4, 4 / 3), rng)
        assert psnr(crop_resize(full, box, 96), crop_resize(reduced, box, 96)) > PSNR_MIN


@pytest.mark.parametrize("cmd", ["knn", "linear"])
def test_eval_no_jpeg_draft_flag_reaches_the_extractor(cmd):
    from fastdino.eval.cli import build_parser

    base = [cmd, "--data", "x", "--weights", "random"]
    assert build_parser().parse_args(base).jpeg_draft is True
    assert build_parser().parse_args([*base, "--no-jpeg-draft"]).jpeg_draft is False


def _spy_drafts(monkeypatch) -> list:
    """The draft rule of every decode the kNN probe makes (fastdino.eval.knn's decode_location)."""
    from fastdino.eval import knn

    seen, real = [], knn.decode_location

    def spy(location, white_level=None, name=None, draft=None):
        seen.append(draft)
        return real(location, white_level, name, draft)

    monkeypatch.setattr(knn, "decode_location", spy)
    return seen


def test_knn_probe_drafts_as_eval_knn_unless_the_run_says_not(tmp_path, monkeypatch, large_jpeg):
    """The in-training probe's features are eval knn's: its large JPEGs are decoded down to the
    same resize target (EvalDraft), and the run's data.jpeg_draft=false decodes them in full."""
    from fastdino.eval.knn import extract_features
    from fastdino.models import vit_test

    (tmp_path / "a.jpg").write_bytes(large_jpeg)
    samples = [(str(tmp_path / "a.jpg"), 0)]
    seen, model = _spy_drafts(monkeypatch), vit_test()
    on, _ = extract_features(model, samples, 32)
    assert seen == [EvalDraft(resize_short(32))]
    seen.clear()
    off, _ = extract_features(model, samples, 32, jpeg_draft=False)
    assert seen == [None]
    assert torch.nn.functional.cosine_similarity(on, off).item() > 0.99


def test_trainer_probe_takes_data_jpeg_draft(tmp_path, monkeypatch):
    from fastdino.train import Trainer

    probe = tmp_path / "probe"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (probe / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (40 * len(cls), 90, 200)).save(probe / split / cls / "0.png")
    base = ["dino.head.n_prototypes=128", "ibot.head.n_prototypes=128", "data.num_workers=0",
            "train.resume=none", "train.max_iterations=1", "train.log_every=1",
            "train.knn_every=1", f"train.knn_data={probe}"]
    seen = _spy_drafts(monkeypatch)
    for on in (True, False):
        seen.clear()
        cfg = load_config("smoke", [*base, f"train.output_dir={tmp_path / str(on)}",
                                    f"data.jpeg_draft={str(on).lower()}"])
        assert "knn_top1_k10" in Trainer(cfg).train()[-1]
        assert seen and all((d is not None) == on for d in seen)


def test_curate_embed_drafts_and_never_mixes_decodings_in_one_folder(tmp_path, large_jpeg,
                                                                      capsys):
    """curate embed decodes large JPEGs reduced (as eval's features) unless --no-jpeg-draft; the
    folder's key says which, so a folder embedded one way is not continued the other way."""
    import json

    from fastdino.curation.cli import main
    from fastdino.curation.embed import EMBEDDINGS, PROGRESS

    data = tmp_path / "imgs"
    data.mkdir()
    (data / "a.jpg").write_bytes(large_jpeg)
    common = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test",
              "--image-size", "32", "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "on")]) == 0
    assert main([*common, "--out", str(tmp_path / "off"), "--no-jpeg-draft"]) == 0
    keys = {d: json.loads((tmp_path / d / PROGRESS).read_text())["key"] for d in ("on", "off")}
    assert keys["on"].get("decode") == "jpeg-draft" and "decode" not in keys["off"]
    on, off = (np.load(tmp_path / d / EMBEDDINGS).astype(np.float32) for d in ("on", "off"))
    assert float((on * off).sum()) > 0.99  # unit rows of one image, decoded two ways
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "off")]) == 2  # the other decoding: refused
    assert "decode" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "off"), "--no-jpeg-draft"]) == 0
