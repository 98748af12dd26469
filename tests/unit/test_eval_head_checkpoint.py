"""Dense probe heads saved while they train (fastdino/eval/head_checkpoint.py): an interrupted fit
resumes with its optimizer moments and lr schedule (on a one-image dataset the resumed fit equals
the uninterrupted one bit for bit), a finished one is evaluated again without training, and a
file of another probe is refused naming what differs."""

import json

import pytest
import torch
from torch import nn

from fastdino.eval.dense import fit_head
from fastdino.eval.head_checkpoint import HeadCheckpoint

KEY = dict(task="seg", weights="abc", iterations=6)


class _One(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.arange(4.0), torch.tensor(1.0)


def _fit(head, steps, ckpt=None, stop_at=None):
    def loss_fn(x, y, step):
        steps.append(step)
        if step == stop_at:
            raise KeyboardInterrupt("killed")
        return ((head(x).squeeze(-1) - y) ** 2).mean()

    return fit_head(head, _One(), loss_fn, iterations=6, batch_size=1, lr=0.1,
                    weight_decay=0.01, progress=False, checkpoint=ckpt)


def _head(seed):
    torch.manual_seed(seed)
    return nn.Linear(4, 1)


def test_interrupted_fit_resumes_exactly_and_a_finished_one_is_not_retrained(tmp_path):
    full = _fit(_head(0), [])
    steps = []
    with pytest.raises(KeyboardInterrupt):
        _fit(_head(0), steps, HeadCheckpoint(tmp_path, KEY, every=3), stop_at=4)
    assert steps == [0, 1, 2, 3, 4]
    assert torch.load(tmp_path / "head.pt", weights_only=True)["step"] == 3
    steps = []  # another init: everything that matters comes from the file
    resumed = _fit(_head(1), steps, HeadCheckpoint(tmp_path, KEY, every=3))
    assert steps == [3, 4, 5]
    for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b)
    # without the optimizer's moments the resumed fit would differ (the test can fail)
    st = torch.load(tmp_path / "head.pt", weights_only=True)
    assert st["step"] == 6 and st["optimizer"]["state"]
    steps = []
    again = _fit(_head(2), steps, HeadCheckpoint(tmp_path, KEY, every=3))
    assert steps == [] and torch.equal(again.weight, full.weight)


def test_a_head_of_another_probe_is_refused(tmp_path):
    _fit(_head(0), [], HeadCheckpoint(tmp_path, KEY, every=3))
    other = {**KEY, "weights": "def", "lr": 0.5}
    with pytest.raises(ValueError, match=r"another probe \(lr: '<absent>' there, 0.5 now, "
                                         r"weights: 'abc' there, 'def' now\)"):
        _fit(_head(0), [], HeadCheckpoint(tmp_path, other, every=3))
    with pytest.raises(ValueError, match="--checkpoint-every 0 is invalid"):
        HeadCheckpoint(tmp_path, KEY, every=0)


def test_seg_command_saves_the_head_and_reevaluates_it(tmp_path, monkeypatch, capsys):
    from test_eval_seg import _synthetic_seg

    from fastdino.eval.cli import main

    _synthetic_seg(tmp_path / "data", n=4)

    def args(iterations):
        return ["seg", "--weights", "random", "--arch", "vit_test", "--data",
                str(tmp_path / "data"), "--crop", "64", "--iterations", str(iterations),
                "--batch-size", "3", "--num-workers", "0", "--quiet", "--output-dir",
                str(tmp_path / "out"), "--checkpoint-every", "2"]

    assert main(args(4)) == 0
    first = json.loads((tmp_path / "out" / "result.json").read_text())
    assert torch.load(tmp_path / "out" / "head.pt", weights_only=True)["step"] == 4
    # the same command again: evaluated with the saved head, no training step
    monkeypatch.setattr("fastdino.eval.seg.F.cross_entropy",
                        lambda *a, **k: pytest.fail("the finished head was trained again"))
    assert main(args(4)) == 0
    again = json.loads((tmp_path / "out" / "result.json").read_text())
    assert again["miou"] == first["miou"] and again["iou"] == first["iou"]
    capsys.readouterr()
    assert main(args(5)) == 2  # a usage error: one line, exit status 2
    assert "another probe (iterations: 4 there, 5 now)" in capsys.readouterr().err
