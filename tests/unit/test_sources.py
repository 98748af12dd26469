"""Where the images come from (fastdino/data/sources.py): folder walks, file lists, tar shards;
what is left out is said, not dropped silently."""

import os

from PIL import Image

from fastdino.data.datasets import ImageFolderUnlabeled
from fastdino.data.sources import walk_folder


def _save(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)
    return path


def test_symlink_loops_and_repeated_links_are_walked_once(tmp_path, caplog):
    """`sub/loop -> ..` multiplied the dataset ~40x (os.walk followed it until the path grew too
    long); a second link to a folder counted its images twice. Each folder is walked once, the
    real folder under its own name, with one warning naming the links not followed."""
    root = tmp_path / "data"
    _save(root / "a.png")
    _save(root / "real" / "b.png")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "loop")
    os.symlink("../real", root / "sub" / "again")
    os.symlink("real", root / "0_link_first")  # sorts before the folder it names
    outside = _save(tmp_path / "elsewhere" / "c.png").parent
    os.symlink(outside, root / "linked")  # a link to a folder walked nowhere else: followed
    with caplog.at_level("WARNING", logger="fastdino.data"):
        images, shards = walk_folder(root)
    assert sorted(images) == [str(root / "a.png"), str(root / "linked" / "c.png"),
                              str(root / "real" / "b.png")]
    assert shards == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    for link in ("0_link_first", "sub/again", "sub/loop"):
        assert str(root / link) in warnings[0]
    assert ImageFolderUnlabeled(root=root).paths == sorted(images)
