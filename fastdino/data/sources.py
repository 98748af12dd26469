"""Where the training images come from: folders, WebDataset-style tar shards, patterns of them.

A *source* is
- a folder: its images and the images inside its `.tar` shards, recursively (symlinked folders
  followed, each folder once: a link loop or a second link to a folder is not followed);
- an image file;
- an uncompressed `.tar` shard: its members with an image extension. WebDataset writes a sample
  as `<key>.jpg` beside `<key>.json`, `<key>.cls`, ...; those other members are ignored.
`data.root` is one source or a pattern of them: shell globs (`/data/**/*.tar`, `**` recursive) and
WebDataset's brace notation (`train-{0000..0099}.tar`, `{a,b}`), expanded braces first.

Every image has a name, the file's path or `<shard>/<member name>`, and a location (the path, or
the shard with the member's data offset and size). The dataset's order is the sorted names: the
same index names the same image on every rank and every run, whatever order the file system
or the glob lists things in. A member is read with one seek and one read: tar stores its
members uncompressed and contiguous, so shards need no extraction and no open state (forked
loader workers share nothing). Compressed tars (`.tar.gz`, ...) cannot be read at an offset and
are rejected with that reason; a shard that cannot be indexed (corrupt, unreadable) is skipped
with a warning, as unreadable images are.

Indexing reads each member's 512-byte tar header (the data is seeked over): ~30k images/s with
tarfile on one core (measured: 20 shards of 2,000 images + 2,000 .json members, 1.4 s), i.e. ~45 s
for ImageNet-1k's 1.28M images. So each shard's index is cached, once computed, in
$FASTDINO_CACHE/tar_index/ (default ~/.cache/fastdino), keyed by the shard's absolute path,
size and modification time: a restarted or resumed run reads the cache instead. A cache that
cannot be written is not an error (the run indexes again next time). Progress is logged on long
indexing. The training dataset is built on every rank at once (`ranks=(rank, world)`): the ranks
first index every world-th shard each into the cache, meet at a barrier, then read all shards
through it, so a first run indexes W times faster instead of W times over (a cache a rank cannot
see, e.g. node-local on another node, costs that rank its own indexing: never a wrong table).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fastdino.data.sample_data import cache_dir

logger = logging.getLogger("fastdino.data")

# .jfif is a JPEG under the name some browsers save it with
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff")
# image formats a folder may hold that are not read here: a folder walk leaving them out says so
# as a warning (other files, notes / labels / sidecars, only at info level)
OTHER_IMAGE_EXTENSIONS = (".gif", ".jp2", ".j2k", ".jpx", ".heic", ".heif", ".avif",
                          ".jxl", ".ico", ".tga", ".ppm", ".pgm", ".pbm", ".pnm", ".psd",
                          ".dng", ".cr2", ".nef", ".arw", ".exr", ".hdr", ".dcm", ".dicom",
                          ".nii", ".svg")
SHARD_EXTENSION = ".tar"
COMPRESSED_TAR_EXTENSIONS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz",
                             ".tar.zst", ".tar.lz4")
_PATTERN_CHARS = re.compile(r"[*?\[{]")
_MEMBER_HINT = re.compile(re.escape(SHARD_EXTENSION) + "/", re.IGNORECASE)  # "<shard>.tar/..."
_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Member:
    """An image stored inside an uncompressed tar shard: bytes [offset, offset + size)."""

    shard: str
    offset: int
    size: int


Location = str | Member  # a file path, or a tar member


def is_apple_double(name: str) -> bool:
    """A macOS AppleDouble file (`._photo.jpg`: the resource fork and metadata a Mac writes beside
    each file on a non-Mac disk, in zips' __MACOSX/ and in tars made with macOS tar): never an
    image, whatever its extension."""
    return os.path.basename(name).startswith("._")


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_apple_double(name)


def is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSION)


def _is_compressed_tar(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_TAR_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's (and bash's) brace expansion: `a{0..2}b` -> a0b a1b a2b, `{08..10}` keeps the
    zero padding (08 09 10), `{x,y}` alternatives, nested and repeated groups; text without
    braces is returned as is."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in the pattern {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        a, b = numeric.groups()
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]
    else:
        options, depth, piece = [], 0, ""
        for ch in body:  # split on the commas at this brace level
            if ch == "," and depth == 0:
                options.append(piece)
                piece = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            piece += ch
        options.append(piece)
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def index_shard(path: str) -> list[tuple[str, Member]]:
    """(name, location) of the image members of one uncompressed tar shard, in archive order.
    Raises ValueError for a compressed tar, OSError / tarfile.TarError for an unreadable one."""
    if _is_compressed_tar(path):
        raise ValueError(f"{path!r} is a compressed tar: its members cannot be read at an offset; "
                         "use uncompressed .tar shards (as WebDataset writes them)")
    out = []
    with tarfile.open(path, mode="r:") as tar:  # "r:": no transparent decompression
        for m in tar:
            if m.isfile() and is_image(m.name):
                # "./a.jpg" (tar run inside the folder) is named "a.jpg", so that a name
                # round-trips through a file list (`find_listed_images`)
                name = posixpath.normpath(m.name).lstrip("/")
                out.append((f"{path}/{name}", Member(path, m.offset_data, m.size)))
    return out


def _index_cache_file(path: str) -> tuple[Path, list]:
    """The cache file of a shard and the key it must hold: [size, mtime_ns] of the shard and the
    image extensions indexed (a shard indexed before .tif was an image extension lists no .tif
    member: that table is stale, not a cache hit)."""
    st = os.stat(path)
    digest = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()  # (any file name)
    return (cache_dir() / "tar_index" / f"{digest}.json",
            [st.st_size, st.st_mtime_ns, list(IMAGE_EXTENSIONS)])


def index_shard_cached(path: str) -> list[tuple[str, Member]]:
    """`index_shard` through the on-disk cache (see the module docstring)."""
    file, key = _index_cache_file(path)
    try:
        cached = json.loads(file.read_text())
        if cached["path"] == os.path.abspath(path) and cached["key"] == key:
            return [(f"{path}/{name}", Member(path, off, size))
                    for name, off, size in cached["members"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, another shard's, or unreadable: index the shard
    members = index_shard(path)
    record = {"path": os.path.abspath(path), "key": key,
              "members": [[name[len(path) + 1:], m.offset, m.size] for name, m in members]}
    tmp = None
    try:  # written whole and renamed into place: concurrent ranks never read half a file
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=file.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            json.dump(record, f)
        os.replace(tmp, file)
    except OSError as e:
        logger.debug("tar index cache not written for %s (%s)", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return members


def read_bytes(location: Location) -> bytes:
    """The encoded image at `location`; raises OSError if it cannot be read whole."""
    if isinstance(location, str):
        with open(location, "rb") as f:
            return f.read()
    with open(location.shard, "rb") as f:
        f.seek(location.offset)
        data = f.read(location.size)
    if len(data) != location.size:
        raise OSError(f"tar member at byte {location.offset} of {location.shard!r}: read "
                      f"{len(data)} of {location.size} bytes (truncated shard)")
    return data


class _Progress:
    """Logs the shard indexing every _LOG_EVERY_S seconds (silent when it is quick)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.indexed, self.images = total, 0, 0, 0
        self.t0 = self.last = time.monotonic()

    def step(self, images: int, ok: bool = True) -> None:
        self.done += 1
        self.indexed += ok
        self.images += images
        now = time.monotonic()
        if now - self.last >= _LOG_EVERY_S:
            self.last = now
            logger.info("indexing tar shards: %d / %d (%d images, %.0f s)", self.done,
                        self.total, self.images, now - self.t0)


def log_left_out(where: str, files: list[str]) -> None:
    """One line for the files a listing left out for their extension: a warning when some look
    like images of a format not read here (.gif, .jp2, ...: probably meant as data), else info
    (notes, labels, sidecars). Counted per extension; one example."""
    if not files:
        return
    images = [f for f in files if f.lower().endswith(OTHER_IMAGE_EXTENSIONS)]
    by_ext = Counter(os.path.splitext(f)[1].lower() or "(none)" for f in files).most_common()
    kinds = ", ".join(f"{n} {ext}" for ext, n in by_ext[:6]) + (", ..." if len(by_ext) > 6 else "")
    logger.log(logging.WARNING if images else logging.INFO,
               "%s: left out %d file(s) whose extension is not an image type read here (%s), "
               "e.g. %s; allowed: %s (case-insensitive)%s", where, len(files), kinds,
               min(images or files), ", ".join(IMAGE_EXTENSIONS),
               "; convert those images (e.g. to .png) to train on them" if images else "")


def walk_folder(folder: str | Path, left_out: list[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """(image files, tar shards) under `folder`, recursively (symlinked folders followed), in
    walk order with sorted subfolders; compressed tars are left out with a warning. Each folder
    is walked once: a symlink to a folder already walked (a loop such as `sub/loop -> ..`, or a
    second link to the same folder) is not followed, with one warning naming the links skipped,
    so no image is counted twice. Files of other extensions are appended to `left_out`, or, when
    it is None, said here in one line (`log_left_out`): a caller walking many folders gathers
    them and says them once."""
    images, shards, compressed, others, apple = [], [], [], [], []
    visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the folders walked
    repeats: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        if not visited:
            st = os.stat(dirpath)
            visited.add((st.st_dev, st.st_ino))
        dirnames.sort()
        keep = set()
        # a folder and a link to it side by side: the folder is walked, under its own name
        for d in sorted(dirnames, key=lambda d: os.path.islink(os.path.join(dirpath, d))):
            path = os.path.join(dirpath, d)
            try:
                st = os.stat(path)
            except OSError:  # vanished since listed: os.walk would not list its files either
                continue
            if (st.st_dev, st.st_ino) in visited:
                repeats.append(path)
                continue
            visited.add((st.st_dev, st.st_ino))
            keep.add(d)
        dirnames[:] = [d for d in dirnames if d in keep]
        for f in filenames:
            if is_apple_double(f):
                apple.append(os.path.join(dirpath, f))
            elif is_image(f):
                images.append(os.path.join(dirpath, f))
            elif is_shard(f):
                shards.append(os.path.join(dirpath, f))
            elif _is_compressed_tar(f):
                compressed.append(os.path.join(dirpath, f))
            else:
                others.append(os.path.join(dirpath, f))
    if left_out is None:
        log_left_out(str(folder), others)
    else:
        left_out += others
    if apple:  # (each was an unreadable image, a warning apiece, and ended eval)
        logger.info("%s: left out %d macOS AppleDouble file(s) (._*: metadata, not images), "
                    "e.g. %s", folder, len(apple), apple[0])
    if compressed:
        logger.warning("%s: %d compressed tar file(s) left out (e.g. %s): shards must be "
                       "uncompressed .tar, whose members are read in place at an offset; "
                       "decompress them (e.g. gunzip x.tar.gz) to train on their images",
                       folder, len(compressed), compressed[0])
    if repeats:
        logger.warning("%s: %d symlinked folder(s) lead to folders already walked (a link loop, "
                       "or a second link to one folder) and were not followed, so that no image "
                       "is counted twice: %s", folder, len(repeats),
                       ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else ""))
    return images, shards


def _classify(path: str, what: str, left_out: list[str] | None = None
              ) -> tuple[list[str], list[str]]:
    """(image files, shards) named by one existing path; raises for anything else. A folder's
    files of other extensions go to `left_out` (see walk_folder)."""
    if os.path.isdir(path):
        return walk_folder(path, left_out)
    if is_image(path):
        return [path], []
    if is_shard(path) or _is_compressed_tar(path):
        return [], [path]
    raise ValueError(f"{what} {path!r} is neither a folder, an image "
                     f"({', '.join(IMAGE_EXTENSIONS)}, case-insensitive) nor an uncompressed "
                     f"{SHARD_EXTENSION} shard")


Ranks = tuple[int, int]  # (rank, world size) of a dataset that every rank builds together


def _share_indexing(shards: list[str], ranks: Ranks | None) -> None:
    """Collective over the ranks of `ranks` (module docstring): this rank caches its share."""
    from fastdino import dist as fdist

    if ranks is None or ranks[1] <= 1 or not fdist.is_enabled() or not shards:
        return
    rank, world = ranks
    for shard in shards[rank::world]:
        try:
            index_shard_cached(shard)
        except (OSError, tarfile.TarError):
            pass  # warned once, by every rank, in the pass that reads the table
    fdist.barrier()


def _index(images: list[str], shards: list[str], ranks: Ranks | None = None
           ) -> list[tuple[str, Location]]:
    found: dict[str, Location] = {p: p for p in images}
    shards = sorted(set(shards))
    _share_indexing(shards, ranks)
    progress = _Progress(len(shards))
    for shard in shards:
        try:
            members = index_shard_cached(shard)
        except (OSError, tarfile.TarError) as e:
            logger.warning("skipping unreadable tar shard %s (%s: %s)", shard, type(e).__name__, e)
            progress.step(0, ok=False)
            continue
        found.update(members)  # a name stored twice in one tar: the later copy, as tar extracts
        progress.step(len(members))
    if shards:  # said once, so that shards met in a folder walk are not a surprise
        logger.info("%d images inside %d tar shards (of %d images in all)", progress.images,
                    progress.indexed, len(found))
    return sorted(found.items())


def find_images(spec: str | Path, what: str = "data.root", ranks: Ranks | None = None,
                absolute: bool = False) -> list[tuple[str, Location]]:
    """(name, location) of every image that `spec` (a source or a pattern of sources) names,
    sorted by name. Raises FileNotFoundError when a path or pattern names nothing that exists.
    `ranks`: (rank, world) when every rank calls this together (shared first indexing).
    `absolute`: every piece of the pattern made absolute (after the brace expansion: `{a,/b}`
    is two paths), so the names are too."""
    images, shards, left_out = [], [], []
    for piece in expand_braces(str(spec)):
        piece = os.path.expanduser(piece)  # `~` of each alternative, as the shell does
        if absolute:
            piece = os.path.abspath(piece)
        if _PATTERN_CHARS.search(piece):
            paths = sorted(glob.glob(piece, recursive=True))
            if not paths:
                raise FileNotFoundError(f"{what} pattern {piece!r} matches no file or folder")
            # a pattern may also match other files (notes, labels): those are not sources
            left_out += [m for m in paths if os.path.isfile(m) and not (
                is_image(m) or is_shard(m) or _is_compressed_tar(m))]
            paths = [m for m in paths if os.path.isdir(m) or is_image(m) or is_shard(m)
                     or _is_compressed_tar(m)]
        elif not os.path.exists(piece):
            raise FileNotFoundError(f"{what} {piece!r} does not exist")
        else:
            paths = [piece]
        for path in paths:
            i, s = _classify(path, what, left_out)
            images += i
            shards += s
    log_left_out(f"{what} {str(spec)!r}", left_out)  # once for the whole spec
    return _index(images, shards, ranks)


def member_reference(line: str) -> tuple[str, str] | None:
    """(shard, member name) when `line` names an image inside an existing tar shard, as the
    dataset names them (`<shard>/<member>`, e.g. in a file list written by `curate sample`)."""
    for m in re.finditer(re.escape(SHARD_EXTENSION) + "/", line, flags=re.IGNORECASE):
        shard = line[:m.end() - 1]
        if os.path.isfile(shard):
            return shard, line[m.end():]
    return None


def find_listed_images(lines: list[str], ranks: Ranks | None = None
                       ) -> list[tuple[str, Location]]:
    """(name, location) of the images of a file list's entries, in the list's order: image files,
    shards (expanded in place, their members sorted by name) and single members of shards
    (`<shard>/<member>`); other entries (folders, other extensions) are left out, with one
    warning. A listed image file that does not exist is kept (it is skipped, and counted, when
    read); a listed member that its shard does not hold is dropped with a warning (it has no
    location). `ranks`: as find_images."""
    # one pass classifies the entries, so that every shard the list names can be indexed once,
    # shared by the ranks, before the second pass builds the table. An image line is stat'ed
    # only when it may be a shard's member (holds ".tar/"): a list of millions of files is not
    # stat'ed line by line on a network file system
    entries: list[tuple[str, str, tuple[str, str] | None]] = []  # (line, kind, (shard, member))
    ignored: list[str] = []
    for path in lines:
        if is_shard(path) or _is_compressed_tar(path):
            entries.append((path, "shard", None))
        elif is_image(path):
            ref = (member_reference(path) if _MEMBER_HINT.search(path) and not
                   os.path.isfile(path) else None)
            entries.append((path, "file" if ref is None else "member", ref))
        else:
            ignored.append(path)
    if ignored:
        logger.warning("file list: %d line(s) left out that are neither an image (%s, "
                       "case-insensitive), a %s shard nor a shard's member, e.g. %s (a folder "
                       "is not walked in a file list: give it as data.root)", len(ignored),
                       ", ".join(IMAGE_EXTENSIONS), SHARD_EXTENSION, ignored[0])
    named = {path for path, kind, _ in entries if kind == "shard"}
    named |= {ref[0] for _, kind, ref in entries if kind == "member"}
    _share_indexing(sorted(named), ranks)
    out: list[tuple[str, Location]] = []
    shards: dict[str, dict[str, Member]] = {}
    for path, kind, ref in entries:
        if kind == "file":  # (a missing one is kept: skipped, and counted, when read)
            out.append((path, path))
        elif kind == "shard":  # (a missing one: warned and skipped)
            out += _index([], [path])
        else:
            shard, name = ref
            if shard not in shards:
                shards[shard] = {n[len(shard) + 1:]: loc for n, loc in _index([], [shard])}
            loc = shards[shard].get(posixpath.normpath(name))
            if loc is None:
                logger.warning("file list names %s, which %s does not hold: left out", path,
                               shard)
                continue
            out.append((path, loc))
    return out
