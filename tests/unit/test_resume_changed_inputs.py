"""A resume whose inputs changed under it says so: the data listing now holds another number of
images (files added, or a newly listed image type such as .tif), and a run started before
model.pos_embed_rope_dtype existed (fp32 RoPE then) continuing with the bf16 default."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image
from test_trainer_step import SMALL, SMOKE

from fastdino.config import load_config


def _images(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(start)
    for i in range(start, start + n):
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _train(tmp_path, data, iters, *extra):
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*SMALL, f"data.root={data}", f"train.output_dir={tmp_path / 'run'}",
                              f"train.max_iterations={iters}", "train.checkpoint_every=1",
                              *extra])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_resume_over_another_listing_warns(tmp_path, caplog):
    data = _images(tmp_path / "imgs", 6)
    _train(tmp_path, data, 1)
    _images(data, 2, start=6)
    with caplog.at_level("WARNING", logger="fastdino"):
        _train(tmp_path, data, 2)
    said = [r.getMessage() for r in caplog.records if "data position counts" in r.getMessage()]
    assert len(said) == 1 and "counts 6 images, the data now lists 8" in said[0], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdino"):  # the same listing: quiet
        _train(tmp_path, data, 3)
    assert not any("data position counts" in r.getMessage() for r in caplog.records)


def test_a_run_from_before_the_rope_dtype_key_is_told_it_changes(tmp_path, caplog):
    data = _images(tmp_path / "imgs", 4)
    _train(tmp_path, data, 1)
    saved = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    assert old["model"].pop("pos_embed_rope_dtype") == "bf16"  # (the training default)
    saved.write_text(yaml.safe_dump(old))  # as written before the key existed
    with caplog.at_level("WARNING", logger="fastdino"):
        _train(tmp_path, data, 2)
    said = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
    assert len(said) == 1 and "model.pos_embed_rope_dtype=fp32" in said[0], said
    saved.write_text(yaml.safe_dump(old))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdino"):  # fp32 asked for: nothing to say
        _train(tmp_path, data, 3, "model.pos_embed_rope_dtype=fp32")
    assert not any("predates" in r.getMessage() for r in caplog.records)
