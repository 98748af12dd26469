"""Labelled images from the same sources the trainer reads (sources.py), for the kNN / linear
probes: folders of class folders, WebDataset tar shards with `.cls` members, patterns of them.

    samples, classes = labelled_images("/data/imagenet-val-{00..06}.tar")  # [(name, class id)]
    location = locate(name)   # a file path, or the tar member a `<shard>/<member>` name names

Labels: an image inside a tar shard takes the text of the `.cls` member with its WebDataset key
(the member name up to the first dot of its file name: `n0144/abc.JPEG` -> `n0144/abc.cls`); a
loose image file takes the name of its folder (`<root>/<class>/<image>`, as the labelled folders
of the probes). An image without a label is an error that names it. Class ids are the sorted
labels (numerically when every label is an integer, as ImageNet's `.cls` 0..999).
"""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile

from fastdino.data.sources import Location, find_images, index_shard_cached, member_reference


def wds_key(member_name: str) -> str:
    """WebDataset's sample key of a member: its path up to the first dot of the file name."""
    head, base = posixpath.split(member_name)
    return posixpath.join(head, base.split(".", 1)[0])


@functools.lru_cache(maxsize=64)
def shard_labels(shard: str) -> dict[str, str]:
    """{sample key: label text} of the `.cls` members of one shard."""
    out = {}
    with tarfile.open(shard, mode="r:") as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(".cls"):
                f = tar.extractfile(m)
                out[wds_key(posixpath.normpath(m.name).lstrip("/"))] = f.read().decode().strip()
    return out


def label_of(name: str) -> str:
    ref = member_reference(name)
    if ref is None:  # a loose file: its folder is its class
        return os.path.basename(os.path.dirname(name))
    shard, member = ref
    label = shard_labels(shard).get(wds_key(member))
    if label is None:
        raise ValueError(f"{name}: its shard has no {wds_key(member)}.cls member, so the image "
                         "has no label (labelled shards hold <key>.cls beside <key>.jpg)")
    return label


def labelled_images(spec: str) -> tuple[list[tuple[str, str]], list[str]]:
    """([(image name, label text)] sorted by name, sorted labels) of a source spec."""
    found = find_images(spec, what="--train-data / --val-data")
    samples = [(name, label_of(name)) for name, _ in found]
    labels = sorted({lab for _, lab in samples}, key=_label_order)
    return samples, labels


def _label_order(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


@functools.lru_cache(maxsize=64)
def _shard_table(shard: str) -> dict[str, Location]:
    return dict(index_shard_cached(shard))


def locate(name: str) -> Location:
    """The location of an image name: the file itself, or the shard member it names."""
    if os.path.isfile(name):
        return name
    ref = member_reference(name)
    if ref is None:
        raise FileNotFoundError(f"{name} is neither a file nor a member of a tar shard")
    loc = _shard_table(ref[0]).get(name)
    if loc is None:
        raise FileNotFoundError(f"{ref[0]} holds no image member {ref[1]!r}")
    return loc
