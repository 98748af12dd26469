"""USERS.md §1 / §8 / §9: `~` in the paths a user passes as `key=value` overrides. The shell does
not expand `data.root=~/imgs` (the word is not an assignment: `data.root` is no identifier), so
fastdino must. These paths expand today; see /work/notes/users_audit.md for the keys that do not."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from fastdino.config import load_config
from fastdino.data.datasets import ImageFolderUnlabeled
from fastdino.data.loader import build_train_loader
from fastdino.eval.weights import read_weights
from fastdino.export import backbone_targets


def test_data_root_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    g = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(g.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    ds = ImageFolderUnlabeled(root="~/imgs")
    assert ds.paths == [str(tmp_path / "imgs" / f"{i}.png") for i in range(2)]
    cfg = load_config(None, ["data.root=~/imgs", "crops.global_crops_size=32",
                             "crops.local_crops_size=16", "crops.local_crops_number=2",
                             "data.batch_size_per_gpu=2", "data.num_workers=0"])
    loader = build_train_loader(cfg)
    assert next(loader).global_crops.shape == (4, 3, 32, 32) and loader.num_images == 2


def test_weights_and_export_out_with_a_tilde_are_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    # model.pretrained_weights / gram.ckpt / distillation.teacher / eval --weights all read here
    got, _, _, _ = read_weights("~/w.safetensors", key="model.pretrained_weights")
    assert torch.equal(got["w"], sd["w"])
    # fastdino export --out ~/x.safetensors writes under $HOME, not into a folder named '~'
    assert backbone_targets("~/x.safetensors") == [tmp_path / "x.safetensors"]
    assert backbone_targets("~/out/") == [tmp_path / "out" / "teacher_backbone.pth",
                                          tmp_path / "out" / "teacher_backbone.safetensors"]
