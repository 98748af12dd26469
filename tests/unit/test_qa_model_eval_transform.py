"""The eval transform's geometry is torchvision's Resize(short) + CenterCrop (the official
`make_classification_eval_transform`): output size truncated, crop offset rounded."""

from __future__ import annotations

import pytest
from PIL import Image

from fastdino.eval.features import resize_center_crop


@pytest.mark.parametrize("w, h, size, resized, box", [
    # 640x427 -> long side int(256 * 640 / 427) = int(383.7) = 383 (round gave 384);
    # crop left int(round((383 - 224) / 2)) = round(79.5) = 80 (banker's, as torchvision)
    (640, 427, 224, (383, 256), (80, 16, 304, 240)),
    # portrait; 500x333 -> int(256 * 500 / 333) = 384, top round(80.0) = 80
    (333, 500, 224, (256, 384), (16, 80, 240, 304)),
    # another crop size: short int(32 * 256 / 224) = 36 (round gave 37), long int(36 * 3) = 108
    (300, 100, 32, (108, 36), (38, 2, 70, 34)),
])
def test_resize_and_crop_follow_torchvision(monkeypatch, w, h, size, resized, box):
    calls = []
    resize, crop = Image.Image.resize, Image.Image.crop
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, s, *a, **k: calls.append(("resize", tuple(s)))
                        or resize(self, s, *a, **k))
    monkeypatch.setattr(Image.Image, "crop",
                        lambda self, b, *a, **k: calls.append(("crop", tuple(b)))
                        or crop(self, b, *a, **k))
    out = resize_center_crop(Image.new("RGB", (w, h)), size)
    assert out.size == (size, size)
    assert calls == [("resize", resized), ("crop", box)]
