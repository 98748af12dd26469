"""Image readers and the embedded sample data."""

import io
import os

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
    _save(tmp_path / "f.tiff", "TIFF")
    _save(tmp_path / "f2.jfif", "JPEG")  # what some browsers name a saved JPEG
    _save(tmp_path / "g.gif", "GIF")  # not an allowed extension
    (tmp_path / "notes.txt").write_text("x")
    ds = ImageFolderUnlabeled(root=tmp_path)
    names = [p[len(str(tmp_path)) + 1:] for p in ds.paths]
    assert names == ["a.png", "b/deep/x.JPG", "c.Jpeg", "d.webp", "e.bmp", "f.tiff", "f2.jfif"]
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


def test_file_list_of_names_that_are_not_utf8(tmp_path):
    """A listed file whose name is not UTF-8 (Latin-1 bytes; curation's lists keep them as
    written) is read and found, as the folder walk finds it."""
    name = os.fsdecode(b"caf\xe9.png")  # a surrogate escape on a UTF-8 file system
    _save(tmp_path / name)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"caf\xe9.png\n")
    ds = ImageFolderUnlabeled(file_list=lst)
    assert ds.paths == [str(tmp_path / name)] and ds.load(0)[1] == 0


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


# ------------------------------------------------------------------------------------------------
# Tar shards and patterns (sources.py)


def _png(color, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path, members):
    """A WebDataset-style shard: members (name, bytes) in this order, uncompressed."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_brace_expansion():
    from fastdino.data.sources import expand_braces

    assert expand_braces("a/train-{0000..0002}.tar") == [
        "a/train-0000.tar", "a/train-0001.tar", "a/train-0002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{x,y{1..2}}-{a,b}") == ["x-a", "x-b", "y1-a", "y1-b", "y2-a", "y2-b"]
    assert expand_braces("plain/path.tar") == ["plain/path.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("train-{0..3.tar")


@pytest.fixture
def index_cache(tmp_path, monkeypatch):
    """The tar index cache of these tests (not the user's ~/.cache/fastdino)."""
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tar_index"


def test_tar_shards_are_read_in_place_with_their_image_members_only(tmp_path, index_cache,
                                                                     caplog):
    """WebDataset layout: <key>.jpg/.png beside .json/.cls members, which are ignored; each image
    is read at its offset in the shard (bytes equal to what was stored) and decodes."""
    colors = {f"{k:03d}": (k * 40, 255 - k * 40, 7) for k in range(5)}
    _shard(tmp_path / "shards" / "train-0001.tar",
           [(f"{k}.png", _png(colors[k])) for k in ("003", "004")] +
           [("003.cls", b"1"), ("003.json", b"{}")])
    _shard(tmp_path / "shards" / "train-0000.tar",
           [(f"sub/{k}.png", _png(colors[k])) for k in ("001", "000", "002")] + [("x.txt", b"x")])
    _save(tmp_path / "shards" / "loose.png", color=(9, 9, 9))
    with caplog.at_level("INFO", logger="fastdino.data"):
        ds = ImageFolderUnlabeled(root=tmp_path / "shards")  # a folder: its images and shards
    assert "5 images inside 2 tar shards (of 6 images in all)" in caplog.text
    s0, s1 = (str(tmp_path / "shards" / f"train-000{k}.tar") for k in (0, 1))
    assert ds.paths == [str(tmp_path / "shards" / "loose.png"), f"{s0}/sub/000.png",
                        f"{s0}/sub/001.png", f"{s0}/sub/002.png", f"{s1}/003.png", f"{s1}/004.png"]
    for i, name in enumerate(ds.paths[1:], start=1):
        key = name.rsplit("/", 1)[1][:3]
        assert ds.read(i) == _png(colors[key])
        img, used, skipped = ds.load(i)
        assert used == i and skipped == () and np.asarray(img)[0, 0].tolist() == list(colors[key])
    # the same images by a shard, a glob, a brace range, and a file list of shards
    assert ImageFolderUnlabeled(root=s1).paths == ds.paths[4:]
    assert ImageFolderUnlabeled(root=str(tmp_path / "shards" / "*.tar")).paths == ds.paths[1:]
    braces = str(tmp_path / "shards" / "train-{0000..0001}.tar")
    assert ImageFolderUnlabeled(root=braces).paths == ds.paths[1:]
    lst = tmp_path / "list.txt"
    lst.write_text("shards/train-0001.tar\nshards/loose.png\n")
    assert ImageFolderUnlabeled(file_list=lst).paths == ds.paths[4:] + ds.paths[:1]
    # single members by name (what `curate sample` writes); one the shard does not hold is
    # dropped with a warning
    lst.write_text(f"{s1}/004.png\n{s0}/sub/001.png\n{s0}/sub/nope.png\n")
    listed = ImageFolderUnlabeled(file_list=lst)
    assert listed.paths == [ds.paths[5], ds.paths[2]]
    assert listed.read(1) == ds.read(2) == _png(colors["001"])


def test_bad_shards_and_patterns(tmp_path, caplog, index_cache):
    good = _shard(tmp_path / "d" / "a.tar", [("0.png", _png((1, 2, 3)))])
    (tmp_path / "d" / "b.tar").write_bytes(b"\x01" * 700)  # not a tar: skipped with a warning
    with caplog.at_level("INFO", logger="fastdino.data"):
        ds = ImageFolderUnlabeled(root=tmp_path / "d")
    assert ds.paths == [f"{good}/0.png"]
    assert "b.tar" in caplog.text and "unreadable tar shard" in caplog.text
    assert "1 images inside 1 tar shards" in caplog.text  # the unreadable one not counted
    # a compressed tar is refused, naming why
    import tarfile

    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(good, arcname="a.tar")
    with pytest.raises(ValueError, match="compressed tar"):
        ImageFolderUnlabeled(root=tmp_path / "c.tar.gz")
    with pytest.raises(FileNotFoundError, match=r"pattern .*nothing-\*\.tar"):
        ImageFolderUnlabeled(root=str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="x-2.tar"):  # one brace alternative is missing
        ImageFolderUnlabeled(root=str(tmp_path / "d" / "{a.tar,x-2.tar}"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a folder, an image"):
        ImageFolderUnlabeled(root=tmp_path / "notes.txt")
    # a shard cut short after indexing: the member cannot be read whole and is skipped
    _shard(tmp_path / "e" / "t.tar", [("0.png", _png((5, 5, 5))), ("1.png", _png((6, 6, 6)))])
    ds = ImageFolderUnlabeled(root=tmp_path / "e")
    raw = (tmp_path / "e" / "t.tar").read_bytes()
    (tmp_path / "e" / "t.tar").write_bytes(raw[:ds.locations[1].offset + 10])
    with pytest.raises(OSError, match="truncated shard"):
        ds.read(1)
    img, used, skipped = ds.load(1)
    assert used == 0 and skipped == (ds.paths[1],) and np.asarray(img)[0, 0].tolist() == [5, 5, 5]


def test_shard_index_cache_is_used_and_invalidated(tmp_path, index_cache, monkeypatch):
    from fastdino.data import sources

    shard = _shard(tmp_path / "s.tar", [("a.png", _png((1, 1, 1))), ("b.png", _png((2, 2, 2)))])
    first = ImageFolderUnlabeled(root=shard)
    assert len(list(index_cache.glob("*.json"))) == 1

    def no_tar(path):
        raise AssertionError("indexed again despite a valid cache")

    monkeypatch.setattr(sources, "index_shard", no_tar)
    cached = ImageFolderUnlabeled(root=shard)
    assert cached.paths == first.paths and cached.locations == first.locations
    assert cached.read(1) == _png((2, 2, 2))
    monkeypatch.undo()  # (also restores FASTDINO_CACHE: set it again)
    monkeypatch.setenv("FASTDINO_CACHE", str(index_cache.parent))
    # the shard rewritten (other size and mtime): the cache is stale and the shard re-indexed
    _shard(shard, [("c.png", _png((3, 3, 3)))])
    os.utime(shard, ns=(1, 1))
    again = ImageFolderUnlabeled(root=shard)
    assert again.paths == [f"{shard}/c.png"] and again.read(0) == _png((3, 3, 3))
    # an unwritable cache is not an error, and leaves no temporary file
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FASTDINO_CACHE", str(blocker))
    assert ImageFolderUnlabeled(root=shard).paths == again.paths
