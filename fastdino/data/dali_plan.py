"""Host side of the DALI loader: each image's augmentation parameters, drawn on the CPU.

DALI's own random operators cannot be replayed (a seed does not name a crop, DALI#2601) and their
crop windows cannot be read back (DALI#2576). So every random choice of a crop is drawn here, per
image, from the same `numpy.random.Generator` the torch loader uses, seeded by (data.seed, epoch,
index), in the same order as `DataAugmentationDINO` draws it. The DALI graph only *executes* the
plan. Consequences:
- an image gets the same crop windows, flips, jitter factors and order, greyscale, blur sigma and
  solarize decisions under both loaders (tests compare them coin by coin, and pixels);
- a resumed run sees exactly the crops of an uninterrupted one;
- the per-sample coin flips are known, so tests measure every augmentation rate directly.

The plan of one image is a float32 array [n_crops, N_PARAMS]; rows are global 1, global 2, then
the local crops. Columns are the constants below. Jitter is 4 ordered "slots": slot k applies only
the op order[k] (its factor in its column), the other three of the slot stay neutral (1 or 0), so a
static DALI graph reproduces torchvision's random per-sample order.

No DALI import here: the plan, the cheap file probe and their tests run without DALI.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastdino.config import CropsConfig
from fastdino.data.transforms import (
    BLUR_PROBABILITIES,
    gaussian_kernels1d,
    random_resized_crop_params,
)

TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER = range(6)
SLOT0 = 6  # 4 slots x (brightness, contrast, saturation, hue)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
GRAY, BLUR, SIGMA, SOLARIZE = range(SLOT0 + 16, SLOT0 + 20)
# int(hue_factor * 255), the hue shift torchvision applies, from the double factor: the float32
# factor in its slot decides the order (and that a hue shift runs), this column the shift itself
HUE_STEPS = SOLARIZE + 1
N_PARAMS = HUE_STEPS + 1
NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue shift
SOLARIZE_P = 0.2  # global crop 2 only
JITTER_P, GRAY_P = 0.8, 0.2
BRIGHTNESS_J, CONTRAST_J, SATURATION_J, HUE_J = 0.4, 0.4, 0.2, 0.1


def slot(k: int, op: int) -> int:
    """Column of op `op` (BRIGHTNESS..HUE) in jitter slot k (0..3)."""
    return SLOT0 + 4 * k + op


_NEUTRAL_ROW = [0.0] * N_PARAMS
for _k in range(4):
    _NEUTRAL_ROW[slot(_k, 0):slot(_k, 0) + 4] = NEUTRAL


def _draw_crop(width: int, height: int, scale: tuple[float, float], flip_p: float,
               blur_p: float, solarize_p: float, rng: np.random.Generator) -> list[float]:
    """One row, consuming `rng` exactly as DataAugmentationDINO._geometric + _distort. A Python
    list, filled by index: numpy's per-element and fancy-index writes cost ~3x more, and the
    DALI source draws 2 + N rows per image in the training process."""
    row = list(_NEUTRAL_ROW)
    row[TOP:WIDTH + 1] = random_resized_crop_params(width, height, scale, (3 / 4, 4 / 3), rng)
    row[FLIP] = float(rng.random() < flip_p)
    if rng.random() < JITTER_P:
        row[JITTER] = 1.0
        order = rng.permutation(4).tolist()  # torchvision ColorJitter's fn_idx
        b = rng.uniform(1 - BRIGHTNESS_J, 1 + BRIGHTNESS_J)
        c = rng.uniform(1 - CONTRAST_J, 1 + CONTRAST_J)
        s = rng.uniform(1 - SATURATION_J, 1 + SATURATION_J)
        hue = rng.uniform(-HUE_J, HUE_J)
        factors = (b, c, s, hue)
        for k, op in enumerate(order):
            row[slot(k, op)] = factors[op]
        row[HUE_STEPS] = float(int(hue * 255))  # truncates toward zero, as torchvision's cast
    row[GRAY] = float(rng.random() < GRAY_P)
    if rng.random() < blur_p:
        row[BLUR] = 1.0
        row[SIGMA] = rng.uniform(0.1, 2.0)
    else:
        row[SIGMA] = 0.1  # unused (the blur branch is skipped); a valid sigma all the same
    row[SOLARIZE] = float(rng.random() < solarize_p)
    return row


def plan_image(width: int, height: int, crops: CropsConfig, rng: np.random.Generator) -> np.ndarray:
    """[2 + n_local, N_PARAMS] float32: the random choices of every crop of one image."""
    blur_p = BLUR_PROBABILITIES[crops.blur_probabilities]
    flip_p = 0.5 if crops.horizontal_flip else 0.0
    rows = [_draw_crop(width, height, crops.global_crops_scale, flip_p, blur_p[g],
                       SOLARIZE_P if g == 1 else 0.0, rng) for g in range(2)]
    rows += [_draw_crop(width, height, crops.local_crops_scale, flip_p, blur_p[2], 0.0, rng)
             for _ in range(crops.local_crops_number)]
    plan = np.array(rows, dtype=np.float32)
    return plan


def photometric_params(plan: np.ndarray) -> np.ndarray:
    """Plan rows [..., N_PARAMS] -> the photometric kernel's rows [..., photometric.N_PARAMS]
    (kernels/photometric.py: op and factor per jitter slot, the hue's factor being HUE_STEPS, the
    greyscale / blur / solarize / flip flags and the blur taps of the row's sigma, computed as the
    torch loader computes them). Called per image by the loaders' worker processes (the DALI
    source, the torch loader's workers); vectorised over rows."""
    from fastdino.kernels import photometric as K  # (its constants; no launch here)

    rows = np.asarray(plan, dtype=np.float32).reshape(-1, N_PARAMS)
    out = np.zeros((rows.shape[0], K.N_PARAMS), dtype=np.float32)
    for k in range(4):
        # slot k holds exactly one op (the others neutral); an all-neutral slot (no jitter) none
        factors = rows[:, [slot(k, op) for op in range(4)]]
        active = factors != np.asarray(NEUTRAL, dtype=np.float32)
        which = active.argmax(1)  # BRIGHTNESS..HUE
        codes = np.asarray([K.BRIGHTNESS, K.CONTRAST, K.SATURATION, K.HUE])[which]
        out[:, K.OP0 + k] = np.where(active.any(1), codes, K.NONE)
        f = factors[np.arange(len(rows)), which]
        out[:, K.F0 + k] = np.where(which == HUE, rows[:, HUE_STEPS], f)
    for src, dst in ((GRAY, K.GRAY), (BLUR, K.BLUR), (SOLARIZE, K.SOLARIZE), (FLIP, K.FLIP)):
        out[:, dst] = rows[:, src] > 0.5
    blur = rows[:, BLUR] > 0.5
    if blur.any():
        taps = gaussian_kernels1d(K.KERNEL_SIZE, torch.from_numpy(rows[blur, SIGMA].copy()))
        out[blur, K.TAP0:K.TAP0 + K.KERNEL_SIZE] = taps.numpy()
    return out.reshape(*np.shape(plan)[:-1], K.N_PARAMS)


# ------------------------------------------------------------------------------------------------
# Cheap validity probe. DALI's decoders fail the whole pipeline on one bad file, and decoding on the
# host to check would cost what DALI saves. The probe reads the bytes (DALI needs them anyway),
# parses the header with PIL (no pixel decoding), rejects the formats DALI's decoder cannot read
# (PIL reads more: a GIF saved as .jpg decodes in the torch loader, not in DALI) and checks that the
# file is not truncated, the common corruption: a JPEG must hold its EOI marker after its scan
# data, a PNG its IEND chunk (anywhere: trailing data after them is legal), a WebP's RIFF size must
# match the file, a BMP's declared size must fit. A file corrupt in the middle passes the probe;
# the loader catches DALI's error for it and recovers (see `dali.py`).

# PIL's format names of what `fn.decoders.image` decodes (DALI 2.x, nvImageCodec: JPEG, PNG, BMP,
# TIFF, PNM, JPEG 2000, WebP; checked on the CPU decoder with each format PIL writes, MPO, i.e. a
# camera's multi-picture JPEG, included). GIF, ICO, TGA, PCX, SGI, ... fail DALI's whole pipeline.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})

# TIFF is many formats in one. DALI's decoder (nvImageCodec: libtiff, OpenCV as its fallback)
# reads 8-bit chunky greyscale / RGB TIFFs byte for byte as PIL does (checked on the CPU decoder,
# DALI 2.4, with every compression PIL writes, tiled, multi-page: first page, BigTIFF). The rest
# it fails on, which stops the whole pipeline (bilevel, signed 16-bit, 32-bit integer), or reads
# otherwise than the torch loader (grey + alpha: wrong pixels; float: its own scaling; 16-bit:
# not `decode_rgb`'s rule), or reads only after an error line per image (CMYK, planar). Such a
# TIFF is decoded on the host by the torch loader's own `decode_rgb` and handed to DALI as binary
# PPM: the same pixels under both loaders, the run never stopped. GPU ("mixed") decoder: DALI's
# documentation says GPU decoding is for JPEG and JPEG 2000, other formats, TIFF included, being
# decoded on the CPU by the same decoders, so the checks above hold; where an nvImageCodec build
# decodes TIFF on the GPU (nvTIFF), the TIFFs passed to it are still lossless 8-bit data (JPEG-
# compressed ones may differ by a level or two, as nvJPEG does). Not run on a GPU here.
# 16-bit greyscale PNGs: DALI's decoder scales them itself, round(v * 255 / 65535), the torch
# loader's default pixels (checked on the CPU decoder, DALI 2.4: test_white_level.py), which
# would ignore data.white_level; with a white level set they (and any integer greyscale image
# deeper than 8 bits) are decoded on the host as those TIFFs are (`_host_decoded`), so that both
# loaders map 0..white_level to 0..255. 16-bit colour PNGs (RGB, RGBA, grey + alpha) always are:
# PIL reads them as their high byte, floor(v / 256), and DALI's decoder reads them otherwise (up
# to a level apart: checked on the CPU decoder, DALI 2.4, test_tiff16_rgb.py). TIFFs PIL cannot
# open at all (grey + alpha, float / 32-bit RGB: tifffile
# reads them, `datasets._decode_deep_tiff`) are decoded on the host too, or skipped with
# decode_rgb's reason.
_DALI_TIFF_MODES = frozenset({"L", "RGB"})
_DALI_TIFF_PHOTOMETRIC = frozenset({1, 2, 6})  # min-is-black, RGB, YCbCr (JPEG-compressed)
# none, LZW, JPEG, deflate (both codes), PackBits: libtiff's built-in codecs
_DALI_TIFF_COMPRESSION = frozenset({1, 5, 7, 8, 32946, 32773})


def _dali_reads_tiff(img: Image.Image) -> bool:
    """Whether DALI decodes this TIFF (header already parsed) to the pixels PIL decodes."""
    tags = img.tag_v2
    bits = tags.get(258, 1)  # BitsPerSample: one per sample
    bits = bits if isinstance(bits, tuple) else (bits,)
    return (img.mode in _DALI_TIFF_MODES and all(b == 8 for b in bits)
            and tags.get(262) in _DALI_TIFF_PHOTOMETRIC
            and tags.get(284, 1) == 1  # chunky, not planar
            and tags.get(259, 1) in _DALI_TIFF_COMPRESSION)


def _tiff_data_end(img: Image.Image) -> int:
    """Where the first page's last strip or tile ends (0 if the header does not say)."""
    tags = img.tag_v2
    offsets = tags.get(273, tags.get(324, ()))  # StripOffsets, else TileOffsets
    counts = tags.get(279, tags.get(325, ()))  # StripByteCounts / TileByteCounts
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    return max((o + c for o, c in zip(offsets, counts, strict=False)), default=0)


def _host_decoded(img: Image.Image, white_level: int | None) -> bool:
    """Whether an image (header parsed) is decoded on the host rather than by DALI: a TIFF DALI
    reads otherwise than PIL (16-bit RGB among them: tifffile reads it at full depth), a 16-bit
    colour PNG (PIL's high byte), and with data.white_level an integer greyscale image deeper
    than 8 bits (a 16-bit PNG: DALI's own scaling is 0..65535)."""
    from fastdino.data.datasets import _png16_colour

    if (img.format == "TIFF" and not _dali_reads_tiff(img)) or _png16_colour(img):
        return True
    return white_level is not None and img.mode.startswith("I")


def _host_decoded_ppm(data: bytes, white_level: int | None = None) -> tuple[bytes, int, int]:
    """(the image decoded as the torch loader decodes it, as binary PPM: DALI reads it as is;
    its width; its height). `white_level`: data.white_level."""
    from fastdino.data.datasets import _DECODE_ERRORS, decode_rgb

    try:
        rgb = decode_rgb(data, white_level)
    except _DECODE_ERRORS as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from e
    return b"P6\n%d %d\n255\n" % rgb.size + rgb.tobytes(), *rgb.size


class UnreadableImage(ValueError):
    pass


def _jpeg_scan_start(data: bytes) -> int:
    """Where a JPEG's first scan (SOS marker) starts: its header segments walked by their lengths
    (an EXIF thumbnail's own end marker lies in them); len(data) when the header is cut short."""
    pos, n = 2, len(data)  # after SOI
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return pos  # not a marker where one must be: search from here
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0xDA, 0xD9):  # start of scan (or an image without one)
            return pos
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return n


# a PNG's IEND chunk: length 0, type (its CRC is not checked: PIL does not either)
_PNG_IEND = b"\x00\x00\x00\x00IEND"


def _check_complete(data: bytes, fmt: str) -> None:
    """Truncated = the end marker is absent from the whole file: data after it (a motion photo's
    video, zero padding, any trailer) is legal and decoders ignore it. Searched from the end with
    bytes.rfind (C speed; the bytes are in memory anyway: DALI decodes them)."""
    if fmt in ("JPEG", "MPO") and data.rfind(b"\xff\xd9", _jpeg_scan_start(data)) < 0:
        raise UnreadableImage("JPEG has no end-of-image marker after its scan data (truncated)")
    if fmt == "PNG" and data.rfind(_PNG_IEND, 8) < 0:
        raise UnreadableImage("PNG has no IEND chunk (truncated)")
    if fmt == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise UnreadableImage("WebP is shorter than its RIFF header says (truncated)")
    if fmt == "BMP" and int.from_bytes(data[2:6], "little") > len(data):
        raise UnreadableImage("BMP is shorter than its header says (truncated)")


def probe_image(data: bytes, white_level: int | None = None) -> tuple[np.ndarray, int, int]:
    """(the encoded bytes as uint8 [n], width, height) of an image that looks decodable by DALI;
    raises UnreadableImage otherwise (with the reason: not an image, a format DALI cannot decode,
    truncated). A TIFF that DALI would not decode as PIL does (`_dali_reads_tiff`) or that PIL
    cannot open (tifffile may: `datasets.decode_rgb`), a 16-bit colour PNG, and with
    `white_level` (data.white_level) a 16-bit greyscale image, is decoded here and its bytes are
    a PPM of the RGB image."""
    try:
        with Image.open(io.BytesIO(data)) as img:  # header only: no pixels are decoded
            width, height, fmt = img.width, img.height, img.format
            on_host = fmt in DALI_FORMATS and _host_decoded(img, white_level)
            tiff_end = _tiff_data_end(img) if fmt == "TIFF" else 0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        from fastdino.data.datasets import is_tiff

        if not (isinstance(e, UnidentifiedImageError) and is_tiff(data)):
            raise UnreadableImage(f"{type(e).__name__}: {e}") from e
        # a TIFF PIL cannot open: decoded as the torch loader does (tifffile), or skipped with
        # decode_rgb's reason
        ppm, width, height = _host_decoded_ppm(data, white_level)
        return np.frombuffer(ppm, dtype=np.uint8), width, height
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"empty image {width}x{height}")
    if fmt not in DALI_FORMATS:
        raise UnreadableImage(
            f"{fmt} data, which DALI's decoder cannot read (it reads JPEG, PNG, BMP, TIFF, PNM, "
            "JPEG 2000 and WebP); the torch loader (data.loader=torch) would train on it")
    if on_host:
        return np.frombuffer(_host_decoded_ppm(data, white_level)[0], dtype=np.uint8), width, height
    if tiff_end > len(data):
        raise UnreadableImage("TIFF is shorter than its strips / tiles say (truncated)")
    _check_complete(data, fmt)
    return np.frombuffer(data, dtype=np.uint8), width, height
