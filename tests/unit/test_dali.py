"""The DALI loader: Batch contract, same plan and pixels as the torch loader, augmentation rates,
crop statistics, shards, corrupt files, exact resume, loader choice.

The plan tests need no DALI; the pipeline tests are skipped when `nvidia.dali` is not importable
(CI installs the `dali` extra only where the wheel is available). Without CUDA they run the
CPU-only pipeline; on a GPU machine with DALI (bench/device_stage.sh) the same tests run the GPU
graph (nvJPEG "mixed" decode, DALI's jitter ops), its batches brought to the CPU to compare."""

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from dali_helpers import needs_dali
from data_helpers import pack_shards
from PIL import Image

from fastdino.config import load_config
from fastdino.data import dali_plan as P
from fastdino.data.collate import Batch
from fastdino.data.loader import augmentation_rng, build_train_loader
from fastdino.data.masking import mask_counts
from fastdino.data.transforms import BLUR_PROBABILITIES, DataAugmentationDINO


def _write_images(folder, n, seed=0):
    """Colourful gradients plus noise (so crops, flips and colour ops all change pixels)."""
    g = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(g.integers(40, 72)), int(g.integers(40, 72))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, 255 - (xx + yy) * 255 // (h + w)], -1)
        arr = np.clip(arr + g.integers(-25, 26, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.{'png' if i % 3 == 2 else 'jpg'}",
                                  quality=95)
    return folder


ON_GPU = torch.cuda.is_available()
# Plain crops (no colour op) against the torch loader, in 8-bit levels of per-crop mean |diff|:
# resampling error on the CPU; nvJPEG's chroma upsampling and IDCT differ from libjpeg-turbo's
# (PIL) by about a level more on the GPU.
PLAIN_MAD = 2.0 if ON_GPU else 1.0
# Any crop: the jitter is PIL's exactly (test_dali_jitter.py), so what remains is the resampling
# difference, amplified by contrast / saturation / the hue (CPU: up to 0.8 seen; 1.9 where Gram
# crops make the torch loader resample twice); nvJPEG's decode differences on top on the GPU
JITTER_MAD = 4.0 if ON_GPU else 3.0


def _cpu(b: Batch) -> Batch:
    """The batch on the CPU (the GPU pipeline's come out on the GPU); a blocking copy."""
    return b.to("cpu", non_blocking=False)


def _cfg(root, *extra, batch=2):
    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", f"data.batch_size_per_gpu={batch}",
                              "data.num_workers=1", *extra])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("dali_imgs"), 7)


def _dali(cfg, exact_hue=False, photometric="dali", source_workers=0, **kw):
    """The DALI graph doing every op unless photometric="triton" (the default of
    data.dali_jitter; tests of it say so). CPU-only DALI runs the CPU graph (host_jitter: PIL
    ColorJitter in fn.python_function), where exact_hue does not matter. With host_jitter=False it
    runs the GPU graph's DALI jitter ops on the CPU; exact_hue=False there is the fast-hue graph
    (fn.hsv), ~3x faster to build and run; the parity test uses the exact hue."""
    from fastdino.data.dali import build_dali_loader

    return build_dali_loader(cfg, exact_hue=exact_hue, photometric=photometric,
                             source_workers=source_workers, **kw)


# ------------------------------------------------------------------------------------------------
# The plan (no DALI)


@pytest.mark.parametrize("extra", [(), ("crops.blur_probabilities=official",),
                                   ("crops.gram_teacher_crops_size=48",
                                    "crops.horizontal_flip=false")])
def test_plan_draws_what_the_torch_augmentation_draws(extra):
    """Same Generator, same draws: the plan's coins equal the torch transform's recorded ops, and
    both leave the Generator in the same state (no draw missing or extra)."""
    cfg = _cfg("/unused", *extra)
    aug = DataAugmentationDINO(cfg.crops, record_ops=True)
    for k in range(30):
        w, h = 40 + 7 * k % 50, 40 + 11 * k % 45
        image = Image.new("RGB", (w, h), (k * 8 % 256, 100, 50))
        rng_t, rng_p = augmentation_rng(3, 1, k), augmentation_rng(3, 1, k)
        ops = aug(image, rng_t)["ops"]
        plan = P.plan_image(w, h, cfg.crops, rng_p)
        for row, op in zip(plan, ops["global"] + ops["local"], strict=True):
            assert (row[P.FLIP], row[P.JITTER], row[P.GRAY], row[P.BLUR], row[P.SOLARIZE]) == \
                (op.flip, op.jitter, op.grayscale, op.blur, op.solarize)
        assert rng_t.random() == rng_p.random()


def test_plan_jitter_slots_hold_each_op_once():
    cfg = _cfg("/unused")
    for k in range(50):
        plan = P.plan_image(64, 48, cfg.crops, augmentation_rng(0, 0, k))
        for row in plan:
            slots = row[P.SLOT0:P.SLOT0 + 16].reshape(4, 4)  # [slot, op]
            changed = slots != np.array(P.NEUTRAL, dtype=np.float32)
            if row[P.JITTER]:
                assert (changed.sum(0) == 1).all() and (changed.sum(1) == 1).all()  # permutation
                b, c, s, hue = (slots[changed.argmax(0)[op], op] for op in range(4))
                assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2
                assert -0.1 <= hue <= 0.1
            else:
                assert not changed.any()


def _binomial_ok(hits, n, p):
    """|rate - p| within 4.5 standard errors (false alarm ~ 1e-5 per check)."""
    if p in (0.0, 1.0):
        return hits == n * p
    return abs(hits / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("mode", ["intended", "official"])
def test_plan_rates_within_sampling_error(mode):
    cfg = _cfg("/unused", f"crops.blur_probabilities={mode}")
    plans = np.stack([P.plan_image(64, 48, cfg.crops, augmentation_rng(1, 0, k))
                      for k in range(1500)])  # [n, 4, N_PARAMS]
    blur = BLUR_PROBABILITIES[mode]
    expected = {P.FLIP: (0.5,) * 3, P.JITTER: (0.8,) * 3, P.GRAY: (0.2,) * 3,
                P.BLUR: blur, P.SOLARIZE: (0.0, 0.2, 0.0)}
    for col, (p1, p2, pl) in expected.items():
        local_rows = plans[:, 2:].reshape(-1, P.N_PARAMS)
        for rows, p in ((plans[:, 0], p1), (plans[:, 1], p2), (local_rows, pl)):
            assert _binomial_ok(int(rows[:, col].sum()), len(rows), p), (col, p)
    sig = plans[..., P.SIGMA][plans[..., P.BLUR] == 1]
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean() - 1.05) < 0.05


def test_probe_rejects_non_images_and_truncated_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        good, cut = tmp_path / f"good.{fmt}", tmp_path / f"cut.{fmt}"
        good.write_bytes(buf.getvalue())
        cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
        data, w, h = P.probe_image(good.read_bytes())
        assert (w, h) == (30, 20) and data.dtype == np.uint8 and len(data) == len(buf.getvalue())
        with pytest.raises(P.UnreadableImage):
            P.probe_image(cut.read_bytes())
    for name, content in (("text.jpg", b"not an image"), ("empty.png", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(P.UnreadableImage):
            P.probe_image((tmp_path / name).read_bytes())


def test_probe_accepts_trailing_data_after_the_end_marker():
    """JPEG / PNG with data after their end marker (a motion photo's video, zero padding) are
    valid, and decoders read them: accepted. Truncated ones still fail, also when an end marker
    lies earlier in the file (an embedded thumbnail's, before the scan data)."""
    arr = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    trailers = (b"\x00" * 5000, b"\x00" * 16 + b"ftypmp42" + bytes(range(256)) * 400)
    for fmt, kw in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                    ("MPO", {"save_all": True})):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt, **kw)
        data = buf.getvalue()
        for trailer in trailers:
            assert P.probe_image(data + trailer)[1:] == (60, 40), fmt
        with pytest.raises(P.UnreadableImage, match="truncated"):
            P.probe_image(data[: len(data) * 2 // 3])
    # a JPEG with an end marker in a header segment (as an EXIF thumbnail's), cut in its scan
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    data = buf.getvalue()
    comment = b"thumbnail \xff\xd8...\xff\xd9"
    data = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
    assert P.probe_image(data)[1:] == (60, 40)
    with pytest.raises(P.UnreadableImage, match="truncated"):
        P.probe_image(data[: len(data) * 2 // 3])


# (format PIL writes, save options, in DALI_FORMATS)
_FORMATS = [("JPEG", {}, True), ("MPO", {"save_all": True}, True), ("PNG", {}, True),
            ("BMP", {}, True), ("TIFF", {"compression": "tiff_lzw"}, True), ("PPM", {}, True),
            ("JPEG2000", {}, True), ("WEBP", {}, True), ("GIF", {}, False), ("ICO", {}, False),
            ("TGA", {}, False), ("PCX", {}, False)]


def _encode(fmt, kw, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    image = Image.fromarray(arr)
    if fmt == "MPO":  # a camera's multi-picture JPEG: two frames
        kw = {**kw, "append_images": [Image.fromarray(255 - arr)]}
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_probe_rejects_formats_dali_cannot_decode():
    """PIL parses GIF, ICO, TGA, ... (the torch loader trains on them, e.g. a GIF saved as .jpg);
    DALI's decoder fails its whole pipeline on them: the probe skips them, saying why."""
    for fmt, kw, ok in _FORMATS:
        data = _encode(fmt, kw)
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == fmt
        if ok:
            assert P.probe_image(data)[1:] == (30, 20), fmt
        else:
            with pytest.raises(P.UnreadableImage, match="DALI's decoder cannot read.*torch"):
                P.probe_image(data)


@needs_dali
def test_dali_decodes_every_format_the_probe_accepts():
    """The probe's DALI_FORMATS, checked against DALI's own decoder (CPU): each decodes to PIL's
    size; the rejected ones fail (if a DALI release learns one, widen DALI_FORMATS)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB,
                                 adjust_orientation=False)

    for fmt, kw, ok in _FORMATS:
        assert (fmt in P.DALI_FORMATS) == ok, fmt
        pipe = decode()
        pipe.build()
        pipe.feed_input("encoded", [np.frombuffer(_encode(fmt, kw), dtype=np.uint8)])
        if ok:
            assert np.array(pipe.run()[0][0]).shape == (20, 30, 3), fmt
        else:
            with pytest.raises(RuntimeError):
                pipe.run()


# ------------------------------------------------------------------------------------------------
# The pipeline (CPU-only DALI)


PHOTOMETRIC = pytest.mark.parametrize("photometric", ["dali", "triton"])


@needs_dali
@PHOTOMETRIC
def test_batch_contract_and_value_ranges(image_dir, photometric):
    cfg = _cfg(image_dir, "crops.gram_teacher_crops_size=48")
    loader = _dali(cfg, exact_hue=True, photometric=photometric)
    n_masked = sum(mask_counts(4, 4))
    lo = (0 - torch.tensor(cfg.crops.mean)) / torch.tensor(cfg.crops.std)
    hi = (1 - torch.tensor(cfg.crops.mean)) / torch.tensor(cfg.crops.std)
    for _ in range(2):
        b = next(loader)
        assert b.global_crops.device.type == ("cuda" if ON_GPU else "cpu")
        b = _cpu(b)
        assert isinstance(b, Batch) and b.n_images == 2
        assert b.global_crops.shape == (4, 3, 32, 32) and b.global_crops.dtype == torch.float32
        assert b.local_crops.shape == (4, 3, 16, 16) and b.local_crops.dtype == torch.float32
        assert b.gram_crops.shape == (4, 3, 48, 48) and b.gram_crops.dtype == torch.float32
        assert b.masks.shape == (4, 4) and b.masks.dtype == torch.bool
        assert b.mask_indices.shape == (n_masked,) and b.mask_indices.dtype == torch.long
        assert b.masks_weight.shape == (n_masked,) and b.n_masked_patches.tolist() == [n_masked]
        for x in (b.global_crops, b.local_crops, b.gram_crops):
            per_channel = x.transpose(0, 1).reshape(3, -1)
            assert (per_channel.min(1).values >= lo.view(3) - 1e-5).all()
            assert (per_channel.max(1).values <= hi.view(3) + 1e-5).all()
            assert x.std() > 0.1  # real image content, not a constant
    assert loader.iteration == 2


def _per_crop_mad(a, b):
    return (a - b).abs().mean((1, 2, 3))


GRAM_DISTORTED = ("crops.gram_teacher_crops_size=48", "crops.gram_teacher_no_distortions=false",
                  "kernels.impl=triton")  # the kernel's uint8 mode, then resize, then normalise


@needs_dali
@pytest.mark.parametrize("extra,host_jitter,photometric", [
    ((), None, "dali"), (("crops.gram_teacher_crops_size=48",), None, "dali"),
    ((), False, "dali"), ((), None, "triton"), (("crops.gram_teacher_crops_size=48",), None,
                                                "triton"), (GRAM_DISTORTED, None, "triton")])
def test_same_crops_and_masks_as_the_torch_loader(image_dir, extra, host_jitter, photometric):
    """Both loaders execute the same plan: crops with no colour op agree to resampling error,
    colour-augmented ones to that error as the (exact) colour ops carry it; masks are identical.
    host_jitter=False runs the GPU graph's DALI jitter ops on the CPU; photometric="triton" the
    photometric kernel after DALI's crop + resize (Gram crops distorted at the large size too)."""
    cfg = _cfg(image_dir, *extra, "data.num_workers=0")
    dali = _dali(cfg, exact_hue=True, debug=True, host_jitter=host_jitter, photometric=photometric)
    torch_loader = build_train_loader(cfg)
    scale = float(np.mean(cfg.crops.std)) * 255  # normalised units -> 8-bit levels
    for _ in range(4):
        d, t = _cpu(next(dali)), next(torch_loader)
        plan = dali.last_debug["plan"].cpu()  # [B, n_crops, N_PARAMS]
        for key, crops_d, crops_t, rows in (
                ("global", d.global_crops, t.global_crops, plan[:, :2].transpose(0, 1)),
                ("local", d.local_crops, t.local_crops, plan[:, 2:].transpose(0, 1))):
            rows = rows.reshape(-1, P.N_PARAMS)  # crop-major, as the batch
            plain = (rows[:, [P.JITTER, P.GRAY, P.BLUR, P.SOLARIZE]] == 0).all(1)
            mad = _per_crop_mad(crops_d, crops_t) * scale
            assert (mad[plain] < PLAIN_MAD).all(), (key, mad)
            assert (mad < JITTER_MAD).all(), (key, mad)
        if d.gram_crops is not None:  # no distortions; one resampling instead of two: looser
            assert (_per_crop_mad(d.gram_crops, t.gram_crops) * scale < 3.0).all()
        for f in ("masks", "mask_indices", "masks_weight", "n_masked_patches"):
            assert torch.equal(getattr(d, f), getattr(t, f)), f


@needs_dali
@pytest.mark.skipif(ON_GPU, reason="host_jitter exists in the CPU graph only; on a GPU both "
                    "loaders would run the same DALI jitter (test_dali_jitter.py pins it to PIL)")
def test_dali_jitter_graph_equals_the_host_pil_jitter(image_dir):
    """The GPU graph's jitter ops (host_jitter=False, run here on CPU-only DALI) and the CPU graph's
    PIL jitter (host_jitter) produce the same batches bit for bit: same plan, same resize, and a
    ColorJitter / greyscale that reproduces PIL exactly."""
    cfg = _cfg(image_dir, "data.num_workers=0")
    ops, pil = _dali(cfg, exact_hue=True, host_jitter=False), _dali(cfg)
    for _ in range(3):
        a, b = next(ops), next(pil)
        for f in ("global_crops", "local_crops"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


def _torch_loader_ops(crop: np.ndarray, row: np.ndarray, aug: DataAugmentationDINO,
                      distort: bool = True) -> torch.Tensor:
    """The torch loader's own photometric ops on a resized crop, driven by the plan row: flip
    (its geometric step), ColorJitter in the row's order (`pil_jitter`), greyscale, blur with the
    row's sigma, solarize, normalise."""
    from fastdino.data import transforms as T
    from fastdino.data.dali_ops import pil_jitter

    img = Image.fromarray(crop)
    if row[P.FLIP]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if distort:
        if row[P.JITTER]:
            img = Image.fromarray(pil_jitter(np.asarray(img), row))
        if row[P.GRAY]:
            img = T.grayscale(img)
        if row[P.BLUR]:
            img = T.gaussian_blur(img, float(row[P.SIGMA]))
        if row[P.SOLARIZE]:
            img = T.solarize(img, 128)
    return aug.normalize(img)


@needs_dali
@pytest.mark.parametrize("extra", [(), ("crops.gram_teacher_crops_size=48",)])
def test_triton_photometric_is_the_torch_loaders_ops_on_dali_crops(image_dir, extra):
    """photometric="triton", bit for bit: a second pipeline with the same plans gives the same
    uint8 crops, and the torch loader's own ops (PIL ColorJitter, greyscale, numpy blur,
    solarize, normalise) on them give exactly the loader's batch: plan -> kernel parameters,
    crop-major order, flips, Gram crops (flip + normalise only) all wired right."""
    from fastdino.data.dali import _Source, build_pipeline, output_names
    from fastdino.data.loader import ShardedInfiniteOrder, build_dataset

    # kernels.impl=triton: the kernel itself (the interpreter here, compiled on a GPU); auto
    # would take its reference on CPU tensors
    cfg = _cfg(image_dir, *extra, "data.num_workers=0", "kernels.impl=triton", batch=3)
    loader = _dali(cfg, photometric="triton")
    images = build_dataset(cfg)
    source = _Source(images, ShardedInfiniteOrder(len(images), cfg.data.seed, 0, 1), cfg, 0,
                     photometric_params=True)
    device_id = torch.cuda.current_device() if ON_GPU else None
    pipe = build_pipeline(source, cfg, device_id, 1, debug=True, photometric="triton")
    names = output_names(cfg, "triton", debug=True)
    aug = DataAugmentationDINO(cfg.crops)
    n_local = cfg.crops.local_crops_number
    for _ in range(3):
        batch = _cpu(next(loader))
        outs = dict(zip(names, pipe.run(), strict=True))
        arr = {k: (v.as_cpu() if hasattr(v, "as_cpu") else v).as_array() for k, v in outs.items()}
        plan = arr["plan"]  # [B, n_crops, N_PARAMS]
        for field, crop_names, first, distort in (
                ("global_crops", ["global0", "global1"], 0, True),
                ("local_crops", [f"local{i}" for i in range(n_local)], 2, True),
                ("gram_crops", ["gram0", "gram1"], 0, False)):
            if getattr(batch, field) is None:
                continue
            want = torch.stack([_torch_loader_ops(arr[name][i], plan[i, first + k], aug, distort)
                                for k, name in enumerate(crop_names)
                                for i in range(cfg.data.batch_size_per_gpu)])
            assert torch.equal(getattr(batch, field), want), field


@needs_dali
def test_source_worker_processes_give_the_same_batches(image_dir):
    """data.dali_source_workers > 0 (DALI's parallel external source, spawned processes) reads
    the same files and draws the same plans as the in-process source: identical batches, skips
    reported the same way (a corrupt file among the images)."""
    import shutil

    folder = image_dir.parent / "dali_imgs_workers"
    if not folder.exists():
        shutil.copytree(image_dir, folder)
        (folder / "img99_truncated.jpg").write_bytes((folder / "img00.jpg").read_bytes()[:300])
    cfg = _cfg(folder, "data.num_workers=1", batch=3)
    inproc, workers = _dali(cfg, photometric="triton"), _dali(cfg, photometric="triton",
                                                              source_workers=2)
    assert workers.pipe.py_num_workers == 2
    skipped = [[], []]
    for _ in range(4):
        a, b = _cpu(next(inproc)), _cpu(next(workers))
        for f in ("global_crops", "local_crops", "masks"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
        skipped[0] += a.skipped_files
        skipped[1] += b.skipped_files
    assert skipped[0] == skipped[1]
    assert any("truncated" in s for s in skipped[0])


@needs_dali
@PHOTOMETRIC
def test_debug_coins_rates_and_effects(image_dir, photometric):
    """The coins the pipeline acted on (debug output) are the plan's and occur at their rates;
    greyscaled crops come out with 3 equal channels, others do not."""
    cfg = _cfg(image_dir, "crops.local_crops_number=4", batch=8)
    loader = _dali(cfg, debug=True, photometric=photometric)
    mean = torch.tensor(cfg.crops.mean).view(3, 1, 1)
    std = torch.tensor(cfg.crops.std).view(3, 1, 1)
    rows = []
    for _ in range(8):
        b = _cpu(next(loader))
        plan, meta = loader.last_debug["plan"].cpu(), loader.last_debug["meta"].cpu()
        for i, (epoch, index, _used) in enumerate(meta.tolist()):
            w, h = Image.open(loader.images.paths[index]).size
            ref = P.plan_image(w, h, cfg.crops, augmentation_rng(cfg.data.seed, epoch, index))
            assert np.array_equal(plan[i].numpy(), ref)
        image_major = b.global_crops.view(2, 8, 3, 32, 32).transpose(0, 1).reshape(-1, 3, 32, 32)
        raw = image_major * std + mean  # back to [0, 1]
        same = (raw.amax(1) - raw.amin(1)).amax((1, 2)) < 1e-5  # [B*2] image-major
        gray = plan[:, :2, P.GRAY].reshape(-1) == 1
        assert torch.equal(same, gray)
        rows.append(plan)
    plans = torch.cat(rows).numpy()  # [64 images, 6 crops, N_PARAMS]
    n = len(plans)
    for col, p in ((P.FLIP, 0.5), (P.JITTER, 0.8), (P.GRAY, 0.2)):
        assert _binomial_ok(int(plans[:, :, col].sum()), plans.shape[0] * plans.shape[1], p), col
    assert plans[:, 0, P.BLUR].sum() == n and _binomial_ok(int(plans[:, 1, P.BLUR].sum()), n, 0.1)
    assert _binomial_ok(int(plans[:, 2:, P.BLUR].sum()), 4 * n, 0.5)
    assert _binomial_ok(int(plans[:, 1, P.SOLARIZE].sum()), n, 0.2)
    assert plans[:, [0, 2, 3, 4, 5], P.SOLARIZE].sum() == 0


@needs_dali
def test_crop_scale_statistics(image_dir):
    """Windows lie inside the decoded image (DALI's shape = the probed size), with area fractions
    in the crop type's scale range and aspect ratios in [3/4, 4/3] (up to pixel rounding)."""
    cfg = _cfg(image_dir, batch=8)
    loader = _dali(cfg, debug=True)
    frac = {"global": [], "local": []}
    for _ in range(6):
        next(loader)
        dbg = loader.last_debug
        for i, (_e, _idx, used) in enumerate(dbg["meta"].tolist()):
            w, h = Image.open(loader.images.paths[used]).size
            assert dbg["image_shape"][i].tolist() == [h, w, 3]
            for c, row in enumerate(dbg["plan"][i].numpy()):
                top, left, ch, cw = row[[P.TOP, P.LEFT, P.HEIGHT, P.WIDTH]]
                assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
                assert 3 / 4 - 0.08 <= cw / ch <= 4 / 3 + 0.08
                frac["global" if c < 2 else "local"].append(ch * cw / (h * w))
    for kind, (lo, hi) in (("global", cfg.crops.global_crops_scale),
                           ("local", cfg.crops.local_crops_scale)):
        f = np.array(frac[kind])
        assert ((f > lo * 0.85) & (f < hi * 1.1)).mean() > 0.95, (kind, f)
        assert lo < np.median(f) < hi
    assert np.median(frac["local"]) < 0.5 * np.median(frac["global"])


@needs_dali
def test_rank_shards_are_disjoint_and_cover_each_epoch(image_dir):
    cfg = _cfg(image_dir)
    world, seen = 3, []
    for rank in range(world):
        loader = _dali(cfg, rank=rank, world_size=world, debug=True)
        mine = []
        for _ in range(4):  # 4 steps x 2 = 8 samples per rank: > one epoch of 7 over 3 ranks
            next(loader)
            mine += [tuple(m) for m in loader.last_debug["meta"][:, :2].tolist()]
        seen.append({m for m in mine if m[0] == 0})  # (epoch, index) of epoch 0
    assert all(not (seen[a] & seen[b]) for a in range(world) for b in range(a + 1, world))
    assert set().union(*seen) == {(0, i) for i in range(7)}


@needs_dali
@PHOTOMETRIC
def test_corrupt_files_are_skipped_and_counted(tmp_path, monkeypatch, photometric):
    root = _write_images(tmp_path / "imgs", 5)
    (root / "a_text.jpg").write_bytes(b"not an image at all")
    good = (root / "img00.jpg").read_bytes()
    (root / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    cfg = _cfg(root, batch=4)
    loader = _dali(cfg, photometric=photometric)
    for _ in range(4):  # 16 samples > 7 files: every file is met
        b = next(loader)
        assert b.global_crops.shape == (8, 3, 32, 32)
    assert {p.rsplit("/", 1)[1] for p in loader.skipped} == {"a_text.jpg", "b_truncated.jpg"}

    # A file the cheap probe lets through: DALI fails, the loader finds it, skips it, restarts
    # at the same step and yields what a clean run yields (bad file replaced by the next one).
    from fastdino.data import dali as dali_mod

    def probe_nothing(data, white_level=None):
        try:
            w, h = Image.open(io.BytesIO(data)).size
        except OSError:
            w, h = 50, 50  # pretend the header was fine
        return np.frombuffer(data, dtype=np.uint8), w, h

    monkeypatch.setattr(dali_mod.P, "probe_image", probe_nothing)
    recovering = _dali(cfg, photometric=photometric)
    for _ in range(4):
        b = next(recovering)
        assert b.global_crops.shape == (8, 3, 32, 32) and torch.isfinite(b.global_crops).all()
    assert {"a_text.jpg", "b_truncated.jpg"} <= {p.rsplit("/", 1)[1]
                                                 for p in recovering.images.skipped}


def _bogus_huffman_jpeg(path, seed=0):
    """A JPEG whose header and end marker are fine (the probe passes it) but whose first Huffman
    table is invalid: PIL and DALI both fail to decode it."""
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG")
    data = buf.getvalue()
    dht = data.find(b"\xff\xc4")  # marker, length (2), table class/id (1), 16 code counts
    path.write_bytes(data[:dht + 5] + b"\xff" * 16 + data[dht + 21:])
    return path


@needs_dali
@pytest.mark.parametrize("start", [0, 1])
def test_bad_file_in_the_first_step_is_skipped(tmp_path, start):
    """A file that passes the probe but that DALI cannot decode, in the very first step of a run
    or of a resume: skipped and replaced as in any later step (DALI's iterator fetched its first
    batch in its constructor, outside the recovery, and the run stopped)."""
    root = _write_images(tmp_path / "imgs", 3)
    bad = _bogus_huffman_jpeg(root / "bogus_huffman.jpg")
    P.probe_image(bad.read_bytes())  # the probe lets it through
    cfg = _cfg(root, batch=4)  # each step holds all 4 files
    loader = _dali(cfg, start_iteration=start)
    for _ in range(2):
        b = next(loader)
        assert b.global_crops.shape == (8, 3, 32, 32) and torch.isfinite(b.global_crops).all()
    assert loader.images.skipped == {str(bad)}
    assert loader.skipped == {str(bad)}


@needs_dali
def test_format_dali_cannot_decode_is_skipped(tmp_path):
    """GIF data saved as .jpg (PIL reads it, DALI's decoder does not): skipped with the reason
    instead of stopping the run (the recovery's PIL decode found nothing wrong with it)."""
    root = _write_images(tmp_path / "imgs", 3)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "gif_data.jpg", format="GIF")
    loader = _dali(_cfg(root, batch=4))
    for _ in range(2):
        b = next(loader)
        assert b.global_crops.shape == (8, 3, 32, 32) and torch.isfinite(b.global_crops).all()
    assert loader.skipped == {str(root / "gif_data.jpg")}


@needs_dali
def test_source_workers_stopped_on_rebuild_and_on_a_fatal_error(tmp_path):
    """A rebuilt pipeline's old source workers are stopped at once (they lived until exit, 2 more
    processes per recovery), and so are the workers of a loader that gives up (all files bad):
    left to DALI's finalizer at interpreter exit, the training process hung there in about
    half the runs (the pool's observer thread waiting on a worker's semaphore)."""
    psutil = pytest.importorskip("psutil", reason="psutil (the bench extra) finds the worker "
                                 "processes; the GPU image may lack it")
    root = _write_images(tmp_path / "imgs", 3)
    _bogus_huffman_jpeg(root / "bogus_huffman.jpg")
    loader = _dali(_cfg(root, batch=4), photometric="triton", source_workers=2)
    first = loader.pipe._py_pool.pids()  # started by build: the first step's workers
    next(loader)  # DALI fails on the bad file; the loader rebuilds its pipeline
    assert loader.skipped == {str(root / "bogus_huffman.jpg")}
    assert not any(psutil.pid_exists(pid) for pid in first)
    assert all(psutil.pid_exists(pid) for pid in loader.pipe._py_pool.pids())

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"{i}.jpg").write_bytes(b"not an image")
    failing = _dali(_cfg(bad, batch=2), photometric="triton", source_workers=2)
    pids = failing.pipe._py_pool.pids()
    with pytest.raises(Exception, match="could be read as images"):
        next(failing)
    assert not any(psutil.pid_exists(pid) for pid in pids)


@needs_dali
@PHOTOMETRIC
def test_resume_yields_exactly_the_uninterrupted_batches(image_dir, photometric):
    cfg = _cfg(image_dir)
    full = _dali(cfg, photometric=photometric)
    batches = [next(full) for _ in range(3)]
    resumed = next(_dali(cfg, start_iteration=2, photometric=photometric))
    for f in dataclasses.fields(Batch):
        x, y = getattr(batches[2], f.name), getattr(resumed, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        else:
            assert x == y, f.name


@needs_dali
def test_tar_shards_give_the_folder_batches(image_dir, tmp_path, monkeypatch):
    """The DALI source reads WebDataset shards in place: the same images packed into shards give
    the folder's batches bit for bit (same order, crops and masks)."""
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))  # the tar index cache
    shards = pack_shards(image_dir, tmp_path / "shards", per_shard=3)
    folder = _dali(_cfg(image_dir))
    packed = _dali(_cfg(shards))  # a folder of shards
    assert packed.num_images == folder.num_images == 7
    for _ in range(4):  # past one epoch of 7 images at B = 2
        a, b = _cpu(next(packed)), _cpu(next(folder))
        for f in dataclasses.fields(Batch):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def test_auto_picks_dali_only_with_dali_and_cuda(monkeypatch):
    from fastdino.data import dali as dali_mod

    assert dali_mod.choose_loader("torch") == "torch" and dali_mod.choose_loader("dali") == "dali"
    for have_dali, have_cuda, expected in ((True, True, "dali"), (True, False, "torch"),
                                           (False, True, "torch"), (False, False, "torch")):
        monkeypatch.setattr(dali_mod, "dali_available", lambda d=have_dali: d)
        monkeypatch.setattr(dali_mod.torch.cuda, "is_available", lambda c=have_cuda: c)
        assert dali_mod.choose_loader("auto") == expected
    with pytest.raises(ValueError, match="allowed are auto, torch, dali"):
        dali_mod.choose_loader("fast")


@needs_dali
def test_graph_operators_counts_the_jitter_graphs(image_dir):
    """`bench data` reports the operator count: the exact jitter graph has ~3x the fast one's."""
    from fastdino.data.dali import graph_operators

    cfg = _cfg(image_dir)
    exact = graph_operators(_dali(cfg, exact_hue=True, host_jitter=False).pipe)
    fast = graph_operators(_dali(cfg, exact_hue=False, host_jitter=False).pipe)
    # data.dali_jitter picks the graph when the caller does not
    from fastdino.data.dali import build_dali_loader

    for jitter, want in (("exact", exact), ("fast", fast)):
        c = _cfg(image_dir, f"data.dali_jitter={jitter}")
        loader = build_dali_loader(c, host_jitter=False, source_workers=0)
        assert graph_operators(loader.pipe) == want, jitter
    assert exact > 2 * fast, (fast, exact)
    if not ON_GPU:  # the CPU graph (host_jitter: one python_function per jitter) is CPU-only
        host = graph_operators(_dali(cfg).pipe)
        assert host < fast, (host, fast)
    # photometric="triton": the graph only crops and resizes
    c = _cfg(image_dir, "data.dali_jitter=triton")
    triton_loader = build_dali_loader(c, source_workers=0)
    assert triton_loader.photometric == "triton"
    assert graph_operators(triton_loader.pipe) * 10 < fast, fast


def _graph_ops(pipe) -> list[tuple[str, str, list[str]]]:
    """(schema name, device, devices of the regular inputs) of each operator of a defined graph.
    The device is the op's first output's (a graph's operators all have outputs)."""
    ops = []
    for op in pipe._ops:
        spec = op.spec
        name = str(spec).splitlines()[0].removeprefix("OpSpec for ").rstrip(":").strip()
        ops.append((name, spec.OutputDevice(0),
                    [spec.InputDevice(i) for i in range(spec.NumRegularInput())]))
    return ops


@needs_dali
@pytest.mark.parametrize("extra,photometric,exact_hue", [
    ((), "dali", False), ((), "dali", True), ((), "triton", True),
    (("crops.gram_teacher_crops_size=48",), "dali", False),
    (("crops.gram_teacher_crops_size=48", "crops.gram_teacher_no_distortions=true"), "triton",
     True)])
def test_gpu_graph_is_well_formed_without_a_gpu(image_dir, extra, photometric, exact_hue):
    """The GPU pipeline (mixed nvJPEG decode, device="gpu" ops) cannot be built without CUDA, so
    CI defines its graph and checks what the first GPU run would otherwise find: DALI's
    Python-side checks pass while the graph is defined (argument names and types, named
    arguments and conditional predicates on the CPU, each operator's inputs on a device it
    accepts); every operator is registered for its device (checked only by the backend, at build:
    e.g. an image decoder on "gpu" instead of "mixed"); the crops leave on the GPU and only the
    bookkeeping (meta, mask rows, kernel parameters) on the CPU; and the GPU graph is, operator
    for operator, the CPU graph that the other tests here check for values."""
    from nvidia.dali import backend

    from fastdino.data.dali import _Source, define_pipeline, output_names
    from fastdino.data.loader import ShardedInfiniteOrder, build_dataset

    cfg = _cfg(image_dir, *extra, "data.num_workers=0")
    images = build_dataset(cfg)
    source = _Source(images, ShardedInfiniteOrder(len(images), cfg.data.seed, 0, 1), cfg, 0,
                     photometric_params=photometric == "triton")
    pipe = define_pipeline(source, cfg, 0, 1, exact_hue=exact_hue, photometric=photometric)
    pipe._build_graph()  # raises on what DALI checks in Python

    registered = {"cpu": set(backend.RegisteredCPUOps()), "gpu": set(backend.RegisteredGPUOps()),
                  "mixed": set(backend.RegisteredMixedOps())}
    ops = _graph_ops(pipe)
    devices: dict[str, list[str]] = {}  # operator -> the device of each instance
    for name, device, inputs in ops:
        kind = "mixed" if name.startswith("decoders__") and inputs == ["cpu"] else device
        assert name in registered[kind], f"{name} has no {kind} implementation"
        devices.setdefault(name, []).append(kind)
    assert devices.get("decoders__Image") == ["mixed"]  # one decode, by nvJPEG
    outputs = dict(zip(output_names(cfg, photometric), [n.device for n in pipe._graph_outputs],
                       strict=True))
    host = {"meta", "mask_rows"} | ({"params"} if photometric == "triton" else set())
    assert {k for k, d in outputs.items() if d == "cpu"} == host, outputs
    # the same definition with device_id=None is the graph the CPU tests check for values: the
    # same operators in the same order, all on the CPU
    cpu_pipe = define_pipeline(source, cfg, None, 1, exact_hue=exact_hue, photometric=photometric,
                               host_jitter=False)
    cpu_pipe._build_graph()
    cpu_ops = _graph_ops(cpu_pipe)
    assert {d for _, d, _ in cpu_ops} == {"cpu"}
    assert [name for name, _, _ in cpu_ops] == [name for name, _, _ in ops]


@needs_dali
def test_source_workers_ignore_stop_signals(image_dir):
    """DALI's parallel external source workers (spawned processes) get a launcher's SIGTERM and a
    terminal's Ctrl-C too: they leave them to the training process (fastdino/stop.py), which
    stops after its step with a checkpoint; a dead worker would stall the pipeline instead."""
    import os
    import signal
    import time

    psutil = pytest.importorskip("psutil", reason="psutil (the bench extra) finds the worker "
                                 "processes; the GPU image may lack it")
    before = {p.pid for p in psutil.Process().children()}
    loader = _dali(_cfg(image_dir, batch=2), photometric="triton", source_workers=2)
    next(loader)
    workers = [p for p in psutil.Process().children()
               if p.pid not in before and "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    for w in workers:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(w.pid, sig)
    time.sleep(0.5)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    for _ in range(3):
        next(loader)


@needs_dali
def test_resolution_mix_one_pipeline_per_triple(image_dir):
    """crops.resolution_mix on DALI: each step's batch is the one a single-resolution DALI loader
    of that step's triple gives at that step (one pipeline per triple, each serving its steps),
    the sizes follow the torch loader's draw, and a resumed mix continues exactly."""
    from fastdino.data.loader import resolution_of

    mix = "crops.resolution_mix=[[32,16,null,1],[48,32,null,1]]"
    cfg = _cfg(image_dir, mix, "data.loader=dali", batch=2)
    loader = _dali(cfg, photometric="triton")
    got = [_cpu(next(loader)) for _ in range(6)]
    choices = [resolution_of(cfg.data.seed, s, loader.ratios) for s in range(6)]
    assert set(choices) == {0, 1}
    for s, (b, k) in enumerate(zip(got, choices, strict=True)):
        g, lo = ((32, 16), (48, 32))[k]
        assert (b.global_crops.shape[-1], b.local_crops.shape[-1]) == (g, lo)
        single = _cfg(image_dir, f"crops.global_crops_size={g}", f"crops.local_crops_size={lo}",
                      batch=2)
        ref = _cpu(next(_dali(single, photometric="triton", start_iteration=s)))
        for f in ("global_crops", "local_crops", "masks"):
            assert torch.equal(getattr(b, f), getattr(ref, f)), (s, f)
    resumed = _dali(cfg, photometric="triton", start_iteration=3)
    for s in range(3, 6):
        b = _cpu(next(resumed))
        assert torch.equal(b.global_crops, got[s].global_crops), s
    # gradient accumulation 2: the micro-batches of a step share its triple, as the torch loader
    gas = _cfg(image_dir, mix, "data.loader=dali", "deepspeed.gradient_accumulation_steps=2",
               batch=2)
    loader = _dali(gas, photometric="triton")
    sizes = [next(loader).global_crops.shape[-1] for _ in range(8)]
    assert all(sizes[i] == sizes[i + 1] for i in range(0, 8, 2)) and len(set(sizes)) > 1, sizes


@needs_dali
def test_homogeneous_batches_on_dali(image_dir, tmp_path):
    """data.homogeneous_root on DALI: the steps the draw gives read only the second source (the
    sampled indices lie past the main source's), the others only the main one, as the torch
    loader's order says."""
    import shutil

    from fastdino.data.dali import build_dali_loader
    from fastdino.data.loader import build_dataset, build_order

    second = tmp_path / "second"
    shutil.copytree(image_dir, second)
    cfg = _cfg(image_dir, f"data.homogeneous_root={second}", "data.homogeneous_ratio=0.5",
               batch=2)
    images = build_dataset(cfg)
    order = build_order(images, cfg, 0, 1)
    loader = build_dali_loader(cfg, photometric="triton", debug=True)
    sources = set()
    for step in range(8):
        next(loader)
        meta = loader.last_debug["meta"]  # [B, 3]: epoch, index, used
        homo = order.source(step)
        sources.add(homo)
        assert ((meta[:, 1] >= images.offset) == bool(homo)).all(), step
        assert [tuple(r) for r in meta[:, :2].tolist()] == order.step(step, 2)
    assert sources == {0, 1}
