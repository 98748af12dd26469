"""QA (USERS.md §1, remote sensing): TIFF layouts of scientific data. A 16-bit single-band TIFF
with a colormap (a palette image: class maps, false-colour products) was skipped as
"photometric 3 ... not taken", though PIL shows an 8-bit one in its colours: it decodes to its
colormap's colours (each entry's high byte, PIL's 8-bit palette rule), under both loaders."""

import io
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image

from fastdino.data import dali_plan as P
from fastdino.data.datasets import ImageFolderUnlabeled, decode_rgb

RNG = np.random.default_rng(0)


def _tiff(arr, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _ppm_pixels(encoded) -> np.ndarray:
    magic, w, h, maxval, pixels = bytes(encoded).split(maxsplit=4)
    assert (magic, maxval) == (b"P6", b"255")
    return np.frombuffer(pixels, np.uint8).reshape(int(h), int(w), 3)


def test_a_16bit_palette_tiff_decodes_to_its_colormap_as_pil_does_an_8bit_one(tmp_path):
    index = RNG.integers(0, 256, (12, 10)).astype(np.uint8)
    cmap8 = RNG.integers(0, 65536, (3, 256)).astype(np.uint16)
    cmap16 = np.zeros((3, 65536), np.uint16)
    cmap16[:, :256] = cmap8
    eight = _tiff(index, photometric="palette", colormap=cmap8)
    sixteen = _tiff(index.astype(np.uint16), photometric="palette", colormap=cmap16)
    pil = np.asarray(Image.open(io.BytesIO(eight)).convert("RGB"))  # PIL's own palette TIFF
    assert np.array_equal(pil, np.moveaxis(cmap8[:, index] >> 8, 0, -1).astype(np.uint8))
    for white in (None, 4095):  # indices, not levels: no white level
        assert np.array_equal(np.asarray(decode_rgb(sixteen, white)), pil)
        assert np.array_equal(_ppm_pixels(P.probe_image(sixteen, white)[0]), pil)  # DALI
    (tmp_path / "classes.tif").write_bytes(sixteen)
    img, used, skipped = ImageFolderUnlabeled(root=tmp_path).load(0)
    assert skipped == () and np.array_equal(np.asarray(img), pil)



def test_a_deep_min_is_white_tiff_is_inverted_as_pil_inverts_an_8bit_one():
    """Photometric 0 (min-is-white: X-rays exported as MONOCHROME1) means 0 is white. PIL
    inverts 8-bit ones but read 16-bit ones as min-is-black (and cannot open big-endian, signed
    or 32-bit ones, which were skipped): every depth now decodes as the inverse of the same
    data stored min-is-black, with and without a white level, under both loaders."""
    xray = (np.arange(12 * 10).reshape(12, 10) * 34).astype(np.uint16)  # 0..4046
    eight = (xray >> 4).astype(np.uint8)
    pil8 = np.asarray(Image.open(io.BytesIO(_tiff(eight, photometric="miniswhite"))).convert("RGB"))
    assert np.array_equal(pil8, 255 - np.asarray(decode_rgb(_tiff(eight))))  # PIL's own rule
    for arr, kw in ((xray, {}), (xray, {"byteorder": ">"}), (xray.astype(np.int16), {}),
                    (xray.astype(np.uint32), {}), (xray.astype(np.float32), {})):
        white_data = _tiff(arr, photometric="miniswhite", **kw)
        for white in (None, 4095):
            black = np.asarray(decode_rgb(_tiff(arr, **kw), white))
            assert np.array_equal(np.asarray(decode_rgb(white_data, white)), 255 - black), (
                arr.dtype, kw, white)
            assert np.array_equal(_ppm_pixels(P.probe_image(white_data, white)[0]), 255 - black)


def test_a_damaged_tiff_names_tifffiles_complaint_in_its_error_not_in_a_line_of_its_own(caplog):
    """A corrupt scan with a TIFF header (offset to its first page past the end): tifffile logged
    "<tifffile.TiffPages @...> invalid offset to first page ..." on its own line, naming no file,
    beside the skip's "IndexError: index 0 out of range(0)"; its complaint is now in the error
    that names the file (what the loaders' skip line and eval say)."""
    bad = b"II*\x00" + (811886408).to_bytes(4, "little") + bytes(64)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(OSError, match=r"scan\.tif: .*tifffile: invalid offset to first page"):
            decode_rgb(bad, name="scan.tif")
    assert [r for r in caplog.records if r.name == "tifffile"] == []
