"""data.homogeneous_root with gradient accumulation: the source is drawn per optimizer step
(micro-batch // gas), so all gas micro-batches of a step read one source (the whole global batch
of a step, as README says), on the torch loader and the DALI CPU pipeline; each source's stream
still advances one micro-batch at a time without gaps or repeats, and a resume at a step boundary
sees the same images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastdino.config import load_config
from fastdino.data.loader import build_dataset, build_order, build_train_loader

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """main: noise images; homogeneous: one flat colour each. Every augmentation keeps a flat
    image flat, so a crop's pixel spread tells which source it came from."""
    base = tmp_path_factory.mktemp("mixgas")
    g = np.random.default_rng(0)
    (base / "main").mkdir()
    (base / "flat").mkdir()
    for i in range(9):
        arr = g.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(base / "main" / f"img{i:02d}.png")
    for i in range(5):
        arr = np.full((40, 48, 3), (40 * i + 20, 200 - 30 * i, 90), dtype=np.uint8)
        Image.fromarray(arr).save(base / "flat" / f"img{i:02d}.png")
    return base / "main", base / "flat"


def _cfg(sources, gas, *extra):
    main, homo = sources
    return load_config(None, [f"data.root={main}", f"data.homogeneous_root={homo}",
                              "data.homogeneous_ratio=0.4", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", "data.batch_size_per_gpu=2",
                              "data.num_workers=0", "data.loader=torch",
                              f"deepspeed.gradient_accumulation_steps={gas}", *extra])


def _steps_sources(per_micro_batch, gas):
    """[[source of each micro-batch] per optimizer step]."""
    return [per_micro_batch[i:i + gas] for i in range(0, len(per_micro_batch), gas)]


@pytest.mark.parametrize("gas", [1, 2, 3])
def test_one_source_per_optimizer_step_and_gapless_streams(sources, gas):
    cfg = _cfg(sources, gas)
    images = build_dataset(cfg)
    steps, bs, world = 60, 2, 2
    for rank in range(world):
        order = build_order(images, cfg, rank, world)
        per_mb = [order.source(m) for m in range(steps * gas)]
        by_step = _steps_sources(per_mb, gas)
        assert all(len(set(s)) == 1 for s in by_step), by_step  # one source per step
        assert {s[0] for s in by_step} == {0, 1}  # and both sources are read
        # each source's stream, in the order read, is exactly its own order from position 0
        read = {0: [], 1: []}
        for m in range(steps * gas):
            pairs = order.step(m, bs)
            homo = per_mb[m]
            assert all((i >= images.offset) == bool(homo) for _, i in pairs), m
            read[homo] += [(e, i - (images.offset if homo else 0)) for e, i in pairs]
        for homo in (0, 1):
            want = [order.orders[homo].sample(k) for k in range(len(read[homo]))]
            assert read[homo] == want, (homo, gas)


def _flat(crops):
    """per image of the batch: True where its global crops are flat (the homogeneous source)."""
    b = crops.shape[0] // 2  # [2B, C, H, W]: crop 1 of every image, then crop 2
    spread = crops.flatten(2).std(-1).amax(-1)  # [2B]
    flat = spread < 1e-3
    assert ((spread < 1e-3) | (spread > 0.05)).all(), spread  # noise vs flat, nothing between
    assert (flat[:b] == flat[b:]).all()
    return flat[:b].tolist()


@pytest.mark.parametrize("gas", [2, 3])
def test_torch_loader_micro_batches_of_a_step_share_the_source(sources, gas):
    cfg = _cfg(sources, gas)
    loader = build_train_loader(cfg, 0, 1, 0)
    per_mb = []
    for _ in range(10 * gas):
        flat = _flat(next(loader).global_crops)
        assert len(set(flat)) == 1, flat  # a micro-batch: one source
        per_mb.append(flat[0])
    by_step = _steps_sources(per_mb, gas)
    assert all(len(set(s)) == 1 for s in by_step), by_step
    assert {s[0] for s in by_step} == {False, True}, by_step


def test_torch_loader_resumes_exactly_at_a_step_boundary(sources):
    cfg = _cfg(sources, 2)
    full = build_train_loader(cfg, 0, 1, 0)
    batches = [next(full).global_crops for _ in range(12)]
    resumed = build_train_loader(cfg, 0, 1, 6)  # optimizer step 3
    for b in batches[6:]:
        assert (next(resumed).global_crops == b).all()


@pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed "
                    "(pip install 'fastdino[dali]')")
def test_dali_micro_batches_of_a_step_share_the_source_and_resume(sources):
    from fastdino.data.dali import build_dali_loader

    gas = 2
    cfg = _cfg(sources, gas, "data.loader=dali", "data.num_workers=1")
    images = build_dataset(cfg)
    order = build_order(images, cfg, 0, 1)
    loader = build_dali_loader(cfg, photometric="triton", debug=True, source_workers=0)
    per_mb, got = [], []
    for m in range(8 * gas):
        got.append(next(loader).global_crops.cpu())
        meta = loader.last_debug["meta"]  # [B, 3]: epoch, index, used
        homo = set((meta[:, 1] >= images.offset).tolist())
        assert len(homo) == 1, m
        per_mb.append(homo.pop())
        assert [tuple(r) for r in meta[:, :2].tolist()] == order.step(m, 2)  # torch's order
    by_step = _steps_sources(per_mb, gas)
    assert all(len(set(s)) == 1 for s in by_step), by_step
    assert {s[0] for s in by_step} == {False, True}, by_step
    resumed = build_dali_loader(cfg, photometric="triton", start_iteration=6,
                                source_workers=0)
    for m in range(6, 10):
        assert (next(resumed).global_crops.cpu() == got[m]).all(), m
