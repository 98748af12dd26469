"""The official DINOv3 trainer's DCP checkpoints (fastdino/models/official_dcp.py): a run's
teacher (backbone and heads) read from `<output_dir>/ckpt/<iteration>/` without unsharding, as
--weights, model.pretrained_weights and gram.ckpt; a metadata pickle that asks for anything but
DCP's own records is refused before it can run."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_trainer_step import SMALL, SMOKE

from fastdino.config import load_config, save_config
from fastdino.eval.weights import load_eval_backbone, read_weights
from fastdino.meta_arch import build_student, load_pretrained


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """An official-layout output_dir: ckpt/5 and ckpt/10, each a DCP of {"iteration", "model":
    the whole meta-arch's flat state (student.*, teacher.*, dino_loss.*), "optimizer"}."""
    cfg = load_config(SMOKE, SMALL)
    out = tmp_path_factory.mktemp("official")
    teachers = {}
    for it in (5, 10):
        torch.manual_seed(it)
        teacher, student = build_student(cfg), build_student(cfg)
        model = {**{f"teacher.{k}": v for k, v in teacher.state_dict().items()},
                 **{f"student.{k}": v for k, v in student.state_dict().items()},
                 "dino_loss.center": torch.zeros(1, 128),
                 "teacher.note": "a non-tensor entry: DCP would unpickle it, it is not read"}
        optimizer = {"state": {"student.backbone.cls_token": {"exp_avg": torch.ones(3)}},
                     "param_groups": [{"lr": 0.1, "params": ["student.backbone.cls_token"]}]}
        dcp.save({"iteration": it, "model": model, "optimizer": optimizer},
                 checkpoint_id=str(out / "ckpt" / str(it)))
        teachers[it] = teacher
    return out, cfg, teachers


def test_the_latest_teacher_with_its_heads(official_run, caplog):
    out, cfg, teachers = official_run
    sd, source, _, _ = read_weights(out)
    assert "ckpt/10" in source and set(sd) == {"teacher"}
    want = teachers[10].state_dict()
    assert sd["teacher"].keys() == want.keys()  # (no "note")
    save_config(cfg, out / "arch.yaml")  # the tiny architecture (official runs: --arch)
    backbone, _ = load_eval_backbone(out, config=out / "arch.yaml")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, want[f"backbone.{k}"]), k
    student = build_student(cfg)
    with caplog.at_level("INFO", logger="fastdino"):
        load_pretrained(student, str(out / "ckpt" / "5"))  # a given iteration, heads included
    assert "backbone, dino_head, ibot_head" in caplog.text
    got, ref = student.state_dict(), teachers[5].state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_gram_ckpt_takes_an_official_checkpoint(official_run):
    from fastdino.meta_arch import SSLMetaArch

    out, _, teachers = official_run
    cfg = load_config(SMOKE, [*SMALL, "gram.use=true", f"gram.ckpt={out / 'ckpt' / '5'}"])
    arch = SSLMetaArch(cfg, torch.device("cpu"))
    want = teachers[5].state_dict()
    assert all(torch.equal(v, want[f"backbone.{k}"])
               for k, v in arch.gram_teacher.state_dict().items())


def test_a_metadata_pickle_that_runs_code_is_refused(official_run, tmp_path):
    out, _, _ = official_run
    bad = tmp_path / "ckpt" / "1"
    bad.mkdir(parents=True)
    for f in (out / "ckpt" / "10").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match=r"asks for (posix|os)\.system.*refused"):
        read_weights(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_without_a_teacher_names_what_it_holds(tmp_path):
    dcp.save({"iteration": 1, "model": {"classifier.weight": torch.zeros(2, 2)}},
             checkpoint_id=str(tmp_path / "ckpt" / "1"))
    with pytest.raises(KeyError, match="no teacher .*top-level names: classifier"):
        read_weights(tmp_path)


def test_export_of_an_official_checkpoint(official_run, tmp_path, capsys):
    """An official run's teacher exported: the official format needs no architecture, the
    converted formats take it from --config."""
    from fastdino.cli import main

    out, cfg, teachers = official_run
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "b.pth")]) == 0
    sd = torch.load(tmp_path / "b.pth", weights_only=True)
    want = teachers[10].state_dict()
    assert all(torch.equal(v, want[f"backbone.{k}"]) for k, v in sd.items())
    with pytest.raises(SystemExit):
        main(["export", "--run", str(out), "--out", str(tmp_path / "t"), "--format", "timm"])
    assert "give --config" in capsys.readouterr().err
    save_config(cfg, tmp_path / "arch.yaml")
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "t"), "--format", "timm",
                 "--config", str(tmp_path / "arch.yaml")]) == 0
    back, _ = load_eval_backbone(tmp_path / "t")
    x = torch.randn(1, 3, 32, 32)
    ref, _ = load_eval_backbone(out, config=tmp_path / "arch.yaml")
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x)["x_norm_clstoken"],
                                   ref.forward_features(x)["x_norm_clstoken"], rtol=0, atol=0)
