"""fastdino's probes against the official DINOv3 evaluation code (dinov3/eval/knn.py, linear.py,
data/transforms.py), number by number: the in-training kNN probe's transform, the linear probe's
batches and its default batch size."""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.linear import stream_batches, train_linear_probes


def test_training_knn_probe_sees_what_eval_knn_sees(tmp_path):
    """The in-training probe (train.knn_every -> fastdino.eval.knn) must extract the features of
    `fastdino eval knn`: the official eval transform (shorter side to 256/224 of the crop, centre
    crop), not the whole image squashed to a square, or its logged knn_top1 is another number
    than the eval command's on the same teacher. Non-square images tell the two apart."""
    from fastdino.eval.features import BackboneExtractor
    from fastdino.eval.knn import extract_features

    class Pixels(torch.nn.Module):
        """CLS = the input pixels themselves: any change of the transform changes it (a random
        init ViT's CLS barely depends on its input)."""

        patch_size = 16

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # the extractors' device

        def forward_features(self, x):
            return {"x_norm_clstoken": x.flatten(1), "x_norm_patchtokens": x.flatten(2).mT}

    rng = np.random.default_rng(0)
    samples = []
    for i, (w, h) in enumerate([(64, 32), (30, 70), (48, 48)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i))
    backbone = Pixels()
    probe_f, probe_y = extract_features(backbone, samples, image_size=32)
    cls = BackboneExtractor(backbone, 32, progress=False)([p for p, _ in samples])["cls"]
    torch.testing.assert_close(probe_f, torch.nn.functional.normalize(cls, dim=-1))
    assert probe_y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("n,batch", [(24, 128), (130, 128), (7, 7), (10, 4)])
def test_stream_batches_are_full_and_cut_from_back_to_back_passes(n, batch):
    """The official linear probe draws its batches from an infinite sampler with drop_last:
    every step has `batch` rows (never a short last batch of a pass), and the stream is whole
    reshuffled passes laid end to end."""
    steps = 9
    batches = list(stream_batches(n, batch, steps, torch.Generator().manual_seed(0)))
    assert len(batches) == steps and all(b.shape == (batch,) for b in batches)
    stream = torch.cat(batches)
    for p in range(len(stream) // n):  # each complete pass: every row exactly once
        assert sorted(stream[p * n:(p + 1) * n].tolist()) == list(range(n))


def test_small_set_cap_counts_real_passes(monkeypatch):
    """`max_epochs` caps a small set at that many passes: with 24 rows and batches of 128 the
    probe takes ceil(100 * 24 / 128) = 19 steps, which must be ~100 passes (19 x 128 rows), not
    19 passes of 24 rows each at the lr scaled for 128."""
    n, batch = 24, 128
    started = []
    real = torch.randperm

    def counting(size, *args, **kwargs):  # a pass over the train rows starts with a shuffle
        if size == n:
            started.append(size)
        return real(size, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = torch.arange(n) % 3
    res = train_linear_probes(x, y, x, y, 3, lrs=(0.1,), iterations=12500, max_epochs=100,
                              batch_size=batch)
    assert res["iterations"] == 19
    assert len(started) == -(-19 * batch // n)  # 102 shuffles: 101.3 passes of 24 rows
    assert res["epochs"] == pytest.approx(19 * batch / n)


def test_linear_probe_default_batch_is_the_official_global_batch():
    """dinov3/eval/linear.py: batch_size 128 per GPU, lr x batch * world_size / 256, launched on
    8 GPUs by default (dinov3/run/submit.py --ngpus 8): 1024 rows per step, and 12,500 steps are
    then its 10 passes over ImageNet-1k. 128 rows would train 8x fewer samples at lr / 8."""
    from fastdino.eval.cli import build_parser

    args = build_parser().parse_args(["linear", "--weights", "random", "--data", "digits"])
    assert args.probe_batch_size == 1024 and args.iterations == 12500
    assert inspect.signature(train_linear_probes).parameters["batch_size"].default == 1024
