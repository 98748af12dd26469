"""macOS AppleDouble files (`._photo.jpg`, written beside every file a Mac copies to a non-Mac
disk, filling a zip's __MACOSX/ and a macOS tar) are metadata, not images: listings leave them
out with one line. They were listed as images, each then skipped as unreadable with a warning
apiece in training, and each ended `fastdino eval` (until e4d27e7)."""

from __future__ import annotations

import logging

from data_helpers import pack_shards
from PIL import Image

from fastdino.data.datasets import ImageFolderUnlabeled, LabelledImageFolder
from fastdino.data.sources import is_image

APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


def _mac_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "cat" / "a.jpg")
    for p in (root / "cat" / "._a.jpg", root / "__MACOSX" / "cat" / "._a.jpg"):
        p.write_bytes(APPLE_DOUBLE)
    return root


def test_apple_double_files_are_not_images_in_folders_and_shards(tmp_path, caplog):
    assert not is_image("cat/._a.jpg") and is_image("cat/a.jpg") and is_image("a._b.jpg")
    root = _mac_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="fastdino"):
        images = ImageFolderUnlabeled(root=root)
    assert len(images) == 1 and images.decode(0).size == (8, 8)
    assert "2 macOS AppleDouble file(s)" in caplog.text
    labelled = LabelledImageFolder(root)
    assert [p.rsplit("/", 2)[-2:] for p, _ in labelled.samples] == [["cat", "a.jpg"]]
    shards = pack_shards(root / "cat", tmp_path / "shards", per_shard=4)
    assert len(ImageFolderUnlabeled(root=str(shards / "part-0.tar"))) == 1
