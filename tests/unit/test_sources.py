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


def test_compressed_tars_in_a_folder_are_left_out_with_a_warning(tmp_path, caplog):
    """A .tar.gz / .tgz in a data folder was dropped silently."""
    _save(tmp_path / "a.png")
    for name in ("x.tar.gz", "sub/y.tgz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\x1f\x8b")
    with caplog.at_level("WARNING", logger="fastdino.data"):
        assert ImageFolderUnlabeled(root=tmp_path).paths == [str(tmp_path / "a.png")]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "2 compressed tar file(s)" in warnings[0] and "uncompressed" in warnings[0]


def test_file_list_lines_left_out_are_said(tmp_path, caplog):
    """Lines naming a folder or a file of another extension were dropped without a word."""
    img = _save(tmp_path / "a.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    lst = tmp_path / "list.txt"
    lst.write_text("folder\na.png\nnotes.txt\n")
    with caplog.at_level("WARNING", logger="fastdino.data"):
        assert ImageFolderUnlabeled(file_list=lst).paths == [str(img)]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "2 line(s) left out" in warnings[0] and str(tmp_path / "folder") in warnings[0]


def test_file_list_stats_only_lines_that_may_be_members(tmp_path, monkeypatch):
    """A list of image files is not stat'ed line by line (millions of stats on a network file
    system); only a line holding '.tar/' may be a shard's member and is checked. Missing files
    stay in the list (skipped and counted when read), as before."""
    import tarfile

    from fastdino.data import sources

    shard = tmp_path / "s.tar"
    member = _save(tmp_path / "m" / "0.png")
    with tarfile.open(shard, "w") as tar:
        tar.add(member, arcname="0.png")
    lines = [str(tmp_path / f"img{i}.jpg") for i in range(50)] + [f"{shard}/0.png"]
    stats = []
    real_isfile = os.path.isfile

    def counting_isfile(path):
        stats.append(path)
        return real_isfile(path)

    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources.os.path, "isfile", counting_isfile)
    found = sources.find_listed_images(lines)
    assert [name for name, _ in found] == lines
    assert isinstance(found[-1][1], sources.Member) and found[0][1] == lines[0]
    assert not any(p.startswith(str(tmp_path / "img")) for p in stats)


def test_shard_whose_name_is_not_utf8(tmp_path, monkeypatch):
    """A shard named b'caf\\xe9.tar': its index cache key hashed the name's strict UTF-8 encoding
    (UnicodeEncodeError); its members are named and read like any other shard's."""
    import tarfile

    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    member = _save(tmp_path / "m" / "0.png")
    shard = os.fsdecode(os.path.join(os.fsencode(tmp_path / "d"), b"caf\xe9.tar"))
    os.mkdir(tmp_path / "d")
    with tarfile.open(shard, "w") as tar:
        tar.add(member, arcname="0.png")
    for _ in range(2):  # indexed, then read through the cache
        ds = ImageFolderUnlabeled(root=tmp_path / "d")
        assert ds.paths == [f"{shard}/0.png"] and ds.read(0) == member.read_bytes()
