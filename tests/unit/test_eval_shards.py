"""The kNN / linear probes on labelled WebDataset shards (fastdino/data/labelled.py): the same
images packed as `<key>.png` + `<key>.cls` give exactly the folder's results; labels, keys and
missing labels."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from fastdino.data.labelled import labelled_images, locate, wds_key
from fastdino.eval.cli import main

pytest.importorskip("sklearn", reason="the digits sample set is the eval extra")


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """3 digits x (12 train, 4 val) as class folders, and the same images as labelled shards."""
    from fastdino.data.sample_data import digits_labelled_dir
    src = digits_labelled_dir()
    root = tmp_path_factory.mktemp("digits")
    for split, n in (("train", 12), ("val", 4)):
        (root / "shards").mkdir(exist_ok=True)
        with tarfile.open(root / "shards" / f"{split}-0.tar", "w") as tar:
            for digit in ("0", "1", "7"):
                (root / "folder" / split / digit).mkdir(parents=True)
                for f in sorted((src / split / digit).iterdir())[:n]:
                    shutil.copy(f, root / "folder" / split / digit / f.name)
                    key = f"d{digit}_{f.stem}"
                    _add(tar, f"{key}.png", f.read_bytes())
                    _add(tar, f"{key}.cls", f"{digit}\n".encode())
    return root


def test_labels_and_locations(digits):
    samples, labels = labelled_images(str(digits / "shards" / "train-0.tar"))
    assert labels == ["0", "1", "7"] and len(samples) == 36
    name, label = samples[0]
    assert label == name.rsplit("/", 1)[1][1]  # d<digit>_...
    loc = locate(name)
    assert loc.shard.endswith("train-0.tar") and loc.size > 0
    folder, flabels = labelled_images(str(digits / "folder" / "val"))
    assert flabels == ["0", "1", "7"] and {lab for _, lab in folder} == {"0", "1", "7"}
    assert wds_key("a/b.c.jpg") == "a/b" and wds_key("x.png") == "x"


def test_shards_give_the_folders_results(digits, tmp_path):
    common = ["--weights", "random", "--arch", "vit_test", "--image-size", "32",
              "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["knn", *common, "--data", str(digits / "folder"),
                 "--json", str(tmp_path / "folder.json")]) == 0
    assert main(["knn", *common, "--train-data", str(digits / "shards" / "train-*.tar"),
                 "--val-data", str(digits / "shards" / "val-0.tar"),
                 "--json", str(tmp_path / "shards.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("folder.json", "shards.json"))
    assert b["classes"] == a["classes"] and (b["n_train"], b["n_val"]) == (36, 12)
    for k in (10, 20):
        assert b[f"k{k}"] == a[f"k{k}"]
    with pytest.raises(SystemExit, match="--train-data and --val-data"):
        main(["knn", *common, "--train-data", str(digits / "shards" / "train-0.tar")])


def test_a_member_without_label_is_named(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "a.png", b"x")
        _add(tar, "a.cls", b"3")
        _add(tar, "b.png", b"y")
    with pytest.raises(ValueError, match=r"s.tar/b.png: its shard has no b.cls member"):
        labelled_images(str(tmp_path / "s.tar"))


def test_training_knn_probe_reads_shards(digits):
    """train.knn_data + train.knn_val_data (the periodic probe of a training run) on the labelled
    shards give the probe's result on the same images as class folders."""
    import torch

    from fastdino.config import ConfigError, load_config
    from fastdino.eval.knn import knn_probe
    from fastdino.models.backbones import vit_test

    torch.manual_seed(0)
    backbone = vit_test()
    ks = (5, 10)
    folder = knn_probe(backbone, digits / "folder", 32, ks=ks)
    shards = knn_probe(backbone, str(digits / "shards" / "train-*.tar"), 32, ks=ks,
                       val=str(digits / "shards" / "val-0.tar"))
    assert shards == folder and set(folder) == {"knn_top1_k5", "knn_top1_k10"}
    with pytest.raises(ConfigError, match="train.knn_val_data"):
        load_config(None, ["train.knn_val_data=/some/val"])
