"""QA (USERS.md §1, remote sensing): TIFF layouts of scientific data. A 16-bit single-band TIFF
with a colormap (a palette image: class maps, false-colour products) was skipped as
"photometric 3 ... not taken", though PIL shows an 8-bit one in its colours: it decodes to its
colormap's colours (each entry's high byte, PIL's 8-bit palette rule), under both loaders."""

import io

import numpy as np
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

