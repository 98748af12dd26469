"""16-bit RGB TIFFs (satellite, scientific cameras: 12-bit data or reflectance 0..10000 in uint16,
USERS.md §1) are read at full depth with tifffile: PIL read them as their high byte, so 12-bit data
trained as levels 0..15, nearly black, and data.white_level could not help. With a white level
they map 0..white_level to 0..255 (the greyscale rule, rounded); without one full-range data keeps
PIL's pixels (floor(v / 256)) and shallow data is said once per process. The DALI loader decodes
them on the host: same pixels. Other layouts: RGB + alpha / extra bands -> RGB, grey + alpha ->
grey, float / 32-bit RGB -> the greyscale rules, multi-band greyscale -> skipped with its reason;
a compression tifffile lacks a codec for -> PIL's 8 bits, said once; a 16-bit colour PNG (no
16-bit reader) -> PIL's 8 bits, said once when a white level is set."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
import tifffile
from dali_helpers import cpu_decode, needs_dali
from PIL import Image

from fastdino.data import dali_plan as P
from fastdino.data import datasets
from fastdino.data.datasets import (
    ImageFolderUnlabeled,
    LabelledImageFolder,
    decode_rgb,
    say_bit_depth,
)

RNG = np.random.default_rng(0)
# 12-bit data in a 16-bit file, with values above 4095 (they clip to white at 4095)
TWELVE = (RNG.random((6, 7, 3)) * 4600).astype(np.uint16)
FULL = (RNG.random((6, 7, 3)) * 65535).astype(np.uint16)
FULL[0, 0] = (0, 255, 65535)


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test starts as a new process: no once-per-process warning said yet."""
    monkeypatch.setattr(datasets, "_shallow_warned", False)
    monkeypatch.setattr(datasets, "_said", set(), raising=False)


def _tiff(arr, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _by_hand(arr, white):
    """0..white -> 0..255, rounded half up, clipped: the greyscale path's rule."""
    return np.clip(np.floor(arr.astype(np.float64) * 255 / white + 0.5), 0, 255).astype(np.uint8)


def _ppm_pixels(encoded) -> np.ndarray:
    """The pixels of a probe's host-decoded binary PPM (what DALI's decoder is handed)."""
    data = bytes(encoded)
    magic, w, h, maxval, pixels = data.split(maxsplit=4)
    assert (magic, maxval) == (b"P6", b"255")
    return np.frombuffer(pixels, np.uint8).reshape(int(h), int(w), 3)


@pytest.mark.parametrize("kw", [{}, {"compression": "zlib"},
                                {"compression": "zlib", "predictor": True},
                                {"planarconfig": "separate"}, {"byteorder": ">"},
                                {"tile": (16, 16)}])
def test_12bit_rgb_tiff_with_a_white_level_equals_the_data_scaled_by_hand(kw):
    """Every layout tifffile writes without imagecodecs (deflate natively); was PIL's high byte,
    whatever the white level: max 17 of 255."""
    arr = np.tile(TWELVE, (3, 3, 1)) if "tile" in kw else TWELVE  # a tile is 16 x 16 at least
    if kw.get("planarconfig") == "separate":
        data = _tiff(np.moveaxis(arr, -1, 0).copy(), photometric="rgb", **kw)
    else:
        data = _tiff(arr, photometric="rgb", **kw)
    want = _by_hand(arr, 4095)
    assert np.array_equal(np.asarray(decode_rgb(data, 4095)), want)
    # the DALI loader: decoded on the host, the same pixels handed to its decoder as PPM
    encoded, width, height = P.probe_image(data, 4095)
    assert (width, height) == arr.shape[1::-1]
    assert np.array_equal(_ppm_pixels(encoded), want)


def test_every_reader_of_a_16bit_rgb_tiff_applies_the_white_level(tmp_path):
    """The training dataset (a folder, a tar member, the torch loader's decode) and the labelled
    folder of the kNN probe / eval all decode through decode_rgb."""
    import tarfile

    data = _tiff(TWELVE, photometric="rgb")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.tif").write_bytes(data)
    with tarfile.open(tmp_path / "imgs" / "shard.tar", "w") as tar:
        info = tarfile.TarInfo("b.tiff")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "labelled" / "cls").mkdir(parents=True)
    (tmp_path / "labelled" / "cls" / "c.tif").write_bytes(data)
    want = _by_hand(TWELVE, 4095)
    ds = ImageFolderUnlabeled(root=tmp_path / "imgs", white_level=4095)
    assert len(ds) == 2
    for i in range(2):
        img, used, skipped = ds.load(i)
        assert (used, skipped) == (i, ()) and np.array_equal(np.asarray(img), want)
    img, label = LabelledImageFolder(tmp_path / "labelled", white_level=4095)[0]
    assert label == 0 and np.array_equal(np.asarray(img), want)


@pytest.mark.parametrize("arr,kw", [(FULL, {}), (FULL, {"compression": "zlib"}),
                                    (FULL, {"byteorder": ">"}),
                                    (np.concatenate([FULL, FULL[..., :1]], -1), {})])
def test_without_a_white_level_full_range_data_keeps_pils_pixels(arr, kw):
    """Nothing changes for full-range 16-bit RGB (and RGBA) data: PIL's high byte, floor(v/256),
    not the greyscale path's rounding, under both loaders; nothing is said."""
    data = _tiff(arr, photometric="rgb", **kw)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(pil, (arr[..., :3] >> 8).astype(np.uint8))  # PIL's own rule
    ours = np.asarray(decode_rgb(data))
    assert np.array_equal(ours, pil)
    assert np.array_equal(_ppm_pixels(P.probe_image(data)[0]), pil)
    assert not datasets._shallow_warned


def test_a_shallow_16bit_rgb_tiff_is_said_once_naming_the_file_and_white_level(tmp_path, caplog):
    for k in range(3):
        (tmp_path / f"{k}.tif").write_bytes(_tiff(TWELVE, photometric="rgb"))
    ds = ImageFolderUnlabeled(root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        for i in range(len(ds)):
            img = ds.load(i)[0]
            assert np.array_equal(np.asarray(img), (TWELVE >> 8).astype(np.uint8))
    (record,) = caplog.records  # one line for three such images
    msg = record.getMessage()
    assert str(tmp_path / "0.tif") in msg
    top = int(TWELVE.max())
    assert f"maximum {top}" in msg and f"levels 0..{top >> 8} only" in msg
    assert "data.white_level=16383" in msg  # 4600 needs 13 bits: the 14-bit white


def test_say_bit_depth_looks_at_a_16bit_rgb_tiff(tmp_path, caplog):
    """The training process says it before the loaders start (DALI's source workers cannot)."""
    (tmp_path / "a.tif").write_bytes(_tiff((TWELVE // 2).astype(np.uint16), photometric="rgb"))
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        say_bit_depth(ImageFolderUnlabeled(root=tmp_path))
    assert "data.white_level=4095" in caplog.text and str(tmp_path / "a.tif") in caplog.text


def test_grey_alpha_float_and_32bit_tiffs_pil_cannot_open_are_read():
    """Were skipped as unreadable. Grey + alpha: the grey image (a 16-bit grey file's pixels);
    float RGB: 0..1 -> 0..255; 32-bit RGB: 0..white_level, else the greyscale data rules."""
    la = np.stack([TWELVE[..., 0], np.full(TWELVE.shape[:2], 65535, np.uint16)], -1)
    data = _tiff(la, photometric="minisblack", planarconfig="contig", extrasamples=[2])
    grey = _tiff(TWELVE[..., 0])
    for white in (None, 4095):
        assert np.array_equal(np.asarray(decode_rgb(data, white)),
                              np.asarray(decode_rgb(grey, white)))
    reflectance = (RNG.random((5, 4, 3))).astype(np.float32)
    data = _tiff(reflectance, photometric="rgb")
    assert np.array_equal(np.asarray(decode_rgb(data)), _by_hand(reflectance, 1.0))
    wide = TWELVE.astype(np.uint32)
    data = _tiff(wide, photometric="rgb")
    assert np.array_equal(np.asarray(decode_rgb(data, 4095)), _by_hand(wide, 4095))
    assert np.array_equal(np.asarray(decode_rgb(data)), _by_hand(wide, 65535))  # 16-bit data
    encoded, width, height = P.probe_image(data, 4095)  # DALI: host-decoded, not skipped
    assert np.array_equal(_ppm_pixels(encoded), _by_hand(wide, 4095))


def test_rgb_tiff_with_extra_bands_gives_its_rgb():
    """RGB + NIR + another band (photometric RGB, two extra samples): its R, G, B, as PIL gives
    for an 8-bit RGB TIFF with extra bands (a 16-bit one PIL could not open)."""
    extra = np.concatenate([TWELVE, TWELVE[..., :2] // 2], -1)
    data = _tiff(extra, photometric="rgb", extrasamples=[0, 0])
    assert np.array_equal(np.asarray(decode_rgb(data, 4095)), _by_hand(TWELVE, 4095))


@pytest.mark.parametrize("bands", [2, 3, 4, 5])
def test_multiband_greyscale_tiffs_are_skipped_and_counted_saying_why(tmp_path, bands):
    """Multispectral data (greyscale photometric, GDAL's default for 16-bit bands) has no colours
    to take: never its first three bands silently, skipped with the reason and what to do."""
    data = _tiff((RNG.random((6, 7, bands)) * 4095).astype(np.uint16),
                 photometric="minisblack", planarconfig="contig")
    (tmp_path / "a_bands.tif").write_bytes(data)
    (tmp_path / "b_good.tif").write_bytes(_tiff(TWELVE, photometric="rgb"))
    why = f"{bands} bands of greyscale photometric .*PHOTOMETRIC=RGB"
    with pytest.raises(OSError, match=f"{tmp_path / 'a_bands.tif'}: .*{why}"):
        decode_rgb(str(tmp_path / "a_bands.tif"))
    ds = ImageFolderUnlabeled(root=tmp_path, white_level=4095)
    img, used, skipped = ds.load(0)
    assert used == 1 and skipped == (str(tmp_path / "a_bands.tif"),)
    assert "greyscale photometric" in ds.skip_reasons[skipped[0]]
    with pytest.raises(P.UnreadableImage, match=why):
        P.probe_image(data)  # the DALI loader skips it too, saying why


def _lzw_literal(data: bytes) -> bytes:
    """Valid TIFF LZW of `data` from literal codes only (9 bits: a Clear code every 250 codes
    keeps the table small), MSB first: tifffile writes LZW only with imagecodecs."""
    codes = []
    for i in range(0, len(data), 250):
        codes += [256, *data[i:i + 250]]
    bits = "".join(format(c, "09b") for c in [*codes, 257])
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def _lzw_tiff(arr, **kw) -> bytes:
    """`arr` as a one-strip LZW TIFF: written uncompressed, its strip re-encoded."""
    data = bytearray(_tiff(arr, rowsperstrip=arr.shape[0], **kw))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages[0].tags
        start, size = tags["StripOffsets"].value[0], tags["StripByteCounts"].value[0]
        packed = _lzw_literal(bytes(data[start:start + size]))
        for tag, value, width in (("Compression", 5, 2), ("StripOffsets", len(data), 4),
                                  ("StripByteCounts", len(packed), 4)):
            at = tags[tag].valueoffset
            data[at:at + width] = value.to_bytes(width, "little")
    return bytes(data) + packed


def test_an_lzw_tiff_without_imagecodecs_falls_back_to_pil_saying_so(tmp_path, caplog):
    """tifffile decodes LZW only with imagecodecs (not installed here): PIL's 8-bit reading, as
    before, said once per process with what to do; a layout PIL cannot open either is skipped
    saying so. A deflate TIFF (tifffile's own codec) is read at full depth (above)."""
    lzw = _lzw_tiff(TWELVE, photometric="rgb")
    with tifffile.TiffFile(io.BytesIO(lzw)) as tif:
        lacks = tif.pages[0].compression not in tifffile.TIFF.DECOMPRESSORS
    pil = np.asarray(Image.open(io.BytesIO(lzw)).convert("RGB"))
    assert np.array_equal(pil, (TWELVE >> 8).astype(np.uint8))  # a valid LZW TIFF
    if not lacks:  # imagecodecs installed: read at full depth
        assert np.array_equal(np.asarray(decode_rgb(lzw, 4095)), _by_hand(TWELVE, 4095))
        return
    for k in range(2):
        (tmp_path / f"{k}.tif").write_bytes(lzw)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        for k in range(2):
            assert np.array_equal(np.asarray(decode_rgb(str(tmp_path / f"{k}.tif"), 4095)), pil)
    (record,) = caplog.records
    msg = record.getMessage()
    assert str(tmp_path / "0.tif") in msg and "LZW" in msg and "8 bits" in msg
    assert "pip install imagecodecs" in msg and "deflate" in msg
    float_lzw = _lzw_tiff(RNG.random((4, 5, 3)).astype(np.float32), photometric="rgb")
    with pytest.raises(OSError, match="LZW.*imagecodecs"):
        decode_rgb(float_lzw)


def test_a_tifffile_codec_error_falls_back_to_pil(monkeypatch, caplog):
    """A codec tifffile claims but cannot load (e.g. zstd on Python < 3.14) raises ImportError
    inside asarray: PIL's reading, said, never a crash."""
    data = _tiff(FULL, photometric="rgb")

    def missing(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'compression'")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", missing)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert np.array_equal(np.asarray(decode_rgb(data)), (FULL >> 8).astype(np.uint8))
    assert "8 bits" in caplog.text


def _png16(arr) -> bytes:
    """A 16-bit colour PNG written by hand (PIL cannot write one)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_16bit_colour_png_with_a_white_level_is_said_to_be_read_at_8_bits(tmp_path, caplog):
    for k in range(2):
        (tmp_path / f"{k}.png").write_bytes(_png16(TWELVE))
    full = _png16(FULL)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert np.array_equal(np.asarray(decode_rgb(full)), (FULL >> 8).astype(np.uint8))
        assert caplog.records == []  # full-range data, no white level: nothing to say
        for k in range(2):
            decode_rgb(str(tmp_path / f"{k}.png"), 4095)
    (record,) = caplog.records
    msg = record.getMessage()
    assert str(tmp_path / "0.png") in msg and "8 bits" in msg and "TIFF" in msg
    # the DALI loader decodes it on the host: PIL's high byte, not its own 16-bit scaling
    encoded, _, _ = P.probe_image(full)
    assert np.array_equal(_ppm_pixels(encoded), (FULL >> 8).astype(np.uint8))


def test_8bit_images_never_take_the_tifffile_path(monkeypatch):
    """Decode cost unchanged for ordinary images: decided from PIL's header, decoded once."""
    def boom(*args, **kwargs):
        raise AssertionError("tifffile path taken")

    monkeypatch.setattr(datasets, "_decode_deep_tiff", boom)
    rgb = (TWELVE >> 4).astype(np.uint8)
    for fmt, kw in (("JPEG", {}), ("PNG", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt, **kw)
        decode_rgb(buf.getvalue(), 4095)
    decode_rgb(_tiff(rgb, photometric="rgb"), 4095)
    decode_rgb(_tiff(TWELVE[..., 0]), 4095)  # 16-bit greyscale: PIL's I;16 path as before


@needs_dali
def test_dali_cpu_decoder_gives_the_torch_loaders_pixels():
    """What the probe hands DALI's decoder decodes to decode_rgb's pixels: 16-bit RGB(A) TIFFs
    with and without a white level, and a 16-bit colour PNG, which DALI's decoder alone reads
    up to a level away from PIL's high byte."""
    png = _png16(FULL)
    assert not np.array_equal(cpu_decode(png), (FULL >> 8).astype(np.uint8))
    assert np.array_equal(cpu_decode(P.probe_image(png)[0]), np.asarray(decode_rgb(png)))
    rgba = np.concatenate([TWELVE, TWELVE[..., :1]], -1)
    for arr, kw in ((TWELVE, {}), (FULL, {"compression": "zlib"}), (rgba, {})):
        data = _tiff(arr, photometric="rgb", **kw)
        for white in (None, 4095):
            assert np.array_equal(cpu_decode(P.probe_image(data, white)[0]),
                                  np.asarray(decode_rgb(data, white)))


def _cfg(root, *extra):
    from fastdino.config import load_config

    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", "data.batch_size_per_gpu=2",
                              "data.num_workers=1", *extra])


def _max_level(batch) -> float:
    """The brightest pixel of a batch's crops, back in 8-bit levels (undo the normalisation)."""
    import torch

    mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225))[:, None, None]
    crops = [batch.global_crops.float().cpu(), batch.local_crops.float().cpu()]
    return max(float(((c * std + mean) * 255).amax()) for c in crops)


@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=needs_dali)])
def test_both_training_loaders_train_a_12bit_rgb_tiff_folder_at_its_white_level(
        tmp_path, loader, caplog):
    """Flat white 12-bit RGB TIFFs (4095 in every channel: a grey, jitter keeps it grey): bright
    with data.white_level=4095, level 15 without it, which the training process says."""
    for k in range(2):
        (tmp_path / f"{k}.tif").write_bytes(_tiff(np.full((40, 48, 3), 4095, np.uint16),
                                                  photometric="rgb"))

    def first_batch(*extra):
        if loader == "torch":
            from fastdino.data.loader import build_train_loader

            return next(build_train_loader(_cfg(tmp_path, "data.loader=torch", *extra)))
        from fastdino.data.dali import build_dali_loader

        return next(build_dali_loader(_cfg(tmp_path, "data.loader=dali", *extra),
                                      exact_hue=False, photometric="dali", source_workers=0))

    assert _max_level(first_batch("data.white_level=4095")) > 150
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert _max_level(first_batch()) < 30  # level 15, x 1.4 at most under the jitter
    assert "data.white_level=4095" in caplog.text and str(tmp_path / "0.tif") in caplog.text
