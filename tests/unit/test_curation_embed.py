"""`curate embed` resumes after an interruption (same matrix as an uninterrupted run, only the
missing batches recomputed), marks unreadable images, refuses to mix runs; and the whole
pipeline `curate embed -> cluster -> sample` runs on the embedded sample images on CPU and writes
a file list that training's reader (ImageFolderUnlabeled(file_list=...)) loads."""

import json

import numpy as np
import pytest
from PIL import Image

from fastdino.curation.cli import main
from fastdino.curation.embed import embed_folder, read_files
from fastdino.data.datasets import ImageFolderUnlabeled
from fastdino.eval.weights import load_eval_backbone


def _images(root, n=10):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 255, size=(40 + i, 36, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("sub" if i % 2 else ".") / f"img{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


class _Interrupt(Exception):
    pass


def _dies_on_batch(backbone, n: int) -> dict:
    """Make the backbone's forward raise on its n-th call (a job killed mid-run); returns the
    call counter, which the caller may reset, and the real forward under "forward"."""
    calls = {"n": 0, "forward": backbone.forward_features}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Interrupt
        return calls["forward"](x)

    backbone.forward_features = flaky
    return calls


def test_embed_resumes_after_interruption(tmp_path):
    data = _images(tmp_path / "imgs")
    backbone, info = load_eval_backbone("random", arch="vit_test")
    key = {"weights": info.digest}
    ref = np.load(embed_folder(data, backbone, tmp_path / "full", key, image_size=32,
                               batch_size=3, progress=False))
    calls = _dies_on_batch(backbone, 3)
    with pytest.raises(_Interrupt):
        embed_folder(data, backbone, tmp_path / "E", key, image_size=32, batch_size=3,
                     progress=False)
    state = json.loads((tmp_path / "E" / "progress.json").read_text())
    assert state["done"] == 6 and not state["complete"]
    calls["n"] = -100  # no more failures; count the batches the rerun computes
    embed_folder(data, backbone, tmp_path / "E", key, image_size=32, batch_size=3,
                 progress=False)
    assert calls["n"] == -100 + 2  # 11 images: rows 6..10 = 2 batches of 3, nothing recomputed
    got = np.load(tmp_path / "E" / "embeddings.npy")
    assert got.dtype == np.float16 and got.shape == (11, 32)
    np.testing.assert_allclose(got, ref, atol=1e-3, equal_nan=True)
    files = read_files(tmp_path / "E")
    bad = files.index(str(data / "broken.jpg"))
    assert np.isnan(got[bad]).all() and np.isfinite(np.delete(got, bad, 0)).all()
    np.testing.assert_allclose(np.linalg.norm(np.delete(got, bad, 0).astype(np.float32), axis=1),
                               1.0, atol=2e-3)
    assert (tmp_path / "E" / "skipped.txt").read_text().strip() == str(data / "broken.jpg")
    assert json.loads((tmp_path / "E" / "progress.json").read_text())["complete"]
    with pytest.raises(ValueError, match=r"made otherwise \(image_size differ"):
        embed_folder(data, backbone, tmp_path / "E", key, image_size=48, batch_size=3,
                     progress=False)


def test_file_names_that_are_not_utf8(tmp_path, capsys):
    """A file named b'caf\\xe9.png' (Latin-1): embedded (files.txt holds its bytes), the rerun
    reads files.txt back as the same names (resume check), and dedup's file list names it by its
    bytes (UnicodeEncodeError before)."""
    import os

    data = _images(tmp_path / "imgs", n=3)
    raw = os.path.join(os.fsencode(data), b"caf\xe9.png")
    Image.fromarray(np.full((40, 36, 3), 7, np.uint8)).save(raw.decode("utf-8",
                                                                      "surrogateescape"))
    E = tmp_path / "E"
    args = ["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test", "--out",
            str(E), "--image-size", "32", "--batch-size", "8", "--num-workers", "0",
            "--device", "cpu", "--quiet"]
    assert main(args) == 0 and main(args) == 0  # the rerun compares files.txt with the folder
    assert raw + b"\n" in (E / "files.txt").read_bytes()
    assert os.fsdecode(raw) in read_files(E)
    assert main(["dedup", str(E), "--threshold", "0.9999", "--device", "cpu", "--quiet",
                 "--out", str(tmp_path / "unique.txt")]) == 0
    assert raw + b"\n" in (tmp_path / "unique.txt").read_bytes()


def test_brace_patterns_of_absolute_and_relative_paths(tmp_path, monkeypatch):
    """--data '{/abs/a,/abs/b}' failed: the whole pattern was made absolute before its brace
    expansion ('/cwd/{/abs/a,/abs/b}'). Each piece is made absolute after it; names absolute."""
    a, b = _images(tmp_path / "a", n=2), _images(tmp_path / "b", n=2)
    backbone, info = load_eval_backbone("random", arch="vit_test")
    kw = dict(key={"weights": info.digest}, image_size=32, batch_size=4, progress=False)
    embed_folder(f"{{{a},{b}}}", backbone, tmp_path / "E", **kw)
    files = read_files(tmp_path / "E")
    assert len(files) == 2 * 3 and all(f.startswith((f"{a}/", f"{b}/")) for f in files)
    monkeypatch.chdir(tmp_path)
    embed_folder("{a,b/sub}", backbone, tmp_path / "Erel", **kw)
    assert read_files(tmp_path / "Erel") == [f for f in files
                                             if f.startswith(f"{a}/") or f"{b}/sub/" in f]


def test_image_size_must_be_whole_patches(tmp_path, capsys):
    """--image-size 30 was accepted (help: a multiple of 16): one-line error, nothing written."""
    data = _images(tmp_path / "imgs", n=2)
    for size in (30, 0):
        assert main(["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test",
                     "--out", str(tmp_path / "E"), "--image-size", str(size), "--num-workers",
                     "0", "--device", "cpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastdino curate embed: error: --image-size "
                              f"{size}: must be a positive multiple of the backbone's patch size "
                              "16"), err
    backbone, info = load_eval_backbone("random", arch="vit_test")
    with pytest.raises(ValueError, match="image_size 44: .* 16 \\(e.g. 48\\)"):
        embed_folder(data, backbone, tmp_path / "E", {"weights": info.digest}, image_size=44)
    assert not (tmp_path / "E").exists()


def test_pipeline_on_sample_images_writes_a_training_file_list(tmp_path, capsys):
    from fastdino.data import sample_images_dir

    data = sample_images_dir()
    E, C, LIST = tmp_path / "E", tmp_path / "C", tmp_path / "curated.txt"
    assert main(["embed", "--data", str(data), "--weights", "random", "--arch", "vit_test",
                 "--out", str(E), "--image-size", "32", "--batch-size", "8", "--num-workers",
                 "0", "--device", "cpu", "--quiet"]) == 0
    n = len(read_files(E))
    assert main(["cluster", str(E), "--levels", "2", "--clusters", "6,2",
                 "--resampling-steps", "2", "--sample-size", "2,2", "--iters", "10",
                 "--device", "cpu", "--out", str(C)]) == 0
    assert main(["sample", str(C), "--n", "8", "--out", str(LIST)]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out
    ds = ImageFolderUnlabeled(file_list=LIST)
    assert len(ds) == 8 == len(set(ds.paths))
    assert set(ds.paths) <= set(read_files(E))
    img, _, _ = ds.load(0)
    assert img.size[0] > 0
    summary = json.loads((tmp_path / "curated.txt.summary.json").read_text())
    assert summary["n"] == 8 and summary["levels"][0]["before"]["total"] == n
    assert summary["levels"][-1]["after"]["total"] == 8


def test_pipeline_on_tar_shards(tmp_path, monkeypatch):
    """The same images as a tar shard: the same embeddings row for row (a member is decoded from
    the same bytes), the broken member marked, and the curated file list of `<shard>/<member>`
    names loads for training, each name giving the image it embedded."""
    import tarfile

    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))  # the tar index cache
    data = _images(tmp_path / "imgs")
    shard = tmp_path / "shards" / "s-0.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        tar.add(data, arcname=".")  # members "./img00.png", "./sub/img01.png", ...
    args = ["--weights", "random", "--arch", "vit_test", "--image-size", "32", "--batch-size",
            "4", "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert main(["embed", "--data", str(data), "--out", str(tmp_path / "EF"), *args]) == 0
    pattern = str(tmp_path / "shards" / "s-{0..0}.tar")
    assert main(["embed", "--data", pattern, "--out", str(tmp_path / "E"), *args]) == 0
    files, folder_files = read_files(tmp_path / "E"), read_files(tmp_path / "EF")
    assert files == [f"{shard}/{f[len(str(data)) + 1:]}" for f in folder_files]
    emb, ref = (np.load(tmp_path / d / "embeddings.npy") for d in ("E", "EF"))
    np.testing.assert_array_equal(emb, ref)
    assert (tmp_path / "E" / "skipped.txt").read_text().strip() == f"{shard}/broken.jpg"
    C, LIST = tmp_path / "C", tmp_path / "curated.txt"
    assert main(["cluster", str(tmp_path / "E"), "--levels", "1", "--clusters", "3",
                 "--iters", "5", "--device", "cpu", "--out", str(C)]) == 0
    assert main(["sample", str(C), "--n", "5", "--out", str(LIST)]) == 0
    ds = ImageFolderUnlabeled(file_list=LIST)
    assert len(ds) == 5 and all(p.startswith(f"{shard}/") for p in ds.paths)
    for i, name in enumerate(ds.paths):
        img, used, _ = ds.load(i)
        with Image.open(data / name[len(str(shard)) + 1:]) as want:
            assert used == i and np.array_equal(np.asarray(img), np.asarray(want.convert("RGB")))


def test_patch_features_resume_in_lockstep(tmp_path):
    """--patches: E/patches.npy holds each image's final-normed patch tokens [h, w, D] (NaN for
    the unreadable one), equal to the backbone on the eval transform, resumed with the CLS rows;
    a folder embedded without patches is not continued with them."""
    import torch

    from fastdino.curation.embed import PATCHES
    from fastdino.data.datasets import decode_location
    from fastdino.eval.features import resize_center_crop, to_normalized_tensor

    data = _images(tmp_path / "imgs", n=5)
    backbone, info = load_eval_backbone("random", arch="vit_test")
    key = {"weights": info.digest}
    forward = _dies_on_batch(backbone, 2)["forward"]
    with pytest.raises(_Interrupt):
        embed_folder(data, backbone, tmp_path / "E", key, image_size=32, batch_size=2,
                     progress=False, patches=True)
    backbone.forward_features = forward
    embed_folder(data, backbone, tmp_path / "E", key, image_size=32, batch_size=2,
                 progress=False, patches=True)
    pat = np.load(tmp_path / "E" / PATCHES)
    files = read_files(tmp_path / "E")
    assert pat.shape == (6, 2, 2, 32) and pat.dtype == np.float16
    for i, name in enumerate(files):
        if name.endswith("broken.jpg"):
            assert np.isnan(pat[i]).all()
            continue
        x = to_normalized_tensor(resize_center_crop(decode_location(name), 32))[None]
        with torch.no_grad():
            want = forward(x)["x_norm_patchtokens"].reshape(2, 2, 32).numpy()
        np.testing.assert_allclose(pat[i], want, atol=2e-3, rtol=2e-3)
    embed_folder(data, backbone, tmp_path / "plain", key, image_size=32, progress=False)
    with pytest.raises(ValueError, match=r"made otherwise \(patches differ"):
        embed_folder(data, backbone, tmp_path / "plain", key, image_size=32, progress=False,
                     patches=True)
