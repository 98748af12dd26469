"""QA (USERS.md §1, the medical user): PCA maps (`fastdino eval pca`, train.pca_images) of a
patient folder of 12-bit X-rays holding a corrupt scan, and of a patient folder whose images are
in study subfolders. A corrupt file was a traceback for `eval pca` and, in training, failed the
maps of every checkpoint; a folder of subfolders said only "no input images"."""

import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from fastdino.eval import pca
from fastdino.eval.pca import expand_inputs, write_pca_images
from fastdino.eval.weights import load_eval_backbone

XRAY = (np.arange(48 * 64).reshape(48, 64) % 4096).astype(np.uint16)  # 12-bit


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    monkeypatch.setattr(pca, "_skipped_said", set(), raising=False)


def _patient(root):
    study = root / "study_0"
    study.mkdir(parents=True)
    Image.fromarray(XRAY).save(study / "a.png")
    tifffile.imwrite(study / "b.tif", XRAY[::-1])
    (study / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return study


def test_a_corrupt_scan_is_left_out_with_one_warning_and_the_others_mapped(tmp_path, caplog):
    study = _patient(tmp_path / "patient_000")
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    with caplog.at_level(logging.WARNING, logger="fastdino.eval"):
        for out in ("out1", "out2"):  # two checkpoints of train.pca_images
            files = write_pca_images(backbone, [study], tmp_path / out, resolution=32,
                                     white_level=4095)
    assert sorted(p.name for p in files) == ["a_pca.png", "a_side.png", "b_pca.png",
                                             "b_side.png", "grid.png"]
    said = [r.getMessage() for r in caplog.records if "skipped unreadable" in r.getMessage()]
    assert len(said) == 1 and "c_corrupt.png" in said[0]  # once per process, not per checkpoint
    with pytest.raises(ValueError, match="none of the 1 input images.*c_corrupt.png"):
        write_pca_images(backbone, [study / "c_corrupt.png"], tmp_path / "out3", resolution=32)


def test_a_folder_of_subfolders_is_named_with_an_image_it_holds(tmp_path, caplog):
    _patient(tmp_path / "patient_000")
    with pytest.raises(FileNotFoundError, match=r"not searched recursively.*patient_000 "
                                                r"\(e\.g\. .*study_0.a\.png\).*subfolders"):
        expand_inputs([tmp_path / "patient_000"])
    Image.fromarray(XRAY).save(tmp_path / "loose.png")
    with caplog.at_level(logging.WARNING, logger="fastdino.eval"):
        assert expand_inputs([tmp_path / "patient_000", tmp_path / "loose.png"]) == [
            tmp_path / "loose.png"]
    assert "patient_000" in caplog.text and "not searched" in caplog.text
