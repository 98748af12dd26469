"""One image that cannot be decoded (a corrupt scan, a truncated download) in a
labelled folder is left out of eval knn / linear and of the in-training kNN probe, named in a
warning: it ended `fastdino eval` with a traceback and disabled the probe for a whole run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.cli import main
from fastdino.eval.features import drop_unreadable
from fastdino.eval.knn import extract_features
from fastdino.models import vit_test


def _labelled(root, bad_in=("train",)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for k in range(3):
                arr = np.clip(rng.normal(60 + 120 * c, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{k}.png")
        if split in bad_in:
            (root / split / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return root


@pytest.mark.parametrize("cmd", [["knn", "--k", "1"], ["linear", "--iterations", "5",
                                                        "--augment"]])
def test_eval_leaves_an_undecodable_image_out_naming_it(tmp_path, caplog, cmd):
    data = _labelled(tmp_path / "data")
    out = tmp_path / "r.json"
    with caplog.at_level("WARNING"):
        rc = main([*cmd, "--weights", "random", "--arch", "vit_test", "--data", str(data),
                   "--image-size", "32", "--num-workers", "0", "--cache-dir", "none",
                   "--quiet", "--json", str(out)])
    assert rc == 0
    assert "1 image(s) could not be decoded" in caplog.text and "broken.png" in caplog.text
    res = json.loads(out.read_text())
    if cmd[0] == "knn":
        assert (res["n_train"], res["n_val"]) == (6, 6)


def test_only_undecodable_images_is_one_error_naming_the_split():
    feats = {"cls": torch.ones(2, 4), "ok": torch.tensor([False, False])}
    with pytest.raises(ValueError, match="the val images: none of its 2 images"):
        drop_unreadable(feats, torch.tensor([0, 1]), "the val images")
    kept, y = drop_unreadable({"cls": torch.arange(3.0)[:, None], "ok": torch.tensor(
        [True, False, True])}, torch.tensor([5, 6, 7]), "x")
    assert kept["cls"].flatten().tolist() == [0.0, 2.0] and y.tolist() == [5, 7]
    assert "ok" not in kept


def test_the_training_probe_leaves_an_undecodable_image_out(tmp_path, caplog):
    data = _labelled(tmp_path / "data")
    samples = [(str(p), int(p.parent.name == "b")) for p in
               sorted((data / "train").rglob("*.png"))]
    with caplog.at_level("WARNING"):
        feats, labels = extract_features(vit_test(), samples, 32)
    assert len(samples) == 7 and feats.shape[0] == labels.shape[0] == 6
    assert "broken.png" in caplog.text
