"""The standard dense benchmarks as downloaded (ADE20K, VOC 2012, Cityscapes, NYU-v2), list files,
and the protocol each layout brings, down to the CLI's results."""

import json

import numpy as np
import pytest
from PIL import Image

from fastdino.eval.cli import main
from fastdino.eval.dense_layouts import depth_data, read_list, seg_data
from fastdino.eval.seg import IGNORE, load_mask

COLOURS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220]], dtype=np.uint8)


def _blocks(rng, h, w):
    """[h, w] class ids 0..2 in 16-px blocks, and an RGB image whose colour is the class."""
    cls = np.kron(rng.integers(0, 3, size=(h // 16, w // 16)), np.ones((16, 16), dtype=np.int64))
    img = COLOURS[cls] + rng.integers(0, 20, size=(h, w, 3)).astype(np.uint8)
    return cls, img


def _ade20k(root, n_train=6, n_val=2, size=64, seed=0):
    """ADEChallengeData2016 as downloaded: ids 1..3 for the three colours, 0 ("other") on one
    16-px block of each mask."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            cls, img = _blocks(rng, size, size)
            ids = (cls + 1).astype(np.uint8)
            ids[:16, :16] = 0
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{stem}.jpg")
            Image.fromarray(ids, mode="L").save(base / "annotations" / split / f"{stem}.png")
    return base


def test_reduce_zero_label_ignores_zero_and_shifts_the_rest(tmp_path):
    ids = np.array([[0, 1, 2], [IGNORE, 3, 150]], dtype=np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "m.png")
    assert load_mask(str(tmp_path / "m.png")).tolist() == ids.tolist()
    assert load_mask(str(tmp_path / "m.png"), reduce_zero_label=True).tolist() == [
        [IGNORE, 0, 1], [IGNORE, 2, 149]]


def test_ade20k_is_found_in_its_folder_or_above_it(tmp_path):
    base = _ade20k(tmp_path, n_train=3, n_val=2)
    for root in (tmp_path, base):
        data = seg_data(root)
        assert data.layout == "ade20k" and data.n_classes == 150 and data.reduce_zero_label
        assert [p.split("/")[-1] for p, _ in data.val] == ["ADE_valid_00000000.jpg",
                                                           "ADE_valid_00000001.jpg"]
        assert all(m.endswith(p.split("/")[-1].replace(".jpg", ".png")) and
                   "/annotations/training/" in m for p, m in data.train)
    (base / "annotations" / "validation" / "ADE_valid_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_valid_00000001.jpg"):
        seg_data(tmp_path)


def test_voc_takes_the_image_sets_in_their_order(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True)
    for stem in ("2007_000033", "2007_000042", "2008_000001"):
        Image.new("RGB", (20, 16)).save(base / "JPEGImages" / f"{stem}.jpg")
        Image.new("P", (20, 16)).save(base / "SegmentationClass" / f"{stem}.png")
    (base / "ImageSets/Segmentation/train.txt").write_text("2008_000001\n2007_000033\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000042\n")
    data = seg_data(tmp_path)
    assert data.layout == "voc2012" and data.n_classes == 21 and not data.reduce_zero_label
    assert data.train == [(str(base / "JPEGImages" / f"{s}.jpg"),
                           str(base / "SegmentationClass" / f"{s}.png"))
                          for s in ("2008_000001", "2007_000033")]
    (base / "ImageSets/Segmentation/val.txt").write_text("2007_000042\n2009_999999\n")
    with pytest.raises(FileNotFoundError, match="val.txt.*2009_999999.jpg"):
        seg_data(tmp_path)


def test_cityscapes_pairs_train_ids_and_names_the_script_that_makes_them(tmp_path):
    for split, city in (("train", "aachen"), ("val", "lindau")):
        (tmp_path / "leftImg8bit" / split / city).mkdir(parents=True)
        (tmp_path / "gtFine" / split / city).mkdir(parents=True)
        base = f"{city}_000000_000019"
        Image.new("RGB", (32, 16)).save(tmp_path / "leftImg8bit" / split / city /
                                        f"{base}_leftImg8bit.png")
        Image.new("L", (32, 16)).save(tmp_path / "gtFine" / split / city /
                                      f"{base}_gtFine_labelTrainIds.png")
        Image.new("L", (32, 16)).save(tmp_path / "gtFine" / split / city /
                                      f"{base}_gtFine_labelIds.png")
    data = seg_data(tmp_path)
    assert data.layout == "cityscapes" and data.n_classes == 19
    assert data.val[0][1].endswith("gtFine/val/lindau/lindau_000000_000019_gtFine_"
                                   "labelTrainIds.png")
    (tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="csCreateTrainIdLabelImgs"):
        seg_data(tmp_path)


def test_list_files(tmp_path, caplog):
    (tmp_path / "scene").mkdir()
    for name in ("a.jpg", "a.png", "b.jpg", "b.png"):
        (tmp_path / "scene" / name).write_bytes(b"")
    outside = tmp_path.parent / f"{tmp_path.name}_abs.jpg"
    outside.write_bytes(b"")
    lst = tmp_path / "train.txt"
    lst.write_text("# image depth focal\n/scene/a.jpg /scene/a.png 518.8579\n\n"
                   "scene/b.jpg None 518.8579\n"
                   f"{outside} scene/b.png\n")
    with caplog.at_level("INFO", logger="fastdino.eval"):
        pairs = read_list(lst, tmp_path)
    assert pairs == [(str(tmp_path / "scene/a.jpg"), str(tmp_path / "scene/a.png")),
                     (str(outside), str(tmp_path / "scene/b.png"))]
    assert "1 line(s) without a target" in caplog.text
    lst.write_text("scene/a.jpg scene/a.png\nscene/b.jpg\n")
    with pytest.raises(ValueError, match="train.txt:2: 'scene/b.jpg' has one column"):
        read_list(lst, tmp_path)
    lst.write_text("scene/a.jpg scene/c.png\n")
    with pytest.raises(FileNotFoundError, match="1 listed file.*scene/c.png"):
        read_list(lst, tmp_path)
    with pytest.raises(ValueError, match="both --train-list and --val-list"):
        seg_data(tmp_path, train_list=str(lst))
    lst.write_text("scene/a.jpg scene/a.png\n")
    data = depth_data(tmp_path, train_list=str(lst), val_list=str(lst))
    assert data.layout == "lists" and data.depth_scale is None and data.eigen_crop is None


def test_plain_folders_remain_the_fallback(tmp_path):
    from test_eval_seg import _synthetic_seg

    _synthetic_seg(tmp_path, n=4)
    data = seg_data(tmp_path)
    assert data.layout == "folders" and (len(data.train), len(data.val)) == (3, 1)
    assert data.n_classes is None and data.reduce_zero_label is None
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        seg_data(tmp_path / "nowhere")


def test_seg_command_on_ade20k_applies_its_protocol(tmp_path):
    """The layout brings 150 classes and the ignored id 0; the probe learns the shifted ids (a
    wrong shift would put every colour in the wrong class: mIoU near 0)."""
    _ade20k(tmp_path)
    args = ["seg", "--weights", "random", "--arch", "vit_test", "--data", str(tmp_path),
            "--crop", "64", "--iterations", "10", "--batch-size", "6", "--lr", "1e-2",
            "--num-workers", "0", "--quiet"]
    assert main([*args, "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["layout"] == "ade20k" and res["n_classes"] == 150 and res["reduce_zero_label"]
    present = [i for i, v in enumerate(res["iou"]) if v is not None]
    assert present == [0, 1, 2] and res["miou"] > 0.6, res
    # the user's flag wins over the layout: id 0 becomes a class (never predicted: IoU 0)
    assert main([*args, "--no-reduce-zero-label", "--json", str(tmp_path / "n.json")]) == 0
    res = json.loads((tmp_path / "n.json").read_text())
    assert not res["reduce_zero_label"] and res["iou"][0] == 0.0


def test_depth_command_on_nyu_takes_the_official_lists_scale_and_eigen_crop(tmp_path):
    """nyu_train.txt / nyu_test.txt as the official DINOv3 docs download them, 480 x 640 maps in
    mm: the Eigen crop is on unless --no-eigen-crop."""
    rng = np.random.default_rng(0)
    lines = {"nyu_train.txt": [], "nyu_test.txt": []}
    for i in range(4):
        scene = f"kitchen_{i:04d}a"
        (tmp_path / scene).mkdir()
        cls, img = _blocks(rng, 480, 640)
        Image.fromarray(img).save(tmp_path / scene / "rgb_00001.jpg")
        Image.fromarray(np.array([1000, 3000, 6000], dtype=np.uint16)[cls]).save(
            tmp_path / scene / "sync_depth_00001.png")
        split = "nyu_test.txt" if i == 3 else "nyu_train.txt"
        lines[split].append(f"/{scene}/rgb_00001.jpg /{scene}/sync_depth_00001.png 518.8579")
    for name, content in lines.items():
        (tmp_path / name).write_text("\n".join(content) + "\n")
    data = depth_data(tmp_path)
    assert data.layout == "nyu" and (len(data.train), len(data.val)) == (3, 1)
    assert data.depth_scale == 1000.0 and data.eigen_crop
    args = ["depth", "--weights", "random", "--arch", "vit_test", "--data", str(tmp_path),
            "--crop", "96", "128", "--iterations", "3", "--batch-size", "3", "--num-workers",
            "0", "--no-flip-tta", "--quiet"]
    results = []
    for extra in ([], ["--no-eigen-crop"]):
        assert main([*args, *extra, "--json", str(tmp_path / "r.json")]) == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["layout"] == "nyu" and results[0]["eigen_crop"]
    assert not results[1]["eigen_crop"]
    # the same predictions scored over fewer pixels: the metrics differ (the crop is applied)
    assert results[0]["rmse"] != results[1]["rmse"]
