"""TIFF input (USERS.md §1: satellite and medical users' folders are TIFF): found by every listing
(folder walks, patterns, tar shards, file lists), decoded in every mode such folders hold by the
torch loader's decode and by the DALI loader, a TIFF PIL cannot read skipped and counted; files a
folder walk leaves out for their extension are said in one line."""

import io
import logging
import tarfile

import numpy as np
import pytest
from dali_helpers import cpu_decode, needs_dali
from PIL import Image

from fastdino.config import load_config
from fastdino.data import dali_plan as P
from fastdino.data import sources
from fastdino.data.datasets import ImageFolderUnlabeled, LabelledImageFolder, decode_rgb
from fastdino.data.labelled import labelled_images
from fastdino.data.loader import build_train_loader

RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
RAMP16 = np.array([[0, 32768, 65535]], dtype=np.uint16)


def _tiff(arr, photometric, compression=1):
    """A little-endian baseline TIFF of `arr` ([H, W] or [H, W, C], chunky) written by hand: PIL
    cannot write what it cannot read (5 bands, signed 16-bit, an unknown compression)."""
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    c = arr.shape[2] if arr.ndim == 3 else 1
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    fmt = {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    colour = 3 if photometric == 2 else 1
    tags = [(256, w), (257, h), (258, [arr.dtype.itemsize * 8] * c), (259, compression),
            (262, photometric), (273, None), (277, c), (278, h), (279, len(data)), (284, 1),
            (339, [fmt] * c)]
    if c > colour:
        tags.append((338, [0] * (c - colour)))  # extra samples: unspecified
    tags.sort()
    ifd_size = 2 + 12 * len(tags) + 4
    extra, entries = b"", []
    for tag, value in tags:
        values = value if isinstance(value, list) else [value]
        typ = 4 if tag in (273, 279) else 3  # LONG offsets / counts, SHORT otherwise
        raw = b"".join(int(v or 0).to_bytes(4 if typ == 4 else 2, "little") for v in values)
        if len(raw) > 4:  # stored after the IFD
            entries.append((tag, typ, len(values), 8 + ifd_size + len(extra)))
            extra += raw
        else:
            entries.append((tag, typ, len(values), raw))
    data_offset = 8 + ifd_size + len(extra)
    out = b"II*\x00" + (8).to_bytes(4, "little") + len(entries).to_bytes(2, "little")
    for tag, typ, count, value in entries:
        if tag == 273:
            value = data_offset.to_bytes(4, "little")
        elif isinstance(value, int):
            value = value.to_bytes(4, "little")
        out += (tag.to_bytes(2, "little") + typ.to_bytes(2, "little")
                + count.to_bytes(4, "little") + value.ljust(4, b"\x00"))
    return out + b"\x00" * 4 + extra + data


def _pil_tiff(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format="TIFF", **kw)
    return buf.getvalue()


def _every_mode():
    """{file name: (TIFF bytes, the RGB array it must decode to)}: the modes users' TIFFs hold."""
    grey = RGB[..., 0]
    page2 = Image.fromarray(255 - RGB[:10, :12])
    cmyk = Image.fromarray(RGB).convert("CMYK")
    return {
        "a_rgb.tif": (_pil_tiff(Image.fromarray(RGB)), RGB),
        "b_rgb_lzw.TIFF": (_pil_tiff(Image.fromarray(RGB), compression="tiff_lzw"), RGB),
        "c_grey.tiff": (_pil_tiff(Image.fromarray(grey)), np.stack([grey] * 3, -1)),
        # 16-bit, both byte orders (mode I;16 / I;16B): 0..65535 -> 0..255, not clipped
        "d_u16.tif": (_pil_tiff(Image.fromarray(RAMP16)), [0, 128, 255]),
        "e_u16_big_endian.tif": (_pil_tiff(Image.fromarray(RAMP16.astype(">u2"))), [0, 128, 255]),
        # float32 reflectance 0..1 (mode F): stretched to 0..255, not all black
        "f_float.tif": (_pil_tiff(Image.fromarray(np.array([[0, 0.5, 1]], np.float32))),
                        [0, 128, 255]),
        "g_multipage.tif": (_pil_tiff(Image.fromarray(RGB), save_all=True,
                                      append_images=[page2]), RGB),  # first page
        "h_cmyk.tif": (_pil_tiff(cmyk), np.asarray(cmyk.convert("RGB"))),
        "i_rgba.tif": (_pil_tiff(Image.fromarray(RGB).convert("RGBA")), RGB),
        # signed 16-bit (CT in Hounsfield units): its own min..max
        "j_i16.tif": (_tiff(np.array([[-1000, 1000, 3000]], np.int16), 1), [0, 128, 255]),
        "k_bilevel.tif": (_pil_tiff(Image.fromarray(grey > 128)),
                          np.stack([np.where(grey > 128, 255, 0)] * 3, -1)),
        # RGB + 2 extra bands (multispectral saved as RGB + extra samples): its RGB
        "l_rgb_2extra.tif": (_tiff(np.concatenate([RGB, RGB[..., :2]], -1), 2), RGB),
    }


def _expected(want, size):
    want = np.asarray(want, dtype=np.uint8)
    if want.ndim == 1:  # one row of grey levels
        want = np.stack([want[None]] * 3, -1)
    assert want.shape[:2] == size[::-1]
    return want


def _cfg(root, *extra, batch=4):
    return load_config(None, [f"data.root={root}", "crops.global_crops_size=32",
                              "crops.local_crops_size=16", "crops.local_crops_number=2",
                              "model.patch_size=16", f"data.batch_size_per_gpu={batch}",
                              "data.num_workers=0", *extra])


def test_a_tiff_folder_is_found_and_every_mode_decodes(tmp_path):
    """A TIFF-only folder was 'no images found ... allowed extensions .jpg ... .bmp'; now every
    file is listed (.tif / .tiff, any case) and decodes to the RGB its mode means."""
    cases = _every_mode()
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    ds = ImageFolderUnlabeled(root=tmp_path)
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == sorted(cases)
    for i, name in enumerate(sorted(cases)):
        img, used, skipped = ds.load(i)
        assert (img.mode, used, skipped) == ("RGB", i, ()), name
        assert np.array_equal(np.asarray(img), _expected(cases[name][1], img.size)), name


def test_float_and_wide_integer_tiffs_use_their_data_range():
    """Mode F / I data whose range the mode does not say: float within 0..1 -> x 255 (was all
    black), float beyond 0..255 -> 0..max (not 0..65535: a float has no 16-bit depth), negative
    data -> min..max (was clipped to black), NaN -> the low end, inf -> the ends."""
    def grey(arr, **kw):
        return np.asarray(decode_rgb(_pil_tiff(Image.fromarray(arr), **kw)))[0, :, 0].tolist()

    assert grey(np.array([[0, 0.25, 1]], np.float32)) == [0, 64, 255]
    assert grey(np.array([[0, 1500, 3000]], np.float32)) == [0, 128, 255]
    assert grey(np.array([[-30, -15, 0]], np.float32)) == [0, 128, 255]  # SAR in dB
    assert grey(np.array([[np.nan, np.inf, 0, 0.5, -np.inf]], np.float32)) == [0, 255, 0, 128, 0]
    assert grey(np.array([[-1024, 0, 3071]], np.int32)) == [0, 64, 255]  # CT, stored as 32-bit
    assert grey(np.array([[0, 100, 200]], np.int32)) == [0, 100, 200]  # 8-bit data: as is
    # 16-bit modes keep their fixed 0..65535 (as 16-bit PNGs)
    assert grey(np.array([[0, 4096]], np.uint16)) == [0, 16]


def test_tiffs_pil_cannot_read_are_skipped_and_counted(tmp_path):
    """5 grey bands (multispectral), 4 grey bands, an unknown compression, a truncated file: each is
    skipped and counted by the loader, never a crash; the readable TIFFs train."""
    good = _pil_tiff(Image.fromarray(RGB))
    (tmp_path / "a_good.tif").write_bytes(good)
    (tmp_path / "b_good.tiff").write_bytes(_pil_tiff(Image.fromarray(RGB[..., 1])))
    bad = {"c_5band.tif": _tiff(RGB[..., [0, 1, 2, 0, 1]], 1),
           "d_4grey.tif": _tiff(RGB[..., [0, 1, 2, 0]], 1),
           "e_unknown_compression.tif": _tiff(RGB, 2, compression=65_000),
           "f_truncated.tif": good[:len(good) // 2]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        # what such a TIFF is, said (PIL: "cannot identify image file <_io.BytesIO ...>")
        why = "image file is truncated" if "truncated" in name else "TIFF that PIL cannot read"
        with pytest.raises(OSError, match=why):
            decode_rgb(data)
        with pytest.raises(OSError, match=f"{tmp_path / name}: .*{why}" if "truncated" not in
                           name else why):
            decode_rgb(str(tmp_path / name))
        with pytest.raises(P.UnreadableImage, match=why if "truncated" not in name else "short"):
            P.probe_image(data)  # the DALI loader's probe says it too
    loader = build_train_loader(_cfg(tmp_path, batch=3))
    for _ in range(4):  # 12 draws from 6 files: every file is met
        b = next(loader)
        assert b.global_crops.shape == (6, 3, 32, 32)
    assert {p.rsplit("/", 1)[1] for p in loader.skipped} == set(bad)


def test_mixed_folder_counts_and_one_line_for_what_is_left_out(tmp_path, caplog):
    """x.tif beside x.jpg was left out of the count with no message, as any other extension.
    Now: .tif counted; the rest said in ONE line per listing (count, per extension, an example,
    what is allowed), a warning when some look like images (.gif), info for notes / sidecars."""
    Image.fromarray(RGB).save(tmp_path / "a.jpg")
    (tmp_path / "b.tif").write_bytes(_pil_tiff(Image.fromarray(RGB)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.TIF").write_bytes(_pil_tiff(Image.fromarray(RGB)))
    Image.fromarray(RGB).save(tmp_path / "sub" / "d.gif")
    (tmp_path / "sub" / "d.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        ds = ImageFolderUnlabeled(root=tmp_path)
    assert len(ds) == 3 and ds.paths[1].endswith("b.tif")
    lines = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "left out 3 file(s)" in msg and str(tmp_path / "sub" / "d.gif") in msg
    assert "1 .gif" in msg and "1 .txt" in msg and ".tif, .tiff" in msg

    # notes only: info, not a warning; a brace pattern of two folders: still one line
    other = tmp_path.parent / f"{tmp_path.name}_other"
    other.mkdir()
    Image.fromarray(RGB).save(other / "e.png")
    (other / "labels.csv").write_text("x")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        assert len(ImageFolderUnlabeled(root=f"{{{tmp_path},{other}}}")) == 4
    lines = [r for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and "left out 4 file(s)" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        ImageFolderUnlabeled(root=other)
    lines = [r for r in caplog.records if "left out" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO]


def test_labelled_folder_takes_tifs_and_says_what_it_left_out_once(tmp_path, caplog):
    for cls in ("cat", "dog", "eel"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.tif").write_bytes(_pil_tiff(Image.fromarray(RGB)))
        (tmp_path / cls / "readme.md").write_text("x")
    with caplog.at_level(logging.INFO, logger="fastdino.data"):
        ds = LabelledImageFolder(tmp_path)
    assert [label for _, label in ds.samples] == [0, 1, 2]
    assert np.array_equal(np.asarray(ds[2][0]), RGB)
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 1 and "left out 3 file(s)" in lines[0]  # not one line per class


def test_tar_shards_and_file_lists_take_tif_members(tmp_path, monkeypatch):
    """WebDataset shards holding <key>.tif / <key>.tiff, a file list naming a .tif file and a
    shard's .tif member; the shard index cached before .tif was an image extension is stale."""
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    files = {"k0.tif": _pil_tiff(Image.fromarray(RGB)), "k0.cls": b"3",
             "k1.tiff": _pil_tiff(Image.fromarray(RAMP16)), "k1.cls": b"5"}
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # a run of the old code cached the shard's table without its .tif members
    monkeypatch.setattr(sources, "IMAGE_EXTENSIONS", (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    assert sources.index_shard_cached(str(shard)) == []
    monkeypatch.undo()
    monkeypatch.setenv("FASTDINO_CACHE", str(tmp_path / "cache"))
    ds = ImageFolderUnlabeled(root=shard)
    assert list(ds.paths) == [f"{shard}/k0.tif", f"{shard}/k1.tiff"]
    assert np.array_equal(np.asarray(ds.decode(0)), RGB)
    assert np.asarray(ds.decode(1))[0, :, 0].tolist() == [0, 128, 255]
    samples, labels = labelled_images(str(shard))
    assert [lab for _, lab in samples] == ["3", "5"] and labels == ["3", "5"]

    loose = tmp_path / "loose.TIFF"
    loose.write_bytes(files["k0.tif"])
    lst = tmp_path / "list.txt"
    lst.write_text(f"{loose}\n{shard}/k1.tiff\n")
    ds = ImageFolderUnlabeled(file_list=lst)
    assert list(ds.paths) == [str(loose), f"{shard}/k1.tiff"]
    assert [ds.load(i)[1:] for i in range(2)] == [(0, ()), (1, ())]


@needs_dali
def test_dali_cpu_decoder_gives_every_tiff_the_torch_loaders_pixels():
    """Through the DALI loader's probe and DALI's CPU decoder, each mode decodes to exactly what
    the torch loader decodes. Before: a bilevel or signed 16-bit TIFF stopped the pipeline (the
    recovery found that PIL reads it and stopped the run), grey + alpha came out wrong, 16-bit and
    float by DALI's own scaling."""
    cases = _every_mode()
    cases["m_grey_alpha.tif"] = (_pil_tiff(Image.fromarray(RGB[..., 0]).convert("LA")),
                                 np.stack([RGB[..., 0]] * 3, -1))
    cases["n_float_big.tif"] = (_pil_tiff(Image.fromarray(np.array([[0, 1500, 3000]],
                                                                   np.float32))), [0, 128, 255])
    for name, (data, want) in cases.items():
        encoded, width, height = P.probe_image(data)
        out = cpu_decode(encoded)
        assert out.shape == (height, width, 3), name
        assert np.array_equal(out, _expected(want, (width, height))), name
        assert np.array_equal(out, np.asarray(decode_rgb(data))), name


@needs_dali
def test_dali_loader_trains_on_a_tiff_folder_and_skips_a_broken_tiff(tmp_path):
    from fastdino.data.dali import build_dali_loader

    for name, (data, _) in _every_mode().items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "z_5band.tif").write_bytes(_tiff(RGB[..., [0, 1, 2, 0, 1]], 1))
    loader = build_dali_loader(_cfg(tmp_path, "data.num_workers=1", batch=6),
                               exact_hue=False, photometric="dali", source_workers=0)
    for _ in range(3):  # 18 draws from 13 files: every file is met
        b = next(loader)
        assert b.global_crops.shape == (12, 3, 32, 32)
    assert loader.skipped == {str(tmp_path / "z_5band.tif")}
