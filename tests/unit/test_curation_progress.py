"""Progress of `curate embed` and the neighbour searches when stderr is not a terminal (a batch
job's log): tqdm showed nothing there; now a log line every LOG_EVERY_S seconds."""

import io
import re
import sys

import numpy as np
import pytest
from PIL import Image

from fastdino.curation import progress
from fastdino.curation.embed import embed_folder
from fastdino.curation.neighbours import top_k_cosine
from fastdino.eval.weights import load_eval_backbone


@pytest.fixture
def not_a_tty(monkeypatch):
    """Every update logs; stderr is not a terminal (pytest -s may run on one). Set in the test's
    call phase: pytest's capture replaces sys.stderr after the fixtures ran."""

    def patch():
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    return patch


def _lines(caplog, prefix):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_embed_logs_rows_and_rate(tmp_path, caplog, not_a_tty):
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    backbone, info = load_eval_backbone("random", arch="vit_test")
    not_a_tty()
    with caplog.at_level("INFO", logger="fastdino.curation"):
        embed_folder(tmp_path, backbone, tmp_path / "E", {"weights": info.digest},
                     image_size=32, batch_size=2)
    lines = _lines(caplog, "embed: ")
    assert [int(re.match(r"embed: (\d+)/5 images", m).group(1)) for m in lines] == [2, 4, 5, 5]
    assert all(re.search(r"[\d.]+ img/s", m) for m in lines)
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    assert sys.stderr.getvalue() == ""  # no tqdm bar
    caplog.clear()
    with caplog.at_level("INFO", logger="fastdino.curation"):  # --quiet: nothing
        embed_folder(tmp_path, backbone, tmp_path / "E2", {"weights": info.digest},
                     image_size=32, batch_size=2, progress=False)
    assert _lines(caplog, "embed: ") == []


def test_neighbour_search_logs_rows(caplog, not_a_tty):
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    not_a_tty()
    with caplog.at_level("INFO", logger="fastdino.curation"):
        top_k_cosine(x, x, 2, chunk=4, progress=True)
    lines = _lines(caplog, "neighbours: ")
    assert [m.split(" ")[1] for m in lines] == ["4/10", "8/10", "10/10", "10/10"]
    assert all("rows/s" in m for m in lines)
