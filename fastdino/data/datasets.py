"""Image readers: unlabelled images for training, or a labelled folder for kNN evaluation.

`ImageFolderUnlabeled` takes every image a source names (a folder, recursively; tar shards; glob
and brace patterns of them: `sources.py`) or a text file lists, keeps the names whose extension is
one of IMAGE_EXTENSIONS (case-insensitive) and sorts them, so index i names the same image on
every rank and every run (a file list keeps its own order). An image that cannot be decoded is
never fatal: `load(i)` returns the next readable one in that order (i+1, i+2, ... wrapping
around), which is the same whichever process asks; the bad name is counted in `skipped` and
logged once per process.

Reduced JPEG decoding (data.jpeg_draft): `decode_rgb(..., draft=f)` decodes a JPEG of W x H at
1/k of its size, k in 1, 2, 4, 8 (libjpeg's DCT scaling, Pillow's `Image.draft`: several times
faster than the full decode), and records (W, H, k) in the image's `info[DRAFT_INFO]`: the crops
are planned on the full size (`full_size`), their boxes scaled by 1/k (`draft_of`). `f(W, H)` is
the crops' or the eval transform's room (how many times the smallest crop's side exceeds its
output side); k is the largest reduction within it (`_draft`: less for non-square chroma
subsampling), so no crop gets fewer pixels than it is resized to.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastdino.config import WHITE_LEVEL_ALLOWED, white_level_ok
from fastdino.data.packed import PackedLocations, PackedStrings
from fastdino.data.sources import (
    IMAGE_EXTENSIONS,
    Location,
    find_images,
    find_listed_images,
    log_left_out,
    read_bytes,
    walk_folder,
)

logger = logging.getLogger("fastdino.data")

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# image.info key of a JPEG decoded reduced: (full width, full height, reduction k). PIL copies
# `info` through convert / crop / copy, so it travels with the decoded image to the transforms.
DRAFT_INFO = "fastdino_jpeg_draft"
JPEG_REDUCTIONS = (8, 4, 2)  # libjpeg's DCT scalings Pillow's draft offers (and 1: none)
# what PIL names a JPEG: MPO is a JPEG with more pictures appended (many phone and camera photos:
# depth maps, previews), the first one the image
_DRAFT_FORMATS = ("JPEG", "MPO")


def draft_of(img: Image.Image) -> tuple[int, int, int]:
    """(full width, full height, reduction k) of a decoded image: k = 1 (its own size) unless
    `decode_rgb` decoded it reduced. Pixel edges map exactly: x in the full image = k * x here
    (libjpeg's 1/k IDCT of each 8 x 8 block; the last pixel of a side not divisible by k also
    covers the block padding, so the side is ceil(W / k))."""
    return img.info.get(DRAFT_INFO, (*img.size, 1))


def full_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) of the file's full decode: what crop plans and resizes are drawn and
    computed from, whether or not it was decoded reduced."""
    return draft_of(img)[:2]


def chroma_factor(img: Image.Image) -> int:
    """How many times a reduced decode of this JPEG (PIL opened) must be smaller than the luma
    alone allows, so its chroma keeps the resolution a full decode gives a crop: libjpeg(-turbo)
    scales chroma by square IDCTs only, so with non-square subsampling (4:2:2, 4:4:0: 2; 4:1:1:
    4) the chroma at 1/k keeps 1/(2k) (1/(4k)) of its full resolution in one direction, where
    4:2:0 and 4:4:4 keep 1/k or more. 1 for greyscale."""
    layers = getattr(img, "layer", None) or []  # (id, h, v, table) sampling per component
    if len(layers) < 2:
        return 1
    mh, mv = max(c[1] for c in layers), max(c[2] for c in layers)
    factor = 1
    for _, h, v, _ in layers:
        rh, rv = mh // max(h, 1), mv // max(v, 1)  # its subsampling in each direction
        factor = max(factor, max(rh, rv) // max(min(rh, rv), 1))
    return factor


def largest_reduction(room: float) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) not above `room`: how many times the
    smallest crop's side in the full image exceeds the side it is resized to."""
    return next((k for k in JPEG_REDUCTIONS if room >= k), 1)


def _draft(img: Image.Image, draft) -> int:
    """Set up the reduced decode of an opened (not yet loaded) JPEG within the room `draft(W, H)`
    (module docstring); the reduction Pillow took (1 = none: another format, too little room, or
    draft declined)."""
    if draft is None or img.format not in _DRAFT_FORMATS:
        return 1
    w, h = img.size
    k = largest_reduction(draft(w, h) / chroma_factor(img))
    if k <= 1:
        return 1
    # Pillow takes the largest of 8, 4, 2, 1 not above min(W // w', H // h'): for (W // k,
    # H // k) that is k itself (W // (W // k) lies in [k, 2k))
    img.draft(None, (max(1, w // k), max(1, h // k)))
    took = next((s for s in (1, 2, 4, 8) if img.size == (-(-w // s), -(-h // s))), None)
    if took is None or took > k:  # (not Pillow 13's rule: never reduce more than allowed)
        raise RuntimeError(f"Pillow's JPEG draft of {w} x {h} to 1/{k} gave {img.size}")
    return took


def list_images(root: str | Path, left_out: list[str] | None = None) -> list[str]:
    """Sorted image files under the folder `root` (recursive, symlinked folders followed; not the
    members of tar shards: for labelled evaluation folders). Files of other extensions: appended
    to `left_out`, or said in one log line when it is None (`sources.walk_folder`)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder")
    return sorted(walk_folder(root, left_out)[0])


def read_file_list(file_list: str | Path) -> list[str]:
    """Image paths from a text file, one per line (blank lines and '#' comments ignored);
    relative paths are taken relative to the list's folder."""
    file_list = Path(file_list)
    if not file_list.is_file():
        raise FileNotFoundError(f"file list {str(file_list)!r} does not exist")
    paths = []
    for line in file_list.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        paths.append(str(p if p.is_absolute() else file_list.parent / p))
    return paths


# a 16-bit image whose maximum is at most this uses at most 14 of its bits: scaled from
# 0..65535 it trains on 64 grey levels or fewer (a 12-bit one on 16), which is worth a warning
SHALLOW_16BIT_MAX = 16383
_shallow_warned = False  # the warning below, once per process (each loader worker says it once)
_said: set[str] = set()  # the once-per-process notes about 16-bit data read at 8 bits, said


# the version of what a white level does to pixels: 2 since 16-bit RGB TIFFs are read at full
# depth (f34746f; version 1 took PIL's high byte of them), 3 since 16-bit palette TIFFs give
# their colormap's colours and 16-bit min-is-white ones are inverted (d2b7522, 551bb78)
WHITE_LEVEL_DECODE = 3


def white_level_key(white_level: int | None) -> dict:
    """What a cache key (eval features, probe heads, curation embeddings) holds of the white
    level: nothing for None (pixels as ever: caches made before white levels stay valid), else
    the level and the decoding's version, so a cache of pixels decoded otherwise is redone."""
    if white_level is None:
        return {}
    return {"white_level": white_level, "white_level_decode": WHITE_LEVEL_DECODE}


def check_white_level(value, key: str = "data.white_level") -> None:
    """ValueError naming `key` unless `value` is None or an integer in 256..65535."""
    if not white_level_ok(value):
        raise ValueError(f"{key} = {value!r} is invalid: allowed is {WHITE_LEVEL_ALLOWED}")


def _warn_shallow_16bit(top: float, name: str | None, level: int | None = None) -> None:
    """Once per process: a 16-bit image (`name`) whose maximum `top` leaves it nearly black
    under the default 0..65535 scaling (`top` becomes 8-bit `level`, by default rounded), and
    the data.white_level that would use its range."""
    global _shallow_warned
    if _shallow_warned or not 0 < top <= SHALLOW_16BIT_MAX:
        return
    _shallow_warned = True
    bits = next(b for b in (10, 12, 14) if top < 2**b)
    logger.warning(
        "16-bit image %s has maximum %d (at most %d of its 16 bits used): scaled from 0..65535 "
        "it becomes 8-bit levels 0..%d only, nearly black. If the data is %d-bit (a camera, "
        "CT / X-ray, microscopy, satellite), set data.white_level=%d (eval / curate embed: "
        "--white-level %d). Said once per process, for the first such image", name or "(bytes)",
        top, bits, round(top * 255 / 65535) if level is None else level, bits, 2**bits - 1,
        2**bits - 1)


def _say_once(key: str, message: str, *args) -> None:
    """A warning said once per process per `key` (each loader worker says it once)."""
    if key not in _said:
        _said.add(key)
        logger.warning(message + ". Said once per process, for the first such image", *args)


# say_bit_depth looks at this many images' headers, spread evenly over the dataset (the first
# included): a folder that starts with an 8-bit quicklook or an unreadable file still has its
# 16-bit data said; it decodes the first deep image of each kind (format, mode, compression) and
# a few more (for the note on values above the white level), headers being cheap and decodes not
_BIT_DEPTH_SAMPLE = 32
_BIT_DEPTH_DECODES = 4


def _depth_kind(images, index: int) -> tuple | None:
    """What kind of image deeper than 8 bits image `index` is, from its header (None: 8 bits,
    nothing to say); a file is opened by its path (a large TIFF is not read whole)."""
    locations = getattr(images, "locations", None)
    location = locations[index] if locations is not None else None
    source = location if isinstance(location, str) else io.BytesIO(images.read(index))
    try:
        with Image.open(source) as img:  # header only
            if img.mode[0] in "IF" or _deep_tiff(img) or _png16_colour(img):
                return (img.format, img.mode, getattr(img, "tag_v2", {}).get(259))
            return None
    except UnidentifiedImageError:
        if isinstance(source, str):
            return ("TIFF?",) if is_tiff(source) else None
        return ("TIFF?",) if is_tiff(source.getvalue()) else None


def say_bit_depth(images) -> None:
    """The once-per-process notes about the bit depth (a 16-bit image that uses at most 14 bits
    under data.white_level null; 16-bit data that is read at 8 bits; values above the white
    level), from the training process, about a sample of `images` (an ImageFolderUnlabeled):
    up to _BIT_DEPTH_SAMPLE headers spread over the dataset, the images among them deeper than
    8 bits (or TIFFs PIL cannot read, which tifffile may) decoded, a few. Said before the
    loaders start their workers: forked ones inherit that it was said (else each says it at
    its first such image); DALI decodes 16-bit PNGs itself and its spawned source workers have
    no logging, so there this is the only place it is said (image 0 alone missed it when it
    was an 8-bit quicklook or unreadable)."""
    n = len(images)
    picks = sorted(set(np.linspace(0, n - 1, min(n, _BIT_DEPTH_SAMPLE)).round().astype(int)))
    kinds, decoded = set(), 0
    for i in picks:
        try:
            kind = _depth_kind(images, int(i))
            # the first _BIT_DEPTH_DECODES deep images whatever their kind (one of a kind could
            # say nothing: a black scan says no shallow data, one within the white level no
            # clipping), then one of each further kind
            if kind is None or (kind in kinds and decoded >= _BIT_DEPTH_DECODES):
                continue
            kinds.add(kind)
            decoded += 1
            images.decode(int(i))  # decode_rgb says what applies
        except _DECODE_ERRORS:
            pass  # an unreadable file: the loader skips and reports it


def silence_shallow_16bit_warning() -> None:
    """This process does not say the bit-depth warnings (a DALI source worker: the training
    process says them)."""
    global _shallow_warned
    _shallow_warned = True
    _said.update(("png16", "tiff_codec", "clip", "own_range"))


def _scale_to_8bit(arr: np.ndarray, kind: str, white_level: int | None = None,
                   name: str | None = None) -> np.ndarray:
    """Integer / float data -> uint8 levels, one range for the whole image (all its channels:
    colours keep their balance). `kind`: "16" (16-bit unsigned: 0..65535, its bit depth),
    "int" (32-bit, or data whose depth is unknown), "float". The rules: `_to_8bit`'s."""
    arr = arr.astype(np.float32)  # (float32: a large image stays affordable)
    finite = np.isfinite(arr)
    values = arr if finite.all() else arr[finite]
    if kind == "16":
        lo, hi = 0.0, float(white_level or 65535)
        if white_level is None and not _shallow_warned and values.size:
            _warn_shallow_16bit(float(values.max()), name)
    elif values.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, top = float(values.min()), float(values.max())
        if lo < 0:
            hi = top
        elif white_level is not None and kind != "float":
            lo, hi = 0.0, float(white_level)
        else:
            lo = 0.0
            hi = (1.0 if kind == "float" and top <= 1 else 255.0 if top <= 255
                  else 65535.0 if top <= 65535 and kind != "float" else top)
            if hi == 65535.0:  # 16-bit data read as 32-bit
                _warn_shallow_16bit(top, name)
        if white_level is not None and (lo < 0 or kind == "float" and hi > 1):
            # the user set a white level that this image does not take: say what it took
            _say_once("own_range", "image %s (%s data, values %g..%g) is scaled from %g..%g, "
                      "not 0..data.white_level=%d: the white level applies to unsigned "
                      "integer data only (signed data: its own min..max; float data: 0..1 when "
                      "it fits, else its range); store such data as unsigned integers to give "
                      "every image one scale", name or "(bytes)",
                      "signed" if lo < 0 else "float", lo, top, lo, hi, white_level)
    if (white_level is not None and (lo, hi) == (0.0, float(white_level)) and "clip" not in _said
            and values.size and float(values.max()) > white_level):
        _say_clipped(values, white_level, name)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    return np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)


def _say_clipped(values: np.ndarray, white_level: int, name: str | None) -> None:
    """Once per process (info: clipping is data.white_level's rule, e.g. bright clouds above
    Sentinel-2's 10000): an image whose values above `white_level` clip to white, how many,
    and the white level of their bits, for a white level set below the data's depth (4095 for
    14-bit data whitens three quarters of its range)."""
    _said.add("clip")
    top = float(values.max())
    bits = next(b for b in (10, 12, 14, 16) if top < 2**b)
    logger.info("image %s has values up to %d, above data.white_level=%d: they clip to white "
                "(%.3g%% of its values). If the data is deeper (%d-bit: white level %d), raise "
                "data.white_level (eval / curate embed: --white-level). Said once per process, "
                "for the first such image", name or "(bytes)", top, white_level,
                100.0 * float(np.count_nonzero(values > white_level)) / values.size, bits,
                2**bits - 1)


def _to_8bit(img: Image.Image, white_level: int | None = None,
             name: str | None = None) -> Image.Image:
    """16-bit, 32-bit and float greyscale (medical, satellite: 16-bit PNG / TIFF, float TIFF) ->
    8-bit "L". PIL's own convert would clip every value above 255 to white. The range mapped to
    0..255: 16-bit modes 0..65535 (their bit depth); "I" / "F", whose range the mode does not
    say, from the data: 0..255 if the data fits, else for "I" 0..65535 if it fits (16-bit data
    read as 32-bit), else 0..max; a float image within 0..1 (reflectance, normalised data) 0..1;
    data with negative values (signed 16-bit CT in Hounsfield units, SAR in dB) min..max. NaN ->
    the range's low end, +-inf -> its ends. Rounded: level = floor(v * 255 / range + 0.5).

    `white_level` (data.white_level; 10/12/14-bit data in 16-bit files): integer images (16-bit
    modes, and "I" without negative values, whatever its maximum) map 0..white_level instead,
    values above it clipping to white; float and signed data keep the rules above. Without it,
    a 16-bit image that uses at most 14 bits is said once per process (`name`: its file).
    A min-is-white TIFF (photometric 0: X-rays as MONOCHROME1) is inverted after the scaling,
    0 white, as PIL inverts an 8-bit one itself but not a 16-bit or float one."""
    kind = "16" if img.mode.startswith("I;16") else "float" if img.mode == "F" else "int"
    levels = _scale_to_8bit(np.asarray(img), kind, white_level, name)
    if img.format == "TIFF" and img.tag_v2.get(262) == _MINISWHITE:
        levels = 255 - levels
    return Image.fromarray(levels, "L")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both orders


def is_tiff(path: str | bytes) -> bool:
    """Whether a file (`path`) or encoded bytes start as a TIFF does."""
    if isinstance(path, bytes):
        return path[:4] in _TIFF_MAGIC
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# TIFFs of several samples per pixel deeper than 8 bits (16-bit RGB from satellites and scientific
# cameras, often 12-bit data or reflectance 0..10000 in uint16). PIL reads 16-bit RGB(A) as its
# high byte (12-bit data becomes levels 0..15, nearly black, and data.white_level could not
# help) and cannot open the others (grey + alpha, 32-bit / signed / float RGB), so tifffile reads
# them at full depth. Decided from PIL's header (photometric, samples, bits), so an ordinary
# 8-bit image is decoded once, by PIL, as before.
# TIFF photometric interpretations tifffile's path takes
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE = 0, 1, 2, 3
_GREY = (_MINISWHITE, _MINISBLACK)
_ALPHA = (1, 2)  # ExtraSamples: associated, unassociated alpha


def _deep_tiff(img: Image.Image) -> bool:
    """A TIFF (header parsed by PIL) that tifffile reads: greyscale or RGB with several samples
    per pixel (alpha or extra bands included), deeper than 8 bits."""
    if img.format != "TIFF":
        return False
    tags = img.tag_v2
    bits = tags.get(258, 1)  # BitsPerSample: one per sample
    bits = bits if isinstance(bits, tuple) else (bits,)
    return (tags.get(262) in (*_GREY, _RGB) and tags.get(277, 1) > 1
            and max(bits, default=1) > 8)


def _png16_colour(img: Image.Image) -> bool:
    """A 16-bit PNG with colour or alpha (header parsed by PIL): PIL reads it at 8 bits, its
    high byte (only 16-bit greyscale has a 16-bit PIL mode)."""
    return (img.format == "PNG" and not img.mode.startswith("I") and bool(img.tile)
            and str(img.tile[0][3]).endswith(";16B"))  # the rawmode, e.g. "RGB;16B"


def _tiff_layout(photometric: int, samples: int, extras: tuple) -> str | None:
    """Why tifffile's path does not take a TIFF of this layout (None: it does). RGB: its R, G, B
    (extra samples, alpha or other bands, dropped, as PIL does for 8-bit RGB TIFFs); greyscale:
    one band, or one band + alpha; palette: one band of indices (16-bit ones: PIL reads 8-bit
    palettes itself). Multi-band greyscale (multispectral, e.g. GDAL's default for 16-bit data)
    has no colours to take: its bands are never silently used as RGB."""
    if photometric == _RGB and samples >= 3 or photometric == _PALETTE and samples == 1:
        return None
    if photometric in _GREY and (samples == 1 or samples == 2 and extras[:1]
                                 and extras[0] in _ALPHA):
        return None
    if photometric in _GREY:
        return (f"{samples} bands of greyscale photometric (multispectral data; not RGB, not "
                "grey + alpha): save 3 of its bands as RGB (photometric RGB; GDAL: -co "
                "PHOTOMETRIC=RGB) to train on it")
    return f"photometric {photometric} with {samples} samples per pixel, which is not taken"


def _codec_missing(page) -> str | None:
    """The compression (or predictor) of a tifffile page that tifffile cannot decode here
    (without the imagecodecs package: LZW, JPEG, the float predictor, ...), None when it can.
    tifffile 2026.3 decodes uncompressed, deflate / zlib, PackBits and LZMA data itself, and the
    integer (horizontal) predictor. (Membership resolves the codec: False when it is missing.)"""
    from tifffile import TIFF

    if page.compression not in TIFF.DECOMPRESSORS:
        return f"{getattr(page.compression, 'name', page.compression)} compression"
    if page.predictor not in TIFF.PREDICTORS:
        return f"predictor {getattr(page.predictor, 'name', page.predictor)}"
    return None


class _TifffileSays(logging.Filter):
    """Holds back tifffile's log records during one read (`messages`): they name an object
    address, not the file ("<tifffile.TiffPages @...> invalid offset to first page")."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage().split("> ", 1)[-1])
        return False


def _decode_deep_tiff(path: str | bytes, white_level: int | None, name: str | None,
                      pil: Image.Image | None) -> Image.Image:
    """A TIFF read at full depth by tifffile and scaled to 8-bit RGB (`_deep_tiff`, or a TIFF
    PIL cannot open: `pil` None). 16-bit RGB: data.white_level maps 0..white_level to 0..255
    rounded (the greyscale rule); without it each value keeps PIL's level, its high byte
    floor(v / 256), so full-range data decodes exactly as it did when PIL read it; the warning
    of a 16-bit image using at most 14 bits applies. Grey + alpha: the greyscale image (16-bit:
    rounded, as a 16-bit greyscale file). 32-bit, signed and float data: `_to_8bit`'s rules.
    16-bit palette (PIL cannot open it): the colours of its colormap, each entry's high byte as
    PIL takes an 8-bit palette TIFF's (data.white_level does not apply: indices, not levels).
    A compression tifffile cannot decode here: PIL's 8-bit reading, said once per process;
    an unusable layout or damaged data raises OSError, naming the file and why."""
    import tifffile

    label = name or "(bytes)"
    prefix = f"{name}: " if name else ""
    why = codec = arr = colormap = None
    said = _TifffileSays()  # its own warnings name no file: kept for our message instead
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addFilter(said)
    try:
        with tifffile.TiffFile(io.BytesIO(path) if isinstance(path, bytes) else path) as tif:
            page = tif.pages[0]
            photometric, axes = int(page.photometric), page.axes
            why = _tiff_layout(photometric, page.samplesperpixel, tuple(page.extrasamples))
            codec = None if why else _codec_missing(page)
            if not (why or codec):
                arr = page.asarray(maxworkers=1)  # (one thread: a loader worker's decode)
                colormap = page.colormap if photometric == _PALETTE else None
    except ImportError as e:  # a codec tifffile lists but cannot load (zstd before Python 3.14)
        codec = f"a codec tifffile cannot load ({type(e).__name__}: {e})"
    except Exception as e:  # tifffile on damaged data: ValueError, zlib.error, IndexError, ...
        raise OSError(f"{prefix}a TIFF that tifffile cannot read ({type(e).__name__}: {e}"
                      f"{''.join(f'; tifffile: {m}' for m in said.messages)})") from e
    finally:
        tiff_log.removeFilter(said)
    for message in said.messages[:1]:  # read anyway: its first complaint, naming the file
        logger.warning("TIFF %s: tifffile says: %s", label, message)
    if why:
        raise UnidentifiedImageError(f"{prefix}a TIFF that PIL cannot read and fastdino does "
                                     f"not take: {why}")
    if codec:
        if pil is None:
            raise UnidentifiedImageError(
                f"{prefix}a TIFF that PIL cannot read, with {codec}, which tifffile decodes only "
                "with the imagecodecs package, if at all: pip install imagecodecs, or re-save "
                "it uncompressed or deflate-compressed")
        pil.load()
        rgb = pil.convert("RGB")
        if "tiff_codec" not in _said:  # (its levels: 12-bit data is 0..15, nearly black)
            top = max(hi for _, hi in rgb.getextrema())
            _say_once("tiff_codec", "TIFF %s has %s, which tifffile decodes only with the "
                      "imagecodecs package: read by PIL, its bit depth reduced to 8 bits (the "
                      "high byte, here levels 0..%d%s; data.white_level does not apply). pip "
                      "install imagecodecs, or re-save such files uncompressed or "
                      "deflate-compressed (tifffile.imwrite(..., compression='zlib'))", label,
                      codec, top, ": nearly black" if top <= SHALLOW_16BIT_MAX >> 8 else "")
        return rgb
    if axes.startswith("S"):  # planar (separate) samples: [S, Y, X] -> [Y, X, S]
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise UnidentifiedImageError(f"{prefix}a TIFF page of axes {axes}, not an image")
    arr = arr[..., :3] if photometric == _RGB else arr[..., :1]
    if photometric == _PALETTE:
        if colormap is None:
            raise UnidentifiedImageError(f"{prefix}a palette TIFF without a colormap")
        colormap = np.asarray(colormap)  # [3, 2**bits] 16-bit entries
        index = np.clip(arr[..., 0], 0, colormap.shape[1] - 1)
        return Image.fromarray(np.ascontiguousarray(
            np.moveaxis(colormap[:, index] >> 8, 0, -1).astype(np.uint8)))
    u16 = arr.dtype.kind == "u" and arr.dtype.itemsize == 2  # (either byte order)
    if arr.dtype == np.uint8:
        out = arr
    elif u16 and photometric == _RGB and white_level is None:
        if not _shallow_warned and arr.size:
            top = int(arr.max())
            _warn_shallow_16bit(top, label, top >> 8)
        out = (arr >> 8).astype(np.uint8)  # PIL's 16-bit RGB level: unchanged pixels
    else:
        kind = "16" if u16 else "float" if arr.dtype.kind == "f" else "int"
        out = _scale_to_8bit(arr, kind, white_level, label)
    if photometric == _MINISWHITE:  # 0 is white: inverted, as PIL does 8-bit ones
        out = 255 - out
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(out))


def decode_rgb(path: str | bytes, white_level: int | None = None,
               name: str | None = None, draft=None) -> Image.Image:
    """Fully decode a file (`path`) or encoded bytes as an RGB PIL image (raises on unreadable or
    corrupt data). Every PIL mode: greyscale and palette expanded, alpha dropped, CMYK converted,
    16-bit / 32-bit / float greyscale scaled to 8 bits (`_to_8bit`: `white_level` is
    data.white_level, `name` the file its warnings name, default `path`). TIFFs of several
    samples deeper than 8 bits (16-bit RGB, grey + alpha, float / 32-bit RGB) are read at full
    depth by tifffile and scaled alike (`_decode_deep_tiff`); a 16-bit colour PNG is read at 8
    bits (PIL's high byte; said once per process when data.white_level is set or the data uses
    at most 14 bits). A multi-page TIFF gives its first page, an RGB TIFF with extra bands its
    RGB. A TIFF that neither reads as an image (multi-band greyscale, an unknown compression)
    raises OSError: skipped and counted by the dataset, as any unreadable file, saying why.

    `draft`: None (a full decode), or (W, H) -> the room of a JPEG of W x H, how many times its
    smallest crop's side exceeds the crop's output side (data.jpeg_draft; module docstring): it
    is decoded at the largest reduction 1/2, 1/4, 1/8 within it; other formats in full.
    A reduced image holds (W, H, k) in its info (`draft_of`, `full_size`)."""
    if name is None and isinstance(path, str):
        name = path
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            if _deep_tiff(img):
                return _decode_deep_tiff(path, white_level, name, img)
            png16 = _png16_colour(img)
            full = img.size
            k = _draft(img, draft)  # (before load: the decoder is set up reduced)
            img.load()  # decode now, so truncated files fail here and not inside a transform
            if img.mode.startswith("I") or img.mode == "F":
                return _to_8bit(img, white_level, name).convert("RGB")
            if png16 and "png16" not in _said:
                top = max(hi for _, hi in img.getextrema()[:3])  # high bytes of R, G, B
                if white_level is not None or top <= SHALLOW_16BIT_MAX >> 8:
                    _say_once("png16", "16-bit PNG %s (colour or alpha) is read at 8 bits (its "
                              "high byte, here at most %d: PIL has no such 16-bit mode), so "
                              "data.white_level does not apply to it: save such images as "
                              "16-bit TIFF (tifffile.imwrite) to train on their full depth",
                              name or "(bytes)", top)
            rgb = img.convert("RGB")
            if k > 1:
                rgb.info[DRAFT_INFO] = (*full, k)
            return rgb
    except UnidentifiedImageError:
        if not is_tiff(path):
            raise
    # PIL cannot open this TIFF: tifffile may (grey + alpha, 32-bit / float RGB); if not, its
    # error names the file and says why
    return _decode_deep_tiff(path, white_level, name, None)


def decode_location(location: Location, white_level: int | None = None,
                    name: str | None = None, draft=None) -> Image.Image:
    """The RGB image at a file path or tar member (raises on unreadable or corrupt data);
    `white_level`, `name`, `draft`: as decode_rgb's."""
    if isinstance(location, str):
        return decode_rgb(location, white_level, name, draft)
    return decode_rgb(read_bytes(location), white_level,
                      name or f"{location.shard} (member at byte {location.offset})", draft)


class ImageFolderUnlabeled:
    """All images that `root` names (a folder, recursively, with the images in its tar shards; a
    tar shard; an image; a glob / brace pattern of them: `sources.find_images`) or that
    `file_list` lists, in a fixed order. `paths[i]` is image i's name (a file path, or
    `<shard>/<member>`), `read(i)` its encoded bytes, `decode(i)` the RGB image."""

    def __init__(self, root: str | Path | None = None, file_list: str | Path | None = None,
                 ranks: tuple[int, int] | None = None, white_level: int | None = None) -> None:
        """`ranks` = (rank, world size) when every rank builds this dataset at once: the
        ranks share the first indexing of tar shards (collective; sources.py). `white_level`:
        data.white_level, which `decode` applies (`_to_8bit`); an attribute, so it travels
        with the dataset into forked or spawned loader workers."""
        if (root is None) == (file_list is None):
            raise ValueError("ImageFolderUnlabeled needs exactly one of root= or file_list=")
        check_white_level(white_level)
        self.white_level = white_level
        # (W, H) -> room for a reduced JPEG decode (decode_rgb's draft): the torch loader sets its
        # crops' rule here (data.jpeg_draft); None = full decodes
        self.draft = None
        if root is not None:
            self.source = str(root)
            found = find_images(root, ranks=ranks)
        else:
            self.source = str(file_list)
            found = find_listed_images(read_file_list(file_list), ranks=ranks)
        # packed (packed.py): forked loader workers share these instead of copying them
        self.paths = PackedStrings(name for name, _ in found)
        self.locations = PackedLocations(self.paths, (loc for _, loc in found))
        del found
        if not self.paths:
            raise FileNotFoundError(
                f"no images found in {self.source!r}: allowed extensions are "
                f"{', '.join(IMAGE_EXTENSIONS)} (case-insensitive), searched recursively, "
                "inside uncompressed .tar shards too")
        self.skipped: set[str] = set()  # names found unreadable by this process
        self.skip_reasons: dict[str, str] = {}  # name -> why (the exception), for the log line
        self.log_skipped = True  # the train loader turns this off and reports skips itself

    def read(self, index: int) -> bytes:
        """Image `index`'s encoded bytes (raises OSError when it cannot be read)."""
        return read_bytes(self.locations[index])

    def decode(self, index: int) -> Image.Image:
        """Image `index` decoded as RGB (raises on unreadable or corrupt data): in full, or a
        JPEG reduced as `self.draft` allows (decode_rgb)."""
        return decode_location(self.locations[index], self.white_level, self.paths[index],
                               self.draft)

    def __len__(self) -> int:
        return len(self.paths)

    def candidates(self, index: int):
        """The indices to try for `index`, in order: it, then the next ones, wrapping around (an
        unreadable file is replaced by the next readable one)."""
        n = len(self.paths)
        return ((index + k) % n for k in range(n))

    def between(self, index: int, used: int) -> list[str]:
        """The names passed over from `index` to the `used` one (the skipped files)."""
        n = len(self.paths)
        return [self.paths[(index + k) % n] for k in range((used - index) % n)]

    def load(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        """(RGB image, index actually used, paths skipped on the way). Raises only if no file of
        the dataset can be decoded."""
        n = len(self.paths)
        bad = []
        for i in self.candidates(index):
            path = self.paths[i]
            if path in self.skipped:
                bad.append(path)
                continue
            try:
                return self.decode(i), i, tuple(bad)
            except _DECODE_ERRORS as e:
                self.skipped.add(path)
                self.skip_reasons[path] = f"{type(e).__name__}: {e}"
                bad.append(path)
                if self.log_skipped:
                    logger.warning("skipping unreadable image %s (%s: %s)", path,
                                   type(e).__name__, e)
        raise RuntimeError(f"none of the {n} files in {self.source!r} could be decoded as images")


class LabelledImageFolder:
    """`root/<class>/**/<image>`: the class is the first-level subfolder (sorted -> label id)."""

    def __init__(self, root: str | Path, white_level: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"labelled image folder {str(root)!r} does not exist")
        check_white_level(white_level)
        self.root, self.white_level = str(root), white_level  # (decode_rgb's)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples: list[tuple[str, int]] = []
        left_out: list[str] = []  # said once for the whole folder, not once per class
        for label, cls in enumerate(self.classes):
            self.samples.extend((p, label) for p in list_images(root / cls, left_out))
        log_left_out(self.root, left_out)
        if not self.samples:
            raise FileNotFoundError(
                f"no labelled images found in {self.root!r}: expected <root>/<class>/<image> with "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return decode_rgb(path, self.white_level), label
