"""Homogeneous batches from a second source (fastdino/data/mixing.py, data.homogeneous_root): the
per-step draw, each source's own epoch order, the same steps on every rank and after a resume,
skips kept inside a source, and both loaders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdino.config import ConfigError, load_config
from fastdino.data.loader import build_dataset, build_order, build_train_loader
from fastdino.data.mixing import ConcatImages, MixedOrder, homogeneous_steps


def _folder(root, n, seed, corrupt_last=False):
    g = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        arr = g.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
    if corrupt_last:
        (root / "zz_broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    return _folder(base / "main", 7, 0, corrupt_last=True), _folder(base / "inet", 5, 1)


def _cfg(sources, *extra):
    main, homo = sources
    return load_config(None, [f"data.root={main}", f"data.homogeneous_root={homo}",
                              "data.homogeneous_ratio=0.3", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "data.batch_size_per_gpu=2", "data.num_workers=0",
                              "data.loader=torch", *extra])


def test_the_draw():
    steps = np.arange(200_000)
    draws = homogeneous_steps(7, steps, 0.1)
    assert abs(draws.mean() - 0.1) < 0.003
    assert (homogeneous_steps(7, steps, 0.1) == draws).all()  # a function of (seed, step)
    assert [bool(homogeneous_steps(7, np.array([s]), 0.1)[0]) for s in range(50)] == \
        list(draws[:50])  # vectorised == one at a time
    assert (homogeneous_steps(8, steps, 0.1) != draws).any()


def test_each_source_in_its_own_epoch_order_on_agreed_steps(sources):
    cfg = _cfg(sources)
    images = build_dataset(cfg)
    assert isinstance(images, ConcatImages) and len(images) == 8 + 5
    orders = [build_order(images, cfg, r, 2) for r in range(2)]
    assert isinstance(orders[0], MixedOrder)
    per_source = {0: [], 1: []}
    for step in range(40):
        homo = orders[0].source(step)
        assert orders[1].source(step) == homo  # both ranks agree
        for order in orders:
            for epoch, index in order.step(step, 2):
                assert (index >= images.offset) == bool(homo)  # the whole batch, one source
                per_source[homo].append((epoch, index))
    # each source read in its own epochs: every epoch a permutation of that source alone
    for homo, n in ((0, 8), (1, 5)):
        seen = per_source[homo]
        first = sorted(i for e, i in seen if e == 0)
        assert first == list(range(images.offset if homo else 0,
                                    (images.offset if homo else 0) + n))
    assert 0 < len(per_source[1]) < len(per_source[0])


def test_skips_stay_inside_a_source(sources):
    images = build_dataset(_cfg(sources))
    broken = next(i for i in range(images.offset) if images.paths[i].endswith("broken.jpg"))
    assert broken == images.offset - 1  # the last of the main source
    _, used, skipped = images.load(broken)
    assert used == 0 and skipped == (images.paths[broken],)  # wraps to main's first image
    assert list(images.candidates(images.offset + 4))[:2] == [images.offset + 4, images.offset]
    assert images.between(broken, 0) == [images.paths[broken]]


def test_torch_loader_resumes_exactly(sources):
    cfg = _cfg(sources)
    full = build_train_loader(cfg, 0, 1, 0)
    batches = [next(full) for _ in range(8)]
    resumed = build_train_loader(cfg, 0, 1, 5)
    for b in batches[5:]:
        r = next(resumed)
        assert (r.global_crops == b.global_crops).all()


def test_config_rules(sources):
    with pytest.raises(ConfigError, match="homogeneous_ratio"):
        _cfg(sources, "data.homogeneous_ratio=1.0")
