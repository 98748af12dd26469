"""`fastdino eval ...` end to end on a small real labelled set (scikit-learn digits), and pca."""

import json
import shutil

import pytest

from fastdino.eval.cli import main

pytest.importorskip("sklearn", reason="the digits sample set is the eval extra")


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory):
    """3 digits x (12 train, 4 val) of fastdino's embedded digits set (32 px RGB PNGs)."""
    from fastdino.data.sample_data import digits_labelled_dir
    src = digits_labelled_dir()
    dst = tmp_path_factory.mktemp("digits")
    for split, n in (("train", 12), ("val", 4)):
        for digit in ("0", "1", "7"):
            (dst / split / digit).mkdir(parents=True)
            for f in sorted((src / split / digit).iterdir())[:n]:
                shutil.copy(f, dst / split / digit / f.name)
    return dst


def test_knn_then_linear_share_the_feature_cache(digits_subset, tmp_path, caplog):
    cache = tmp_path / "cache"
    common = ["--weights", "random", "--arch", "vit_test", "--data", str(digits_subset),
              "--image-size", "32", "--num-workers", "0", "--cache-dir", str(cache), "--quiet"]
    assert main(["knn", *common, "--json", str(tmp_path / "knn.json")]) == 0
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["classes"] == ["0", "1", "7"] and (res["n_train"], res["n_val"]) == (36, 12)
    assert res["k100"]["k_used"] == res["k200"]["k_used"] == 36
    assert all(0.0 <= res[f"k{k}"]["top1"] <= 1.0 for k in (10, 20, 100, 200))
    assert len(list(cache.glob("*.pt"))) == 2  # train and val
    caplog.clear()
    with caplog.at_level("INFO", logger="fastdino.eval"):
        assert main(["linear", *common, "--iterations", "30",
                     "--json", str(tmp_path / "lin.json")]) == 0
    assert caplog.text.count("cache hit") == 2  # no second extraction
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert lin["feature_dim"] == 64 and len(lin["per_lr"]) == 13  # CLS + patch mean; 13 lrs
    assert lin["best"]["top1"] == max(lin["per_lr"].values())


def test_pca_command_writes_images(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 30), (10, 10, 200)).save(tmp_path / "b.jpg")
    assert main(["pca", "--weights", "random", "--arch", "vit_test", str(tmp_path / "a.png"),
                 str(tmp_path / "b.jpg"), "--out", str(tmp_path / "out"), "--resolution", "32",
                 "--shared", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_pca.png", "a_side.png", "b_pca.png", "b_side.png", "grid.png"]


def test_bad_weights_exit_with_a_clear_error(tmp_path, capsys):
    """A bad --weights path, file or --arch is one line on stderr and exit status 2 (as argparse's
    errors), never a traceback."""
    import torch

    (tmp_path / "cut.pth").write_bytes(b"\x80\x02junk")
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, tmp_path / "small.pth")
    tag = tmp_path / "run" / "checkpoints" / "iter_1"
    tag.mkdir(parents=True)
    torch.save({"iteration": 1}, tag / "trainer_state.pt")  # no teacher: a KeyError
    cases = [
        (["--weights", str(tmp_path / "none.pth"), "--arch", "vit_test"], "does not exist"),
        (["--weights", str(tmp_path / "cut.pth"), "--arch", "vit_test"],
         "cut.pth' is not a readable torch file"),
        (["--weights", str(tmp_path / "small.pth"), "--arch", "vit_nope"],
         "--arch 'vit_nope' is invalid: allowed is one of vit_test"),
        (["--weights", str(tmp_path / "small.pth")], "the architecture is unknown; pass --arch"),
        (["--weights", str(tag), "--arch", "vit_test"],  # a KeyError: its message, no repr
         f"error: {tag / 'trainer_state.pt'} has no 'teacher' entry (keys: iteration)\n"),
    ]
    for args, message in cases:
        assert main(["knn", *args, "--data", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastdino eval knn: error: ") and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_depth_command(tmp_path, capsys):
    from test_eval_depth import _synthetic_depth

    _synthetic_depth(tmp_path / "nyu", n=4)
    assert main(["depth", "--weights", "random", "--arch", "vit_test", "--data",
                 str(tmp_path / "nyu"), "--crop", "32", "48", "--iterations", "5",
                 "--batch-size", "3", "--num-workers", "0", "--no-flip-tta", "--quiet",
                 "--json", str(tmp_path / "depth.json")]) == 0
    res = json.loads((tmp_path / "depth.json").read_text())
    assert res["command"] == "depth" and res["n_train"] == 3 and res["n_val"] == 1
    assert res["window"] == [32, 48] and res["stride"] == [21, 32] and not res["flip_tta"]
    assert res["rmse"] > 0 and 0 <= res["delta1"] <= 1
    assert "RMSE (m)" in capsys.readouterr().out


def test_knn_over_a_pattern_of_snapshots(digits_subset, tmp_path, capsys, monkeypatch):
    """--weights with a pattern (a run's teacher snapshots): one evaluation per match, ordered by
    iteration, each equal to evaluating that file alone, the data listed once; a summary table;
    --json a list."""
    import torch

    from fastdino.eval import knn_protocol
    from fastdino.models.backbones import vit_test

    listings = []
    real = knn_protocol.labelled_splits
    monkeypatch.setattr(knn_protocol, "labelled_splits",
                        lambda *a: listings.append(a) or real(*a))

    for it, seed in ((12500, 1), (2500, 2)):
        torch.manual_seed(seed)
        d = tmp_path / "eval" / f"training_{it}"
        d.mkdir(parents=True)
        torch.save({"teacher": {f"backbone.{k}": v for k, v in vit_test().state_dict().items()}},
                   d / "teacher_checkpoint.pth")
    common = ["--arch", "vit_test", "--data", str(digits_subset), "--image-size", "32",
              "--num-workers", "0", "--cache-dir", "none", "--quiet"]
    pattern = str(tmp_path / "eval" / "training_*" / "teacher_checkpoint.pth")
    assert main(["knn", "--weights", pattern, *common, "--json", str(tmp_path / "s.json")]) == 0
    runs = json.loads((tmp_path / "s.json").read_text())
    assert len(listings) == 1  # the data of every weight of the sweep, listed once
    assert ["training_2500" in r["weights"] for r in runs] == [True, False]  # by iteration
    out = capsys.readouterr().out
    assert "knn over 2 weights" in out and out.index("training_2500") < out.index("training_12500")
    single = tmp_path / "eval" / "training_12500" / "teacher_checkpoint.pth"
    assert main(["knn", "--weights", str(single), *common, "--json", str(tmp_path / "1.json")]) == 0
    alone = json.loads((tmp_path / "1.json").read_text())
    assert runs[1]["k10"] == alone["k10"] and runs[1]["weights_digest"] == alone["weights_digest"]
    assert runs[0]["weights_digest"] != runs[1]["weights_digest"]
    with pytest.raises(SystemExit, match="matches nothing"):
        main(["knn", "--weights", str(tmp_path / "nope_*"), *common])


def test_knn_flags_out_of_range_exit_before_any_work(tmp_path, capsys):
    for flags, message in ((["--k", "10", "0"], "--k 0 is invalid: allowed are integers >= 1"),
                           (["--temperature", "0"], "--temperature 0.0 is invalid"),
                           (["--temperature", "-1"], "--temperature -1.0 is invalid")):
        # --weights does not exist: the flag is reported first, before the backbone loads
        assert main(["knn", "--weights", str(tmp_path / "none.pth"), "--arch", "vit_test",
                     "--data", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastdino eval knn: error: {message}"), err


def test_an_existing_weights_path_with_glob_characters_is_not_a_pattern(tmp_path):
    """'exp[1]/teacher_backbone.pth' exists: evaluated as written, not globbed (as a pattern
    '[1]' is a character class: it matched nothing)."""
    from fastdino.eval.cli import expand_weights

    path = tmp_path / "exp[1]" / "teacher_backbone.pth"
    path.parent.mkdir()
    path.write_bytes(b"")
    assert expand_weights(str(path)) == [str(path)]
    (tmp_path / "exp1").mkdir()  # what the class [1] matches
    (tmp_path / "exp1" / "teacher_backbone.pth").write_bytes(b"")
    assert expand_weights(str(path)) == [str(path)]
    assert expand_weights(str(tmp_path / "exp[0-9]" / "teacher_backbone.pth")) == [
        str(tmp_path / "exp1" / "teacher_backbone.pth")]  # a pattern still globs


@pytest.mark.parametrize("cores, want", [(2, 2), (1, 1), (16, 4), (None, 1)])
def test_num_workers_default_is_at_most_the_cores(monkeypatch, cores, want):
    """--num-workers defaults to 4, or to the CPU cores on a smaller machine (torch warns that
    more workers than cores may freeze the loader, and they only contend)."""
    import os

    from fastdino.eval.cli import build_parser

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    parser = build_parser()
    for cmd in ("knn", "linear", "seg", "depth"):
        args = parser.parse_args([cmd, "--data", "x", "--weights", "random", "--arch", "vit_test"])
        assert args.num_workers == want, cmd


@pytest.mark.parametrize("device, says", [("bogus", "invalid: allowed is cpu, cuda or cuda:N"),
                                          ("cuda:99", "cuda")])
def test_bad_device_is_one_line_usage_error(device, says, capsys, monkeypatch):
    """--device that does not exist here (a typo, CUDA on a CPU machine, an index past the GPU
    count): one line naming the flag, exit 2, before any weights load (was a RuntimeError /
    AssertionError traceback from the first tensor move)."""
    import fastdino.eval.weights as weights

    def never(*a, **k):
        raise AssertionError("loaded weights for a bad --device")

    monkeypatch.setattr(weights, "load_eval_backbone", never)
    with pytest.raises(SystemExit) as e:
        main(["knn", "--data", "digits", "--weights", "random", "--arch", "vit_test",
              "--device", device])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastdino eval knn: error: --device")
    assert says in err[0]
