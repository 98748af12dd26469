"""USERS.md §1: a user's own unlabelled folder, as found on disk (medical, satellite, scanned
data): every PIL mode such folders hold, images smaller than the crops or of extreme aspect, and
fewer images than one batch. Each of these trained in a CPU smoke run; these tests pin it."""

import numpy as np
import torch
from PIL import Image

from fastdino.config import load_config
from fastdino.data.datasets import ImageFolderUnlabeled
from fastdino.data.loader import build_train_loader


def _cfg(root, *extra):
    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", "data.batch_size_per_gpu=2",
                              "data.num_workers=0", *extra])


def test_every_pil_mode_of_a_user_folder_decodes_to_rgb_of_its_size(tmp_path):
    g = np.random.default_rng(0)
    rgb = g.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    grey = np.full((9, 11), 100, np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "a_grey.png")
    Image.fromarray(grey, "L").convert("LA").save(tmp_path / "b_grey_alpha.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "d_palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "e_cmyk.jpg")  # print / scanned JPEGs
    Image.fromarray(grey > 50).save(tmp_path / "f_bilevel.png")  # mode "1" (binary masks, scans)
    ds = ImageFolderUnlabeled(root=tmp_path)
    assert len(ds) == 6
    for i in range(len(ds)):
        img, used, skipped = ds.load(i)
        assert (img.mode, img.size, used, skipped) == ("RGB", (11, 9), i, ()), ds.paths[i]
    # greyscale becomes 3 equal channels of the same value (no rescaling of 8-bit data)
    assert np.asarray(ds.load(0)[0])[0, 0].tolist() == [100, 100, 100]
    assert np.asarray(ds.load(1)[0])[0, 0].tolist() == [100, 100, 100]
    assert np.array_equal(np.asarray(ds.load(2)[0]), rgb)  # alpha dropped, colours kept
    assert np.asarray(ds.load(5)[0])[0, 0].tolist() == [255, 255, 255]


def test_images_smaller_than_the_crops_or_of_extreme_aspect_give_full_size_crops(tmp_path):
    g = np.random.default_rng(1)
    for name, (h, w) in {"tiny": (10, 12), "wide": (20, 600), "tall": (500, 8)}.items():
        arr = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{name}.jpg")
    loader = build_train_loader(_cfg(tmp_path, "data.batch_size_per_gpu=3"))
    for _ in range(2):
        b = next(loader)
        assert b.global_crops.shape == (6, 3, 32, 32) and b.local_crops.shape == (6, 3, 16, 16)
        assert torch.isfinite(b.global_crops).all() and torch.isfinite(b.local_crops).all()
    assert loader.skipped == set()


def test_a_folder_with_fewer_images_than_a_batch_fills_every_batch(tmp_path):
    g = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(g.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    loader = build_train_loader(_cfg(tmp_path, "data.batch_size_per_gpu=8"))
    for _ in range(3):
        b = next(loader)
        assert b.n_images == 8 and b.global_crops.shape == (16, 3, 32, 32)
    assert loader.num_images == 3 and loader.iteration == 3


def test_several_folders_and_an_image_glob_as_one_data_root(tmp_path):
    """Data spread over several folders (v2#243 users merge datasets by hand): a brace pattern
    takes their union, sorted, each image once even when two alternatives name it."""
    g = np.random.default_rng(3)
    for sub, names in {"a": ["0.jpg", "x/1.png"], "b": ["2.jpg"], "c": ["3.png"]}.items():
        for name in names:
            (tmp_path / sub / name).parent.mkdir(parents=True, exist_ok=True)
            arr = g.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / sub / name)
    ds = ImageFolderUnlabeled(root=str(tmp_path / "{a,b,a/x/1.png}"))
    assert list(ds.paths) == [str(tmp_path / p) for p in ("a/0.jpg", "a/x/1.png", "b/2.jpg")]
    ds = ImageFolderUnlabeled(root=str(tmp_path / "**" / "*.png"))  # recursive image glob
    assert list(ds.paths) == [str(tmp_path / p) for p in ("a/x/1.png", "c/3.png")]
