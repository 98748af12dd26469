"""Linear probe: fits a linearly separable set, picks the best lr, summarises confusions."""

import torch

from fastdino.eval.linear import (
    confusion_matrix,
    linear_features,
    most_confused,
    train_linear_probes,
)


def _blobs(n_per_class, n_classes=5, dim=64, sep=4.0, seed=0):
    """Class c = Gaussian noise (std 1) + sep * e_c: linearly separable with a wide margin, and
    not along the random init's directions."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), dim, generator=gen)
    x[torch.arange(len(y)), y] += sep
    return x, y


def test_fits_separable_features_and_picks_the_best_lr():
    x_tr, y_tr = _blobs(40)
    x_va, y_va = _blobs(20, seed=1)
    res = train_linear_probes(x_tr, y_tr, x_va, y_va, 5, lrs=(1e-7, 1e-1, 1e-4),
                              iterations=60, batch_size=32)
    acc = res["per_lr"]
    assert acc[0.1] >= 0.97, acc
    assert acc[1e-7] < 0.7, acc  # barely moves from its random init
    assert res["best"]["lr"] == 0.1 and res["best"]["top1"] == acc[0.1]
    assert res["best"]["lr"] == max(acc, key=acc.get)
    assert res["iterations"] == 60
    # each head trains on its own: the 0.1 head's result does not depend on its neighbours
    alone = train_linear_probes(x_tr, y_tr, x_va, y_va, 5, lrs=(1e-1,), iterations=60,
                                batch_size=32)
    assert alone["per_lr"][0.1] >= 0.97


def test_small_sets_are_capped_at_max_epochs():
    x, y = _blobs(10)
    res = train_linear_probes(x, y, x, y, 5, lrs=(0.1,), iterations=12500, max_epochs=3,
                              batch_size=16)
    assert res["iterations"] == 3 * 50 // 16 + 1  # ceil(3 * 50 / 16) = 10


def test_confusion_summary_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 1])
    conf = confusion_matrix(pred, y, 3)
    assert conf.tolist() == [[1, 2, 0], [1, 1, 0], [1, 1, 2]]
    top = most_confused(conf, top=2, classes=["a", "b", "c"])
    assert top[0] == {"true": "a", "pred": "b", "count": 2, "frac_of_true": 2 / 3}
    assert top[1]["count"] == 1 and (top[1]["true"], top[1]["pred"]) == ("b", "a")
    assert most_confused(torch.eye(3, dtype=torch.long)) == []  # nothing confused


def test_linear_features_are_cls_then_patch_mean():
    f = linear_features({"cls": torch.ones(2, 3), "patch_mean": torch.zeros(2, 3)})
    assert f.shape == (2, 6) and f[:, :3].eq(1).all() and f[:, 3:].eq(0).all()


def test_the_epoch_cap_is_logged_when_it_applies(caplog):
    """--iterations 12500 on 50 images trained 10 steps without a word."""
    x, y = _blobs(10)
    with caplog.at_level("INFO", logger="fastdino.eval"):
        res = train_linear_probes(x, y, x, y, 5, lrs=(0.1,), iterations=12500, max_epochs=3,
                                  batch_size=16)
    assert (res["iterations"], res["iterations_requested"]) == (10, 12500)
    notes = [r.getMessage() for r in caplog.records]
    assert ("linear probe: --iterations 12500 capped at 10 (3 passes over the 50 training "
            "images at batch 16; a small set needs no more)") in notes, notes
    caplog.clear()
    with caplog.at_level("INFO", logger="fastdino.eval"):
        res = train_linear_probes(x, y, x, y, 5, lrs=(0.1,), iterations=5, max_epochs=3,
                                  batch_size=16)
    assert res["iterations"] == 5 and not any("capped" in r.getMessage() for r in caplog.records)
