"""Dense linear probe: mIoU by hand, sliding-window coverage and equivalence, data layout, and a
small end-to-end fit on synthetic masks."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.seg import (
    IGNORE,
    LinearSegHead,
    miou_from_confusion,
    seg_confusion,
    seg_eval,
    seg_logits,
    seg_splits,
    sliding_window_logits,
)
from fastdino.eval.weights import load_eval_backbone


def test_miou_from_a_hand_built_confusion():
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # rows: truth; class 2 never occurs
    res = miou_from_confusion(conf)
    iou0 = 5 / (5 + 2 + 1)  # TP / (TP + FP + FN)
    iou1 = 3 / (3 + 1 + 2)
    assert res["iou"][0] == pytest.approx(iou0) and res["iou"][1] == pytest.approx(iou1)
    assert res["iou"][2] is None  # absent in truth and prediction: not averaged
    assert res["miou"] == pytest.approx((iou0 + iou1) / 2)
    assert res["pixel_acc"] == pytest.approx(8 / 11)


def test_confusion_drops_ignore_pixels_and_rejects_unknown_ids():
    target = torch.tensor([[0, 1], [IGNORE, 1]])
    pred = torch.tensor([[0, 0], [1, 1]])
    assert seg_confusion(pred, target, 2).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="--num-classes"):
        seg_confusion(pred, torch.tensor([[0, 5], [1, 1]]), 2)


def test_sliding_window_covers_every_pixel():
    img = torch.randn(2, 3, 50, 70)  # neither side a multiple of the stride

    def identity(w):
        return w  # "logits" = the window's pixels: averaging copies must give the image back

    out = sliding_window_logits(identity, img, window=32, stride=21, n_classes=3)
    torch.testing.assert_close(out, img)

    def mark(w):
        return torch.ones(w.shape[0], 1, *w.shape[-2:])

    ones = sliding_window_logits(mark, img, window=32, stride=21, n_classes=1)
    assert torch.equal(ones, torch.ones_like(ones))
    small = torch.randn(1, 3, 20, 40)  # smaller than the window in one dimension: padded
    torch.testing.assert_close(sliding_window_logits(identity, small, 32, 21, 3), small)


def test_sliding_window_equals_full_forward_when_window_is_the_image():
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    torch.manual_seed(0)
    head = LinearSegHead(backbone.embed_dim, 4).eval()
    with torch.no_grad():
        head.bn.running_mean.normal_()
        head.conv.weight.normal_()
        x = torch.randn(1, 3, 48, 48)
        full = seg_logits(backbone, head, x)
        slid = sliding_window_logits(lambda w: seg_logits(backbone, head, w), x, 48, 32, 4)
        torch.testing.assert_close(slid, full, rtol=0, atol=0)
        # a smaller window sees less context: the result differs (the test can fail)
        assert not torch.allclose(
            sliding_window_logits(lambda w: seg_logits(backbone, head, w), x, 32, 21, 4), full)


def _synthetic_seg(root, n=8, size=64, seed=0):
    """Images of 16-px blocks coloured red / green / blue = classes 0 / 1 / 2 (mask PNGs)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220]], dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        blocks = rng.integers(0, 3, size=(size // 16, size // 16))
        mask = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
        img = colours[mask] + rng.integers(0, 20, size=(size, size, 3)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"s{i:02d}.jpg")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i:02d}.png")


def test_probe_learns_synthetic_masks(tmp_path):
    _synthetic_seg(tmp_path)
    train, val = seg_splits(tmp_path)
    assert (len(train), len(val)) == (6, 2)
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    res = seg_eval(backbone, train, val, crop=64, iterations=10, batch_size=6, lr=1e-2,
                   scale_range=(1.0, 1.0), progress=False)
    assert res["n_classes"] == 3 and res["stride"] == 43
    # chance is ~1/3 per class IoU ~ 0.2; colour is linear in the patch embedding
    assert res["miou"] > 0.6, res


def test_missing_masks_are_named(tmp_path):
    _synthetic_seg(tmp_path, n=2)
    (tmp_path / "masks" / "s01.png").unlink()
    with pytest.raises(FileNotFoundError, match="s01.jpg"):
        seg_splits(tmp_path)


def test_a_mask_id_beyond_num_classes_is_named_before_training(tmp_path, capsys):
    """--num-classes 2 on masks holding id 2: cross-entropy would fail with torch's "Target 2 is
    out of bounds" (a device assert on CUDA); the training set names the mask file, the id and
    --num-classes, also from a DataLoader worker (one line, not the worker's traceback)."""
    from fastdino.eval.cli import main
    from fastdino.eval.seg import MaskClassError

    _synthetic_seg(tmp_path / "d", n=4)
    train, val = seg_splits(tmp_path / "d")
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    for workers in (0, 1):
        with pytest.raises(MaskClassError) as e:
            seg_eval(backbone, train, val, n_classes=2, crop=64, iterations=2, batch_size=1,
                     num_workers=workers, progress=False)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("mask '"), msg
        assert ".png' holds class id 2: with --num-classes 2 allowed are 0..1 and 255" in msg
        assert "pass --num-classes 3 or more" in msg
    with pytest.raises(MaskClassError, match=r"class id 2 \(1 after --reduce-zero-label\)"):
        seg_eval(backbone, train, val, n_classes=1, crop=64, iterations=2, batch_size=1,
                 reduce_zero_label=True, progress=False)
    assert main(["seg", "--weights", "random", "--arch", "vit_test", "--data",
                 str(tmp_path / "d"), "--num-classes", "2", "--crop", "64", "--iterations", "2",
                 "--batch-size", "1", "--num-workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdino eval seg: error: mask '") and err.count("\n") == 1, err
