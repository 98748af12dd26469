"""Where the dense probes' (image, target) pairs come from: the standard benchmarks' own folder
layouts as they are downloaded, list files, or our plain folders (SPEC.md §6; USERS.md §10: the
official dense evals needed mmseg and a restructured copy of each dataset).

`fastdino eval seg|depth --data ROOT` looks at ROOT and takes the first layout that fits (what
ROOT holds -> the protocol the layout brings; a flag given by the user wins):

- lists (--train-list and --val-list given): any files, one "image target" line per pair.
- ade20k: images/{training,validation}/*.jpg + annotations/{training,validation}/*.png, in ROOT
  or ROOT/ADEChallengeData2016 -> 150 classes, reduce_zero_label.
- voc2012: JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt, in ROOT,
  ROOT/VOC2012 or ROOT/VOCdevkit/VOC2012 -> 21 classes, 255 = ignore (the object borders).
- cityscapes: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine/{train,val}/<city>/
  *_gtFine_labelTrainIds.png (cityscapesScripts' csCreateTrainIdLabelImgs writes them) ->
  19 classes, 255 = ignore.
- nyu (depth): nyu_train.txt + nyu_test.txt, the official DINOv3 / BTS split lists ("rgb depth
  focal" per line, paths relative to ROOT) -> depth PNGs in mm (scale 1000), Eigen crop.
- folders: images/ + masks/ (seg) or depth/ (depth), or train/ + val/ each holding them
  (dense.py; seg.py and depth.py describe the files).

reduce_zero_label (ADE20K, as mmseg and the official DINOv3 seg eval): id 0 ("other") is ignored
and ids 1..150 become 0..149; 255 stays ignored. List files: one pair per line, whitespace
separated, paths relative to ROOT (a leading "/" is dropped, as the official NYU reader does,
unless the path exists as an absolute one),
further columns ignored (BTS' focal length), blank lines and "#" comments skipped, a target of
"None" (BTS' KITTI lists: no ground truth) skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fastdino.eval import dense, depth, seg
from fastdino.eval.dense import Pairs

logger = logging.getLogger("fastdino.eval")


@dataclass(frozen=True)
class DenseData:
    """One dense benchmark: its pairs and the protocol its layout implies (None = not implied:
    the probe's own default or the user's flag applies)."""

    layout: str
    train: Pairs
    val: Pairs
    n_classes: int | None = None
    reduce_zero_label: bool | None = None
    depth_scale: float | None = None
    eigen_crop: bool | None = None


# ------------------------------------------------------------------------------------------ lists
def _require_files(pairs: Pairs, where: str, what: str) -> None:
    """FileNotFoundError "<where>: <n> <what>: <the first 5>" unless every file of `pairs`
    exists."""
    missing = [p for pair in pairs for p in pair if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{where}: {len(missing)} {what}: " + ", ".join(missing[:5]))


def _resolve(entry: str, root: Path) -> str:
    """An existing absolute path as written, else relative to root (leading "/" dropped)."""
    if entry.startswith("/") and Path(entry).is_file():
        return entry
    return str(root / entry.lstrip("/"))


def read_list(path: str | Path, root: str | Path) -> Pairs:
    """(image, target) pairs of a list file (module docstring), every file checked to exist."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"list file {str(path)!r} does not exist")
    pairs, no_target = [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        cols = line.split()
        if not cols or cols[0].startswith("#"):
            continue
        if len(cols) < 2:
            raise ValueError(f"{path}:{n}: {line.strip()!r} has one column: allowed are lines "
                             "'image target [more columns, ignored]'")
        if cols[1] == "None":
            no_target += 1
            continue
        pairs.append(tuple(_resolve(c, root) for c in cols[:2]))
    if no_target:
        logger.info("%s: %d line(s) without a target ('None') skipped", path, no_target)
    _require_files(pairs, f"{path}", f"listed file(s) do not exist under {str(root)!r}")
    if not pairs:
        raise ValueError(f"list file {str(path)!r} holds no (image, target) line")
    return pairs


def _lists(root: Path, train_list: str | None, val_list: str | None) -> DenseData | None:
    if (train_list is None) != (val_list is None):
        raise ValueError("give both --train-list and --val-list, or neither")
    if train_list is None:
        return None
    return DenseData("lists", read_list(train_list, root), read_list(val_list, root))


# ------------------------------------------------------------------------------------------ seg
def _first_dir(root: Path, candidates: tuple[str, ...], marker: str) -> Path | None:
    return next((root / c for c in candidates if (root / c / marker).is_dir()), None)


def _ade20k(root: Path) -> DenseData | None:
    base = _first_dir(root, ("", "ADEChallengeData2016"), "annotations/training")
    if base is None or not (base / "images" / "training").is_dir():
        return None
    split = {s: dense.stem_pairs(base / "images" / s, base / "annotations" / s, (".png",))
             for s in ("training", "validation")}
    return DenseData("ade20k", split["training"], split["validation"], n_classes=150,
                     reduce_zero_label=True)


def _voc(root: Path) -> DenseData | None:
    base = _first_dir(root, ("", "VOC2012", "VOCdevkit/VOC2012"), "SegmentationClass")
    if base is None:
        return None

    def split(name: str) -> Pairs:
        stems = (base / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()
        pairs = [(str(base / "JPEGImages" / f"{s}.jpg"), str(base / "SegmentationClass" /
                                                           f"{s}.png")) for s in stems]
        _require_files(pairs, f"{base}", f"file(s) of ImageSets/Segmentation/{name}.txt do "
                       "not exist")
        return pairs

    return DenseData("voc2012", split("train"), split("val"), n_classes=21)


def _cityscapes(root: Path) -> DenseData | None:
    if not ((root / "leftImg8bit" / "train").is_dir() and (root / "gtFine" / "train").is_dir()):
        return None

    def split(name: str) -> Pairs:
        images = sorted((root / "leftImg8bit" / name).glob("*/*_leftImg8bit.png"))
        pairs = [(str(p), str(root / "gtFine" / name / p.parent.name /
                              p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")))
                 for p in images]
        missing = [m for _, m in pairs if not Path(m).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{root}/gtFine/{name}: {len(missing)} *_gtFine_labelTrainIds.png file(s) missing "
                f"(e.g. {missing[0]}): cityscapesScripts' csCreateTrainIdLabelImgs writes them "
                "from the labelIds")
        if not pairs:
            raise FileNotFoundError(f"{root}/leftImg8bit/{name} holds no *_leftImg8bit.png")
        return pairs

    return DenseData("cityscapes", split("train"), split("val"), n_classes=19)


def seg_data(root: str | Path, train_list: str | None = None,
             val_list: str | None = None) -> DenseData:
    """The segmentation benchmark at `root` (module docstring), its layout logged."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {str(root)!r} is not a folder")
    data = (_lists(root, train_list, val_list) or _ade20k(root) or _voc(root)
            or _cityscapes(root))
    if data is None:
        data = DenseData("folders", *seg.seg_splits(root))
    logger.info("seg data %s: %s layout, %d train / %d val pairs", root, data.layout,
                len(data.train), len(data.val))
    return data


# ------------------------------------------------------------------------------------------ depth
def _nyu(root: Path) -> DenseData | None:
    if not ((root / "nyu_train.txt").is_file() and (root / "nyu_test.txt").is_file()):
        return None
    return DenseData("nyu", read_list(root / "nyu_train.txt", root),
                     read_list(root / "nyu_test.txt", root), depth_scale=1000.0, eigen_crop=True)


def depth_data(root: str | Path, train_list: str | None = None,
               val_list: str | None = None) -> DenseData:
    """The depth benchmark at `root` (module docstring), its layout logged."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {str(root)!r} is not a folder")
    data = _lists(root, train_list, val_list) or _nyu(root)
    if data is None:
        data = DenseData("folders", *depth.depth_splits(root))
    logger.info("depth data %s: %s layout, %d train / %d val pairs", root, data.layout,
                len(data.train), len(data.val))
    return data
