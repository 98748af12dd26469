"""The kNN protocol: weighted votes by hand, 100% on a separable set, splits, agreement with
fastdino.eval.knn (the trainer's in-training probe)."""

import math

import pytest
import torch

from fastdino.eval.knn import knn_classify
from fastdino.eval.knn_protocol import (
    knn_eval,
    knn_from_features,
    knn_scores,
    labelled_splits,
    topk_accuracy,
)


def _unit(cos):
    return torch.tensor([cos, math.sqrt(1 - cos * cos)])


def test_softmax_weighted_vote_by_hand():
    # query (1, 0); two class-0 neighbours at cosine 0.1 and one class-1 neighbour at cosine 0.9
    train_f = torch.stack([_unit(0.1), _unit(0.1), _unit(0.9)])
    train_y = torch.tensor([0, 0, 1])
    q = torch.tensor([[1.0, 0.0]])
    T = 0.07
    e_far, e_near = math.exp(0.1 / T), math.exp(0.9 / T)
    expected = torch.tensor([[2 * e_far, e_near]]) / (2 * e_far + e_near)
    scores = knn_scores(train_f, train_y, q, k=3, temperature=T, n_classes=2)
    torch.testing.assert_close(scores.double(), expected.double(), rtol=1e-5, atol=1e-7)
    assert scores.argmax(1).item() == 1  # the close neighbour outweighs the majority
    # a hot temperature flattens the weights into a plain majority vote: class 0 wins
    assert knn_scores(train_f, train_y, q, 3, 1e4, 2).argmax(1).item() == 0
    # k larger than the train set is clipped (= all 3 points), not an error
    torch.testing.assert_close(knn_scores(train_f, train_y, q, 200, T, 2), scores)


def _stub_set(n_classes=4, n_train=12, n_val=6, dim=8, noise=0.15, seed=0):
    """Paths 'c<class>_<split><i>' and a stub extractor: one-hot(class) + Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    table = {}
    train, val = [], []
    for c in range(n_classes):
        for split, n, out in (("t", n_train, train), ("v", n_val, val)):
            for i in range(n):
                path = f"c{c}_{split}{i}"
                table[path] = torch.nn.functional.one_hot(torch.tensor(c), dim).float() \
                    + noise * torch.randn(dim, generator=gen)
                out.append((path, c))

    def extractor(paths):
        cls = torch.stack([table[p] for p in paths])
        return {"cls": cls, "patch_mean": -cls}

    return extractor, train, val


def test_separable_stub_features_give_100_percent_for_every_k():
    extractor, train, val = _stub_set()
    res = knn_eval(extractor, train, val, ks=(10, 20, 100, 200), temperature=0.07)
    for k in (10, 20, 100, 200):
        assert res[f"k{k}"]["top1"] == 1.0, (k, res)
    assert res["k100"]["k_used"] == res["k200"]["k_used"] == len(train) == 48
    # labels shuffled against the features: the same pipeline drops to about chance
    shuffled = [(p, (y + i) % 4) for i, (p, y) in enumerate(train)]
    assert knn_eval(extractor, shuffled, val, ks=(10,))["k10"]["top1"] < 0.6


def test_top1_agrees_with_the_training_probe_and_top5_counts_ties_low_id_first():
    gen = torch.Generator().manual_seed(0)
    train_f = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=1)
    train_y = torch.randint(0, 7, (200,), generator=gen)
    val_f = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen), dim=1)
    val_y = torch.randint(0, 7, (50,), generator=gen)
    ours = knn_from_features(train_f, train_y, val_f, val_y, ks=(1, 10, 20), n_classes=7)
    theirs = knn_classify(train_f, train_y, val_f, val_y, ks=(1, 10, 20), temperature=0.07)
    for k in (1, 10, 20):
        assert ours[f"k{k}"]["top1"] == pytest.approx(theirs[k])
    # query chunking (used for large train sets) does not change the scores
    torch.testing.assert_close(knn_scores(train_f, train_y, val_f, 10, 0.07, 7, chunk=7),
                               knn_scores(train_f, train_y, val_f, 10, 0.07, 7))
    scores = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([0, 2]), 1) == 1.0  # tie -> lowest id
    assert topk_accuracy(scores, torch.tensor([1, 1]), 1) == 0.0
    assert topk_accuracy(scores, torch.tensor([1, 1]), 2) == 1.0


def _touch_images(root, rels):
    from PIL import Image
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)


def test_splits_by_subfolder_and_by_split_file(tmp_path):
    a = tmp_path / "a"
    _touch_images(a, ["train/cat/1.png", "train/dog/2.png", "val/cat/3.png", "val/dog/4.png"])
    train, val, classes = labelled_splits(a)
    assert classes == ["cat", "dog"]
    assert [y for _, y in train] == [0, 1] and val[1][0].endswith("val/dog/4.png")

    b = tmp_path / "b"
    _touch_images(b, ["cat/1.png", "cat/2.png", "dog/3.png", "dog/4.png"])
    split = tmp_path / "split.txt"
    split.write_text("# comment\ntrain cat/1.png\ntrain dog/3.png\nval cat/2.png\nval dog/4.png\n")
    train, val, classes = labelled_splits(b, split)
    assert classes == ["cat", "dog"]
    assert [(p.split("/")[-1], y) for p, y in val] == [("2.png", 0), ("4.png", 1)]
    split.write_text("test cat/1.png\n")
    with pytest.raises(ValueError, match="split.txt:1.*allowed is 'train"):
        labelled_splits(b, split)
    split.write_text("train cat/9.png\nval dog/4.png\n")
    with pytest.raises(FileNotFoundError, match="cat/9.png"):
        labelled_splits(b, split)


def test_k_below_one_and_a_temperature_not_above_zero_are_refused_naming_the_flag():
    """k = 0 / T = 0 / T < 0 printed plausible accuracies; k < 0 crashed in topk."""
    g = torch.Generator().manual_seed(0)
    tf, vf = torch.randn(20, 8, generator=g), torch.randn(6, 8, generator=g)
    ty, vy = torch.arange(20) % 3, torch.arange(6) % 3
    knn_from_features(tf, ty, vf, vy, ks=(1,), temperature=0.07)  # the smallest allowed k
    for ks, t, flag in (((0,), 0.07, "--k 0"), ((10, -1), 0.07, "--k -1"),
                        ((10,), 0.0, "--temperature 0.0"), ((10,), -0.07, "--temperature -0.07"),
                        ((10,), float("nan"), "--temperature nan")):
        with pytest.raises(ValueError, match=f"{flag} is invalid: allowed"):
            knn_from_features(tf, ty, vf, vy, ks=ks, temperature=t)
