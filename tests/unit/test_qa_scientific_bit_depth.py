"""QA (USERS.md §1, remote sensing and medical users): what is said about 12-bit data in 16-bit
files. The training process samples the dataset for the bit-depth notes (DALI's source workers
cannot say them), so a folder whose first file is an 8-bit quicklook or a corrupt scan still
hears about a forgotten data.white_level; a white level below the data's maximum (values clip
to white) is said once; the LZW note names the levels the 8-bit fallback leaves."""

import io
import logging

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_tiff16_rgb import _lzw_tiff  # (an LZW TIFF written by hand: no codec here)

from fastdino.data import datasets
from fastdino.data.datasets import ImageFolderUnlabeled, decode_rgb, say_bit_depth

RAMP = (np.arange(48 * 40).reshape(40, 48) * 4095 // (48 * 40 - 1)).astype(np.uint16)  # 0..4095


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test starts as a new process: no once-per-process note said yet."""
    monkeypatch.setattr(datasets, "_shallow_warned", False)
    monkeypatch.setattr(datasets, "_said", set())


def _xray_folder(root, first: str) -> None:
    """A patient folder of 12-bit greyscale PNGs whose first file (sorted) is `first`: an 8-bit
    JPEG quicklook or a corrupt (empty) file."""
    root.mkdir()
    if first == "jpeg":
        Image.fromarray((RAMP >> 4).astype(np.uint8)).save(root / "0_quicklook.jpg")
    else:
        (root / "0_corrupt.png").write_bytes(b"")
    for k in range(5):
        Image.fromarray(RAMP).save(root / f"scan_{k}.png")


@pytest.mark.parametrize("first", ["jpeg", "corrupt"])
def test_say_bit_depth_finds_12bit_data_behind_a_first_file_that_is_not(tmp_path, first, caplog):
    _xray_folder(tmp_path / "p", first)
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        say_bit_depth(ImageFolderUnlabeled(root=tmp_path / "p"))
    assert "data.white_level=4095" in caplog.text and "scan_" in caplog.text


def test_say_bit_depth_looks_past_a_black_first_scan(tmp_path, caplog):
    """The first 16-bit image of a folder all black (an empty frame) says nothing of the data's
    depth: the next ones of its kind are decoded too (only one of a kind was, without a white
    level)."""
    root = tmp_path / "p"
    root.mkdir()
    Image.fromarray(np.zeros_like(RAMP)).save(root / "0_dark.png")
    for k in range(5):
        Image.fromarray(RAMP).save(root / f"scan_{k}.png")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        say_bit_depth(ImageFolderUnlabeled(root=root))
    assert "data.white_level=4095" in caplog.text and "scan_" in caplog.text


def test_say_bit_depth_reads_headers_not_every_image(tmp_path, monkeypatch):
    """A sample of headers and a few decodes, whatever the dataset's size."""
    _xray_folder(tmp_path / "p", "jpeg")
    for k in range(5, 200):
        Image.fromarray(RAMP).save(tmp_path / "p" / f"scan_{k}.png")
    decoded = []
    real = ImageFolderUnlabeled.decode
    monkeypatch.setattr(ImageFolderUnlabeled, "decode",
                        lambda self, i: decoded.append(i) or real(self, i))
    say_bit_depth(ImageFolderUnlabeled(root=tmp_path / "p"))
    # the first few deep images (one could say nothing: a black frame), not 200
    assert len(decoded) == datasets._BIT_DEPTH_DECODES
    decoded.clear()
    say_bit_depth(ImageFolderUnlabeled(root=tmp_path / "p", white_level=4095))
    assert 1 <= len(decoded) <= datasets._BIT_DEPTH_DECODES


@pytest.mark.parametrize("photometric", [None, "rgb"])
def test_a_white_level_below_the_data_maximum_is_said_once(photometric, caplog):
    """14-bit data (0..16000) with data.white_level=4095: three quarters of the range clip to
    white, said once (how many values, and the 14-bit white level); data within the white level
    says nothing."""
    fourteen = (RAMP.astype(np.uint32) * 4).clip(0, 16000).astype(np.uint16)
    if photometric:
        fourteen = np.stack([fourteen] * 3, -1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, fourteen, photometric=photometric)
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        decode_rgb(_png(RAMP), 4095, name="fits.png")  # 0..4095: nothing to say
        assert caplog.records == []
        for _ in range(3):
            decode_rgb(buf.getvalue(), 4095, name="scan.tif")
    (record,) = caplog.records
    msg = record.getMessage()
    assert "scan.tif" in msg and "up to 16000" in msg and "data.white_level=4095" in msg
    assert "clip to white" in msg and "white level 16383" in msg
    share = 100 * np.count_nonzero(fourteen > 4095) / fourteen.size
    assert f"({share:.3g}% of its values)" in msg


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _tif(arr, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("arr,kw,what", [
    (RAMP.astype(np.int16) - 1024, {}, "signed data, values -1024..3071"),  # CT in HU
    (np.stack([RAMP * 2.5] * 3, -1).astype(np.float32), {"photometric": "rgb"},
     "float data, values 0..10237.5"),  # reflectance x 10000 as float
])
def test_a_white_level_that_signed_or_float_data_do_not_take_is_said_once(arr, kw, what, caplog):
    """data.white_level maps unsigned integer data only: signed data keeps its min..max and
    float data its range, silently before although the user set a white level for them (each
    image then gets its own scale); said once, and nothing clips."""
    own = np.asarray(decode_rgb(_tif(arr, **kw)))
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        for _ in range(2):
            assert np.array_equal(np.asarray(decode_rgb(_tif(arr, **kw), 1023, name="s.tif")),
                                  own)
    (record,) = caplog.records
    msg = record.getMessage()
    assert "s.tif" in msg and what in msg and "not 0..data.white_level=1023" in msg


def test_float_data_within_0_to_1_says_nothing_under_a_white_level(caplog):
    refl = np.stack([RAMP / 4095 * 0.4] * 3, -1).astype(np.float32)  # reflectance 0..0.4
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        decode_rgb(_tif(refl, photometric="rgb"), 1023)
    assert caplog.records == []

def test_the_lzw_fallback_note_names_the_levels_12bit_tiles_are_left_with(tmp_path, caplog):
    """Without imagecodecs an LZW 12-bit RGB tile is PIL's high byte, levels 0..15 even with
    data.white_level=4095: the note says so ("nearly black"), not only "8 bits"."""
    lzw = _lzw_tiff(np.stack([RAMP] * 3, -1), photometric="rgb")
    with tifffile.TiffFile(io.BytesIO(lzw)) as tif:
        if tif.pages[0].compression in tifffile.TIFF.DECOMPRESSORS:
            pytest.skip("imagecodecs is installed: LZW is read at full depth, no fallback")
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        assert np.asarray(decode_rgb(lzw, 4095, name="tile.tif")).max() == 15
    (record,) = caplog.records
    assert "tile.tif" in record.getMessage()
    assert "levels 0..15: nearly black" in record.getMessage()


def test_say_bit_depth_says_a_white_level_float_data_does_not_take(tmp_path, caplog):
    """DALI's source workers say nothing: the training process's sample says it for float
    TIFFs too (PIL mode F), not only for integer ones."""
    root = tmp_path / "tiles"
    root.mkdir()
    for k in range(3):
        tifffile.imwrite(root / f"{k}.tif", (RAMP * 2.5).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="fastdino.data"):
        say_bit_depth(ImageFolderUnlabeled(root=root, white_level=10000))
    assert "float data" in caplog.text and "not 0..data.white_level=10000" in caplog.text
