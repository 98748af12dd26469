"""Image readers and the embedded sample data."""

import io

import numpy as np
import pytest
from PIL import Image

from fastdino.data.datasets import ImageFolderUnlabeled, LabelledImageFolder
from fastdino.data.sample_data import benchmark_jpeg_dir, digits_labelled_dir, sample_images_dir


def _save(path, fmt=None, size=(12, 10), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def test_recursive_listing_extensions_and_order(tmp_path):
    _save(tmp_path / "b" / "deep" / "x.JPG", "JPEG")
    _save(tmp_path / "a.png")
    _save(tmp_path / "c.Jpeg", "JPEG")
    _save(tmp_path / "d.webp", "WEBP")
    _save(tmp_path / "e.bmp")
    _save(tmp_path / "f.tiff", "TIFF")  # not an allowed extension
    (tmp_path / "notes.txt").write_text("x")
    ds = ImageFolderUnlabeled(root=tmp_path)
    names = [p[len(str(tmp_path)) + 1:] for p in ds.paths]
    assert names == ["a.png", "b/deep/x.JPG", "c.Jpeg", "d.webp", "e.bmp"]
    for i in range(len(ds)):
        img, used, skipped = ds.load(i)
        assert img.mode == "RGB" and img.size == (12, 10) and used == i and skipped == ()


def test_missing_path_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderUnlabeled(root=tmp_path / "does_not_exist")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderUnlabeled(root=tmp_path)
    assert str(tmp_path) in str(e.value)
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
        assert ext in str(e.value)


def test_corrupt_and_truncated_files_are_replaced_by_the_next_readable_one(tmp_path):
    _save(tmp_path / "0.png", color=(1, 1, 1))
    (tmp_path / "1.jpg").write_bytes(b"\x00garbage" * 50)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG")
    (tmp_path / "2.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    _save(tmp_path / "3.png", color=(3, 3, 3))
    ds = ImageFolderUnlabeled(root=tmp_path)
    img, used, skipped = ds.load(1)
    assert used == 3 and np.asarray(img)[0, 0].tolist() == [3, 3, 3]
    assert skipped == (str(tmp_path / "1.jpg"), str(tmp_path / "2.jpg"))
    assert ds.skipped == {str(tmp_path / "1.jpg"), str(tmp_path / "2.jpg")}
    # deterministic, and known-bad files are not decoded again
    assert ds.load(2)[1] == 3 and ds.load(1)[1] == 3
    assert ImageFolderUnlabeled(root=tmp_path).load(2)[1] == 3  # a fresh process agrees


def test_all_files_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="could be decoded"):
        ImageFolderUnlabeled(root=tmp_path).load(0)


def test_file_list(tmp_path):
    _save(tmp_path / "imgs" / "a.png")
    _save(tmp_path / "imgs" / "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nimgs/b.png\n\nimgs/a.png\nimgs/readme.txt\n")
    ds = ImageFolderUnlabeled(file_list=lst)
    assert ds.paths == [str(tmp_path / "imgs/b.png"), str(tmp_path / "imgs/a.png")]
    with pytest.raises(ValueError):
        ImageFolderUnlabeled(root=tmp_path, file_list=lst)


def test_labelled_folder(tmp_path):
    _save(tmp_path / "cat" / "1.png")
    _save(tmp_path / "cat" / "sub" / "2.png")
    _save(tmp_path / "dog" / "3.jpg", "JPEG")
    ds = LabelledImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert [lbl for _, lbl in ds.samples] == [0, 0, 1]
    img, label = ds[2]
    assert label == 1 and img.mode == "RGB"


def test_sample_images_are_real_photos_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path))
    d = sample_images_dir()
    assert d.parent == tmp_path
    ds = ImageFolderUnlabeled(root=d)
    assert len(ds) >= 15
    sizes = set()
    for i in range(len(ds)):
        img, used, _ = ds.load(i)
        assert used == i
        sizes.add(img.size)
    assert min(min(s) for s in sizes) >= 100 and len(sizes) > 3  # photographs, not icons
    mtime = (d / "astronaut.jpg").stat().st_mtime_ns
    assert sample_images_dir() == d and (d / "astronaut.jpg").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["sample_images"]  # no temp folders left


def test_digits_labelled_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path))
    d = digits_labelled_dir(size=16)
    train, val = LabelledImageFolder(d / "train"), LabelledImageFolder(d / "val")
    assert train.classes == val.classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797  # the whole sklearn digits set
    assert abs(len(val) - 0.25 * 1797) < 1
    img, _ = train[0]
    assert img.size == (16, 16) and img.mode == "RGB"


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")  # a 16-bit PNG (medical / satellite data)
    img, _, _ = ImageFolderUnlabeled(root=tmp_path).load(0)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 128, 255]


def test_benchmark_jpeg_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "a"))
    d = benchmark_jpeg_dir(9, seed=3)
    files = sorted(d.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.jpg" for i in range(9)]
    sizes = set()
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.add(img.size)
            pixels = np.asarray(img)
        assert pixels.std() > 10  # content, not a flat fill
    assert sizes <= {(500, 375), (375, 500)}
    assert np.mean([f.stat().st_size for f in files]) > 30_000  # noise keeps them photo-sized
    # per-image seeding: another build (other threads, other order) writes the same bytes
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "b"))
    d2 = benchmark_jpeg_dir(9, seed=3)
    assert [f.read_bytes() for f in sorted(d2.iterdir())] == [f.read_bytes() for f in files]
    assert benchmark_jpeg_dir(9, seed=4) != d2
    with pytest.raises(ValueError, match="n=0"):
        benchmark_jpeg_dir(0)
