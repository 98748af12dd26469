"""The torch training loader: Batch contract, corrupt files, errors, sharding, exact resume."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from data_helpers import pack_shards
from PIL import Image

from fastdino.config import load_config
from fastdino.data.collate import Batch
from fastdino.data.loader import ShardedInfiniteOrder, TrainLoader, build_train_loader
from fastdino.data.masking import mask_counts


def _write_images(folder, n, seed=0):
    g = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(g.integers(40, 70)), int(g.integers(40, 70))
        arr = g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder


def _cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", "data.batch_size_per_gpu=2",
                              "data.num_workers=0", *extra])


def _assert_equal_batches(a: Batch, b: Batch):
    for f in dataclasses.fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("imgs"), 7)


def test_batch_shapes_and_dtypes(image_dir):
    loader = build_train_loader(_cfg(image_dir))
    n_masked = sum(mask_counts(4, 4))  # 2B=4 global crops of 2x2 patches
    for _ in range(3):
        b = next(loader)
        assert b.global_crops.shape == (4, 3, 32, 32) and b.global_crops.dtype == torch.float32
        assert b.local_crops.shape == (4, 3, 16, 16) and b.local_crops.dtype == torch.float32
        assert b.masks.shape == (4, 4) and b.masks.dtype == torch.bool
        assert b.mask_indices.shape == (n_masked,) and b.mask_indices.dtype == torch.long
        assert b.masks_weight.shape == (n_masked,) and b.masks_weight.dtype == torch.float32
        assert b.n_masked_patches.tolist() == [n_masked]
        assert b.gram_crops is None and b.n_images == 2
    assert loader.iteration == 3 and loader.num_images == 7
    moved = b.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.global_crops, b.global_crops)


def test_gram_crops_in_batch(image_dir):
    b = next(build_train_loader(_cfg(image_dir, "crops.gram_teacher_crops_size=48")))
    assert b.gram_crops.shape == (4, 3, 48, 48) and b.global_crops.shape == (4, 3, 32, 32)


def test_crop_major_order(image_dir):
    # Crop-major: rows 0..B-1 are crop 0 of images 0..B-1, rows B..2B-1 crop 1. Check it with the
    # per-image crops the dataset computes for this step.
    loader = build_train_loader(_cfg(image_dir))
    b = next(loader)
    ds = loader.batches
    samples = [ds.sample(e, i) for e, i in ds.order.step(0, 2)]
    for c in range(2):
        for j in range(2):
            assert torch.equal(b.global_crops[c * 2 + j], samples[j]["global_crops"][c])
            assert torch.equal(b.local_crops[c * 2 + j], samples[j]["local_crops"][c])


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    root = _write_images(tmp_path / "d", 3)
    (root / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    loader = build_train_loader(_cfg(root, "data.batch_size_per_gpu=4"))
    b = next(loader)  # 4 samples of a 4-file epoch: the corrupt one is visited
    assert b.global_crops.shape[0] == 8 and torch.isfinite(b.global_crops).all()
    assert loader.skipped == {str(root / "bad.jpg")}


@pytest.mark.parametrize("extra", [["data.num_workers=1"], ["data.torch_photometric=gpu"]],
                         ids=["worker", "raw-batch"])
def test_the_skip_line_says_why_the_file_could_not_be_read(tmp_path, caplog, extra):
    """The file is met in a loader worker (or collated into a RawBatch), the line is logged once
    by the main process: the decoder's reason travels with the batch."""
    root = _write_images(tmp_path / "d", 3)
    (root / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    loader = build_train_loader(_cfg(root, "data.batch_size_per_gpu=4", *extra))
    with caplog.at_level("WARNING", logger="fastdino"):
        b = next(loader)
    lines = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert b.skipped_reasons and b.skipped_reasons[0].startswith("UnidentifiedImageError: ")
    assert lines == [f"skipped unreadable image {root / 'bad.jpg'} ({b.skipped_reasons[0]}; "
                     "1 skipped so far of 4)"]


@pytest.mark.parametrize("source_workers", [0, 1], ids=["in-process", "spawned-worker"])
def test_dali_skip_line_says_why_as_the_torch_loaders(tmp_path, caplog, source_workers):
    """The DALI loader reports an unreadable file as the torch loader does: one line from the
    training process (per rank: EVERY_RANK) saying why, and the batch carries the reason beside
    the path. Its source used to log the reason itself, in a spawned worker process that has no
    logging set up (untagged, on every rank), and the loader a second line without it."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (fastdino[dali])")
    from fastdino.data.dali import build_dali_loader

    root = _write_images(tmp_path / "d", 3)
    (root / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    cfg = _cfg(root, "data.batch_size_per_gpu=4", "data.loader=dali")
    with caplog.at_level("WARNING", logger="fastdino"):
        loader = build_dali_loader(cfg, source_workers=source_workers)
        b = next(loader)
    said = [r for r in caplog.records if "bad.jpg" in r.getMessage()]
    assert b.skipped_files == (str(root / "bad.jpg"),)
    assert len(b.skipped_reasons) == 1 and b.skipped_reasons[0].startswith(
        "UnidentifiedImageError: ")
    assert [r.getMessage() for r in said] == [
        f"skipped unreadable image {root / 'bad.jpg'} ({b.skipped_reasons[0]}; 1 skipped so far "
        "of 4)"]
    assert getattr(said[0], "every_rank", False)


def test_missing_and_empty_folders_error_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_train_loader(_cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"empty.*\.jpg.*\.webp"):
        build_train_loader(_cfg(tmp_path / "empty"))


def test_dali_unavailable_is_a_clear_error(image_dir, monkeypatch):
    # Simulate a checkout without the DALI loader module (None in sys.modules -> ImportError).
    import fastdino.data

    monkeypatch.delattr(fastdino.data, "dali", raising=False)
    monkeypatch.setitem(sys.modules, "fastdino.data.dali", None)
    with pytest.raises(RuntimeError, match="DALI loader not available"):
        build_train_loader(_cfg(image_dir, "data.loader=dali"))
    assert isinstance(build_train_loader(_cfg(image_dir, "data.loader=auto")), TrainLoader)


def test_auto_without_cuda_is_the_torch_loader(image_dir):
    if torch.cuda.is_available():
        pytest.skip("with CUDA, auto may pick DALI")
    assert isinstance(build_train_loader(_cfg(image_dir, "data.loader=auto")), TrainLoader)


@pytest.mark.parametrize("n,world,batch", [(10, 2, 2), (7, 2, 3), (9, 3, 1)])
def test_rank_shards_are_disjoint_and_complete_per_epoch(n, world, batch):
    seen = {}
    for rank in range(world):
        order = ShardedInfiniteOrder(n, seed=0, rank=rank, world_size=world)
        for step in range(4 * n):
            for epoch, index in order.step(step, batch):
                seen.setdefault(epoch, []).append((rank, index))
    for epoch in range(3):
        indices = [i for _, i in seen[epoch]]
        assert sorted(indices) == list(range(n))  # complete and without repeats -> disjoint
    first = [i for _, i in sorted(seen[0])]
    assert [i for _, i in sorted(seen[1])] != first or n < 3  # a new permutation each epoch


def test_ranks_get_different_batches(image_dir):
    a = next(build_train_loader(_cfg(image_dir), rank=0, world_size=2))
    b = next(build_train_loader(_cfg(image_dir), rank=1, world_size=2))
    assert not torch.equal(a.global_crops, b.global_crops)


def test_resume_reproduces_the_uninterrupted_batches_bitwise(image_dir):
    k = 4  # crosses the 7-image epoch boundary (2 images per step)
    full = build_train_loader(_cfg(image_dir))
    expected = [next(full) for _ in range(k + 2)]
    resumed = build_train_loader(_cfg(image_dir), start_iteration=k)
    assert resumed.iteration == k
    for want in expected[k:]:
        _assert_equal_batches(next(resumed), want)


def test_worker_processes_give_the_same_stream(image_dir):
    serial = build_train_loader(_cfg(image_dir))
    workers = build_train_loader(_cfg(image_dir, "data.num_workers=2"))
    for _ in range(3):
        _assert_equal_batches(next(workers), next(serial))


def test_starting_the_loader_leaves_the_global_torch_rng_alone(tmp_path):
    """Model init and RoPE/drop-path draws come from the global RNG, and resume restores it: the
    loader must not consume from it when its iterator starts (it has a private generator)."""
    import torch

    from fastdino.config import load_config
    from fastdino.data.loader import build_train_loader
    from fastdino.data.sample_data import sample_images_dir

    cfg = load_config(None, [f"data.root={sample_images_dir()}", "data.num_workers=0",
                             "data.batch_size_per_gpu=2", "crops.global_crops_size=32",
                             "crops.local_crops_size=16", "crops.local_crops_number=1"])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_train_loader(cfg, rank=0, world_size=1, start_iteration=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("extra", [(), ("crops.gram_teacher_crops_size=48",),
                                   ("kernels.impl=triton", "crops.local_crops_number=3"),
                                   ("data.num_workers=2",)])
def test_gpu_photometric_gives_the_cpu_path_batches(image_dir, extra):
    """data.torch_photometric=gpu: the workers cut, resize and flip with PIL and the photometric
    ops run in kernels/photometric.py (its reference under auto on CPU tensors, the kernel itself
    with kernels.impl=triton: the interpreter here, compiled on a GPU). The batches are the CPU
    path's bit for bit, masks and skips included, through worker processes too."""
    cpu = build_train_loader(_cfg(image_dir, *extra))
    gpu = build_train_loader(_cfg(image_dir, *extra, "data.torch_photometric=gpu"))
    assert gpu.finish is not None and cpu.finish is None
    for _ in range(3):
        _assert_equal_batches(next(cpu), next(gpu).to("cpu", non_blocking=False))


def test_gpu_photometric_with_distorted_gram_crops(image_dir):
    """Gram crops distorted at the large size: the GPU path resizes the distorted crop with
    torch's antialiased bicubic where the CPU path uses PIL's: within about a level, the Gram
    crops (at the large size: no resize) and the local crops exact."""
    extra = ("crops.gram_teacher_crops_size=48", "crops.gram_teacher_no_distortions=false")
    cpu = build_train_loader(_cfg(image_dir, *extra))
    gpu = build_train_loader(_cfg(image_dir, *extra, "data.torch_photometric=gpu"))
    std = torch.tensor(_cfg(image_dir).crops.std).view(1, 3, 1, 1)
    for _ in range(3):
        a, b = next(cpu), next(gpu).to("cpu", non_blocking=False)
        assert torch.equal(a.local_crops, b.local_crops) and torch.equal(a.gram_crops, b.gram_crops)
        levels = ((a.global_crops - b.global_crops) * std * 255).abs()  # 8-bit levels
        # these images are pixel noise, resampling's worst case: 4 levels at most seen, 0.17 mean
        assert levels.mean() < 1.0 and levels.max() < 8.0, (levels.mean(), levels.max())
        assert levels.max() > 0  # a real difference, bounded


def test_tar_shards_give_the_folder_batches(image_dir, tmp_path, monkeypatch):
    """The same images as WebDataset shards (read in place, in forked workers) give the folder's
    batches bit for bit: same order, same crops, same masks."""
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))  # the tar index cache
    shards = pack_shards(image_dir, tmp_path / "shards", per_shard=3)
    folder = build_train_loader(_cfg(image_dir))
    packed = build_train_loader(_cfg(str(shards / "part-{0..2}.tar"), "data.num_workers=2"))
    assert packed.num_images == folder.num_images == 7
    for _ in range(5):  # past one epoch of 7 images at B = 2
        _assert_equal_batches(next(packed), next(folder))


MIX = "crops.resolution_mix=[[32,16,48,0.5],[48,16,64,0.3],[64,32,96,0.2]]"


def test_resolution_mix_picks_one_triple_per_step_on_every_rank(image_dir):
    """crops.resolution_mix (the official high-res stage's mixed resolutions): every step is one
    (global, local, Gram) triple, the same on both ranks, at the given ratios, masks sized for
    its grid; a resumed loader repeats the uninterrupted one's steps exactly."""
    cfg = _cfg(image_dir, MIX, "crops.gram_teacher_crops_size=48")
    ranks = [build_train_loader(cfg, r, 2, 0) for r in range(2)]
    sizes = []
    for _ in range(12):
        a, b = (next(loader) for loader in ranks)
        triple = (a.global_crops.shape[-1], a.local_crops.shape[-1], a.gram_crops.shape[-1])
        assert triple == (b.global_crops.shape[-1], b.local_crops.shape[-1],
                          b.gram_crops.shape[-1])
        assert a.masks.shape[1] == (triple[0] // 16) ** 2
        sizes.append(triple)
    assert set(sizes) <= {(32, 16, 48), (48, 16, 64), (64, 32, 96)} and len(set(sizes)) > 1
    order = ranks[0].batches  # the draw itself, over many steps: near the ratios
    counts = np.bincount([order.resolution(s) for s in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)
    resumed = build_train_loader(cfg, 0, 2, 5)
    full = build_train_loader(cfg, 0, 2, 0)
    for _ in range(5):
        next(full)
    for _ in range(3):
        _assert_equal_batches(next(full), next(resumed))


def test_resolution_mix_with_gradient_accumulation_draws_per_optimizer_step(image_dir):
    """The gas micro-batches of an optimizer step share its triple (README: one size triple per
    step); different steps still differ."""
    cfg = _cfg(image_dir, MIX, "crops.gram_teacher_crops_size=48",
               "deepspeed.gradient_accumulation_steps=3")
    loader = build_train_loader(cfg, 0, 1, 0)
    sizes = [next(loader).global_crops.shape[-1] for _ in range(24)]
    per_step = [set(sizes[i:i + 3]) for i in range(0, 24, 3)]
    assert all(len(s) == 1 for s in per_step), sizes
    assert len(set.union(*per_step)) > 1


def test_resolution_mix_rules(image_dir):
    from fastdino.config import ConfigError

    with pytest.raises(ConfigError, match="gram sizes set exactly when"):
        _cfg(image_dir, MIX)  # Gram sizes in the mix but no Gram crops
    with pytest.raises(ConfigError, match=r"DALI loader .* data.torch_photometric=cpu"):
        _cfg(image_dir, MIX, "crops.gram_teacher_crops_size=48", "data.torch_photometric=gpu")
    with pytest.raises(ConfigError, match=r"crops.global_crops_size.*multiple of model.patch"):
        _cfg(image_dir, "crops.resolution_mix=[[40,16,null,1.0]]")
    cfg = _cfg(image_dir, "crops.resolution_mix=[[32,16,null,1],[48,32,null,3]]")
    assert [r for _, r in cfg.crops.variants()] == [0.25, 0.75]
