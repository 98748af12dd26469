"""data.white_level: 10/12/14-bit data in 16-bit files (scientific cameras, CT / X-ray,
microscopy) maps 0..white_level to 0..255 instead of 0..65535 (where a 12-bit image is 8-bit
levels 0..16, nearly black), in every path that decodes images: the torch and DALI loaders
(from the config, as the trainer builds them), the kNN probe, eval's --white-level (or the
run's data.white_level) and curate embed. Without it, a 16-bit image that uses at most 14 bits
is said once per process."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from dali_helpers import cpu_decode, needs_dali
from PIL import Image

from fastdino.config import ConfigError, load_config, save_config
from fastdino.data import datasets
from fastdino.data.datasets import ImageFolderUnlabeled, decode_rgb
from fastdino.data.loader import build_dataset, build_train_loader

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
TWELVE_BIT = np.array([[0, 2048, 4095, 5000]], dtype=np.uint16)  # 5000: above 12 bits' white
# (v * 255 / white + 0.5) truncated: _to_8bit's rounding
AT_4095 = [0, 128, 255, 255]  # 2048 -> 127.5 + 0.5; 5000 clips to white
AT_65535 = [0, 8, 16, 19]  # the default: 2048 -> 7.97, 4095 -> 15.9, 5000 -> 19.5


def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _grey(img: Image.Image) -> list[int]:
    return np.asarray(img)[0, :, 0].tolist()


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    """Each test starts as a new process: the depth warning not said yet."""
    monkeypatch.setattr(datasets, "_shallow_warned", False, raising=False)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_12bit_image_in_a_16bit_file_decodes_to_full_range(fmt):
    data = _encoded(TWELVE_BIT, fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert _grey(decode_rgb(data, 4095)) == AT_4095
    assert _grey(decode_rgb(data)) == _grey(decode_rgb(data, None)) == AT_65535  # unchanged
    assert _grey(decode_rgb(data, 65535)) == AT_65535


def test_32bit_integer_data_takes_the_white_level_signed_and_float_keep_their_range():
    """"I" data (a 32-bit integer TIFF) without negative values maps 0..white_level whatever its
    maximum (the data-driven 0..255 / 0..65535 choice is what the white level replaces);
    signed data keeps min..max and float data its own range."""
    as_i = _encoded(TWELVE_BIT.astype(np.int32), "TIFF")
    assert Image.open(io.BytesIO(as_i)).mode == "I"
    assert _grey(decode_rgb(as_i, 4095)) == AT_4095
    assert _grey(decode_rgb(as_i)) == AT_65535
    dark = _encoded(np.array([[0, 100, 200]], np.int32), "TIFF")  # fits 0..255
    assert _grey(decode_rgb(dark)) == [0, 100, 200]
    assert _grey(decode_rgb(dark, 1000)) == [0, 26, 51]  # 100 / 1000 * 255 = 25.5
    signed = _encoded(np.array([[-1000, 0, 1000]], np.int32), "TIFF")
    assert _grey(decode_rgb(signed, 4095)) == _grey(decode_rgb(signed)) == [0, 128, 255]
    floats = _encoded(np.array([[0, 0.5, 1.0]], np.float32), "TIFF")
    assert _grey(decode_rgb(floats, 4095)) == _grey(decode_rgb(floats)) == [0, 128, 255]


@pytest.mark.parametrize("value", ["255", "0", "65536", "-1"])
def test_config_refuses_a_white_level_outside_256_to_65535(value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.white_level={value}"])
    msg = str(e.value)
    assert "data.white_level" in msg and "256..65535" in msg and "\n" not in msg


def test_config_takes_a_white_level():
    assert load_config(None, []).data.white_level is None
    assert load_config(None, ["data.white_level=4095"]).data.white_level == 4095
    with pytest.raises(ConfigError, match="data.white_level.*wrong type"):
        load_config(None, ["data.white_level=4095.5"])


def test_a_shallow_16bit_image_is_said_once_per_process(tmp_path, caplog):
    for k in range(3):
        Image.fromarray(TWELVE_BIT).save(tmp_path / f"{k}.png")
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "full.png")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        decode_rgb(str(tmp_path / "full.png"))  # uses all 16 bits: nothing to say
        assert caplog.records == []
        ds = ImageFolderUnlabeled(root=tmp_path)
        for i in range(len(ds)):
            ds.load(i)
    (record,) = caplog.records  # one line for three such images
    msg = record.getMessage()
    assert str(tmp_path / "0.png") in msg and "maximum 5000" in msg
    assert "data.white_level=16383" in msg  # 5000 needs 13 bits: the 14-bit white
    assert "--white-level 16383" in msg


@pytest.mark.parametrize("top,suggested", [(1000, 1023), (4095, 4095), (16383, 16383)])
def test_the_warning_names_the_white_level_of_the_bits_used(top, suggested, caplog):
    data = _encoded(np.array([[0, top]], np.uint16), "PNG")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        decode_rgb(data, name="scan_001.png")
    (record,) = caplog.records
    assert "scan_001.png" in record.getMessage()
    assert f"data.white_level={suggested}" in record.getMessage()


def test_no_warning_with_a_white_level_or_above_14_bits(caplog):
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        decode_rgb(_encoded(TWELVE_BIT, "PNG"), 4095)
        decode_rgb(_encoded(np.array([[0, 16384]], np.uint16), "PNG"))
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):  # and "I" data alike
        decode_rgb(_encoded(TWELVE_BIT.astype(np.int32), "TIFF"))
    assert "data.white_level=16383" in caplog.text


def _cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", "data.batch_size_per_gpu=2",
                              "data.num_workers=1", "data.loader=torch", *extra])


def _flat_12bit_folder(path, n=2):
    """n flat images at 4095, the white of 12-bit data (a grey: jitter keeps it grey)."""
    path.mkdir()
    for k in range(n):
        Image.fromarray(np.full((40, 48), 4095, np.uint16)).save(path / f"{k}.png")
    return path


def _max_level(batch) -> float:
    """The brightest pixel of a batch's crops, back in 8-bit levels (undo the normalisation)."""
    mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    crops = [batch.global_crops.float().cpu(), batch.local_crops.float().cpu()]
    return max(float(((c * std + mean) * 255).amax()) for c in crops)


def test_the_config_white_level_reaches_the_training_datasets(tmp_path, caplog):
    """As the trainer builds them (build_dataset / build_train_loader from the config), both
    sources of data.homogeneous_root included, and in the loader's worker process. Without it
    the training process says the warning (before the workers fork: they inherit that it was
    said, instead of each saying it)."""
    main = _flat_12bit_folder(tmp_path / "main")
    homo = _flat_12bit_folder(tmp_path / "homo")
    cfg = _cfg(main, "data.white_level=4095", f"data.homogeneous_root={homo}")
    images = build_dataset(cfg)
    assert images.white_level == 4095 and [p.white_level for p in images.parts] == [4095] * 2
    for i in range(len(images)):  # main, then the homogeneous source
        assert np.asarray(images.load(i)[0]).min() == 255
    bright = next(build_train_loader(_cfg(main, "data.white_level=4095")))
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        dark = next(build_train_loader(_cfg(main)))
    assert "data.white_level=4095" in caplog.text and str(main / "0.png") in caplog.text
    # a flat white image stays >= 0.6 x 255 under the brightness jitter (or solarizes to 0);
    # read as 16-bit it is level 16, x 1.4 at most
    assert _max_level(bright) > 150 and _max_level(dark) < 30


@needs_dali
def test_dali_decodes_16bit_pngs_on_the_host_with_a_white_level():
    """DALI's own decoder reads a 16-bit PNG as 0..65535, round(v * 255 / 65535): the torch
    loader's default pixels; with a white level the probe decodes it on the host, and DALI's
    CPU decoder gives the torch loader's pixels again."""
    from fastdino.data import dali_plan as P

    data = _encoded(np.tile(TWELVE_BIT, (3, 1)), "PNG")
    encoded, _, _ = P.probe_image(data)
    assert bytes(encoded) == data  # no white level: DALI decodes the PNG itself
    assert np.array_equal(cpu_decode(encoded), np.asarray(decode_rgb(data)))
    encoded, width, height = P.probe_image(data, 4095)
    assert bytes(encoded[:2]) == b"P6"  # decoded on the host, handed over as PPM
    out = cpu_decode(encoded)
    assert out.shape == (height, width, 3)
    assert np.array_equal(out, np.asarray(decode_rgb(data, 4095)))
    assert out[0, :, 0].tolist() == AT_4095


@needs_dali
def test_the_config_white_level_reaches_the_dali_loader(tmp_path, caplog):
    from fastdino.data.dali import build_dali_loader

    root = _flat_12bit_folder(tmp_path / "imgs")

    def first_batch(*extra):
        return next(build_dali_loader(_cfg(root, "data.loader=dali", *extra), exact_hue=False,
                                      photometric="dali", source_workers=0))

    assert _max_level(first_batch("data.white_level=4095")) > 150
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert _max_level(first_batch()) < 30
    # DALI decodes those PNGs itself: the loader looks at the first image to say it
    assert "data.white_level=4095" in caplog.text


def _spy_white_levels(monkeypatch) -> list:
    """The white_level of every _to_8bit call (what decode_rgb passed on)."""
    seen, real = [], datasets._to_8bit

    def spy(img, white_level=None, name=None):
        seen.append(white_level)
        return real(img, white_level, name)

    monkeypatch.setattr(datasets, "_to_8bit", spy)
    return seen


def test_eval_white_level_flag_parses_and_refuses_out_of_range(capsys):
    from fastdino.eval.cli import build_parser

    for cmd in (["knn", "--data", "x"], ["linear", "--data", "x"], ["seg", "--data", "x"],
                ["depth", "--data", "x"], ["pca", "img.png", "--out", "o"]):
        args = build_parser().parse_args([*cmd, "--weights", "random", "--white-level", "4095"])
        assert args.white_level == 4095, cmd
        assert build_parser().parse_args([*cmd, "--weights", "random"]).white_level is None
    for bad in ("255", "65536", "4k"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["knn", "--weights", "random", "--white-level", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--white-level" in err and "256..65535" in err


def test_eval_pca_decodes_with_the_flag_or_the_runs_white_level(tmp_path, monkeypatch):
    """--white-level reaches the decode; without it, weights from a training run take the run's
    data.white_level (its config.yaml); the flag wins."""
    from fastdino.eval.cli import main
    from fastdino.models.backbones import vit_test

    img = tmp_path / "scan.png"
    Image.fromarray(np.full((32, 32), 4095, np.uint16)).save(img)
    seen = _spy_white_levels(monkeypatch)
    common = [str(img), "--resolution", "32", "--quiet"]
    assert main(["pca", "--weights", "random", "--arch", "vit_test", *common,
                 "--out", str(tmp_path / "a"), "--white-level", "4095"]) == 0
    assert seen == [4095]
    side = np.asarray(Image.open(tmp_path / "a" / "scan_side.png").convert("L"))
    assert side[:, :32].min() == 255  # the image half: white, not level 16
    run = tmp_path / "run"
    snap = run / "eval" / "training_10" / "teacher_checkpoint.pth"
    snap.parent.mkdir(parents=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit_test().state_dict().items()}},
               snap)
    save_config(load_config(None, ["model.arch=vit_test", "data.white_level=1023"]),
                run / "config.yaml")
    seen.clear()
    assert main(["pca", "--weights", str(snap), *common, "--out", str(tmp_path / "b")]) == 0
    assert seen == [1023]
    seen.clear()
    assert main(["pca", "--weights", str(snap), *common, "--out", str(tmp_path / "c"),
                 "--white-level", "4095"]) == 0
    assert seen == [4095]


def test_eval_takes_the_white_level_of_a_config_file_given_with_an_export(tmp_path,
                                                                          monkeypatch):
    """An exported backbone holds no config: `--config <run>/config.yaml` (how its architecture
    is given) also gives the run's data.white_level; a preset name or the flag as before."""
    from fastdino.eval.cli import main
    from fastdino.models.backbones import vit_test

    img = tmp_path / "scan.png"
    Image.fromarray(np.full((32, 32), 4095, np.uint16)).save(img)
    torch.save(vit_test().state_dict(), tmp_path / "export.pth")
    save_config(load_config(None, ["model.arch=vit_test", "data.white_level=1023"]),
                tmp_path / "config.yaml")
    seen = _spy_white_levels(monkeypatch)
    common = ["pca", "--weights", str(tmp_path / "export.pth"), str(img), "--resolution", "32",
              "--quiet"]
    assert main([*common, "--config", str(tmp_path / "config.yaml"), "--out",
                 str(tmp_path / "a")]) == 0
    assert seen == [1023]
    seen.clear()
    assert main([*common, "--config", str(tmp_path / "config.yaml"), "--white-level", "4095",
                 "--out", str(tmp_path / "b")]) == 0
    assert seen == [4095]


def test_eval_knn_decodes_with_the_flag_and_keys_its_cache(tmp_path, monkeypatch):
    from fastdino.eval.cli import main

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for k in range(2):
                arr = np.full((32, 32), 1000 * (k + 1) + (cls == "b") * 2000, np.uint16)
                Image.fromarray(arr).save(tmp_path / "data" / split / cls / f"{k}.png")
    seen = _spy_white_levels(monkeypatch)
    common = ["knn", "--weights", "random", "--arch", "vit_test", "--data",
              str(tmp_path / "data"), "--image-size", "32", "--num-workers", "0", "--k", "1",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main([*common, "--json", str(tmp_path / "r.json")]) == 0
    assert set(seen) == {None}
    seen.clear()
    assert main([*common, "--white-level", "4095", "--json", str(tmp_path / "r.json")]) == 0
    assert seen and set(seen) == {4095}  # decoded again: not the cached default features
    assert json.loads((tmp_path / "r.json").read_text())["white_level"] == 4095


def test_eval_feature_cache_with_a_white_level_is_redone_when_its_decoding_changes(
        tmp_path, monkeypatch):
    """A cache made with a white level names the white-level decoding's version: features of
    pixels decoded otherwise (16-bit RGB TIFFs before WHITE_LEVEL_DECODE 2) are computed again,
    not reused; the same version is a cache hit."""
    from fastdino.eval.cli import main

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            arr = np.full((32, 32), 1000 + (cls == "b") * 2000, np.uint16)
            Image.fromarray(arr).save(tmp_path / "data" / split / cls / "0.png")
    seen = _spy_white_levels(monkeypatch)
    args = ["knn", "--weights", "random", "--arch", "vit_test", "--data", str(tmp_path / "data"),
            "--image-size", "32", "--num-workers", "0", "--k", "1", "--white-level", "4095",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0 and seen
    seen.clear()
    assert main(args) == 0 and seen == []  # the same decoding: read from the cache
    monkeypatch.setattr(datasets, "WHITE_LEVEL_DECODE", datasets.WHITE_LEVEL_DECODE + 1)
    assert main(args) == 0 and seen and set(seen) == {4095}


def test_knn_probe_decodes_with_the_runs_white_level(tmp_path, monkeypatch):
    """The in-training kNN probe's decode takes the white level it is given (train.py passes
    data.white_level)."""
    from fastdino.eval.knn import knn_probe
    from fastdino.models.backbones import vit_test

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for k in range(4):
            Image.fromarray(np.full((32, 32), 500 * k, np.uint16)).save(tmp_path / cls / f"{k}.png")
    seen = _spy_white_levels(monkeypatch)
    res = knn_probe(vit_test(), tmp_path, 32, ks=(1,), white_level=4095)
    assert "knn_top1_k1" in res and seen and set(seen) == {4095}


def test_curate_embed_decodes_with_the_flag_and_keys_the_folder(tmp_path, monkeypatch):
    from fastdino.curation.cli import main

    (tmp_path / "imgs").mkdir()
    for k in range(2):
        Image.fromarray(np.full((32, 32), 4095, np.uint16)).save(tmp_path / "imgs" / f"{k}.png")
    seen = _spy_white_levels(monkeypatch)
    assert main(["embed", "--data", str(tmp_path / "imgs"), "--weights", "random", "--arch",
                 "vit_test", "--out", str(tmp_path / "E"), "--image-size", "32",
                 "--num-workers", "0", "--quiet", "--white-level", "4095"]) == 0
    assert seen == [4095, 4095]
    assert json.loads((tmp_path / "E" / "progress.json").read_text())["key"]["white_level"] == 4095


def test_eval_seg_and_depth_decode_their_images_with_the_flag(tmp_path, monkeypatch):
    """The dense probes' training crops and validation images (the masks and depth maps are
    read as values, not as images to scale)."""
    from fastdino.eval.cli import main

    for task, target in (("seg", "masks"), ("depth", "depth")):
        (tmp_path / task / "images").mkdir(parents=True)
        (tmp_path / task / target).mkdir()
        for i in range(4):
            img = np.full((64, 64), 1000 * (i + 1), np.uint16)
            Image.fromarray(img).save(tmp_path / task / "images" / f"s{i}.png")
            values = (np.arange(64 * 64).reshape(64, 64) % 2).astype(np.uint8)  # classes 0, 1
            Image.fromarray(values if task == "seg" else (values + 1).astype(np.uint16) * 1000
                            ).save(tmp_path / task / target / f"s{i}.png")
    seen = _spy_white_levels(monkeypatch)
    common = ["--weights", "random", "--arch", "vit_test", "--iterations", "1",
              "--batch-size", "1", "--num-workers", "0", "--quiet", "--white-level", "4095"]
    assert main(["seg", "--data", str(tmp_path / "seg"), "--crop", "64", *common]) == 0
    assert len(seen) >= 2 and set(seen) == {4095}  # a training crop and the validation images
    seen.clear()
    assert main(["depth", "--data", str(tmp_path / "depth"), "--crop", "48", "64", *common]) == 0
    assert len(seen) >= 2 and set(seen) == {4095}


def test_trainer_probe_and_pca_maps_use_data_white_level(tmp_path, monkeypatch):
    """A run with data.white_level: its in-training kNN probe (train.knn_every) and the PCA maps
    written with each checkpoint (train.pca_images) decode their 16-bit images as its training
    images are, not from 0..65535."""
    from fastdino.train import Trainer

    probe = tmp_path / "probe"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (probe / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((32, 32), 1000 * k + 500, np.uint16)).save(
                    probe / split / cls / f"{k}.png")
    pca_image = probe / "val" / "a" / "0.png"
    cfg = load_config(SMOKE, ["dino.head.n_prototypes=128", "ibot.head.n_prototypes=128",
                              "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}",
                              "train.resume=none", "train.max_iterations=1", "train.log_every=1",
                              "train.knn_every=1", f"train.knn_data={probe}",
                              f"train.pca_images=[{pca_image}]", "train.pca_resolution=32",
                              "data.white_level=4095"])
    trainer = Trainer(cfg)
    seen = _spy_white_levels(monkeypatch)
    history = trainer.train()
    assert "knn_top1_k10" in history[-1]
    assert len(seen) >= 13 and set(seen) == {4095}  # 12 probe images + the PCA image
    assert any((tmp_path / "run").rglob("*.png"))  # the PCA maps were written


def test_eval_with_loader_workers_says_the_shallow_data_warning_once(tmp_path):
    """Each DataLoader worker said it (4 lines for knn's two extractions on 2 workers): the main
    process now says it before the workers start, and they inherit that it was said."""
    import subprocess
    import sys

    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(4):
                Image.fromarray(np.full((32, 32), 250 + 500 * k + 1000 * c, np.uint16)).save(
                    tmp_path / split / cls / f"{k}.png")
    run = subprocess.run(
        [sys.executable, "-m", "fastdino", "eval", "knn", "--weights", "random", "--arch",
         "vit_test", "--data", str(tmp_path), "--image-size", "32", "--num-workers", "2",
         "--k", "1", "--quiet", "--cache-dir", "none"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (run.stdout + run.stderr).count("set data.white_level=") == 1
