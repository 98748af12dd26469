"""`fastdino export` of a real (1-iteration) training run: the official backbone file, the whole
teacher with its heads (which continued pretraining loads, heads included), and a Hugging Face
DINOv3ViTModel folder whose outputs match the teacher backbone's."""

from __future__ import annotations

import pytest
import torch
from test_trainer_step import SMALL, SMOKE

from fastdino.cli import main
from fastdino.config import load_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fastdino.train import Trainer

    out = tmp_path_factory.mktemp("export") / "run"
    # LayerScale 0.5, not 1e-5: the blocks must matter for the output comparison to test them
    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={out}", "train.resume=none",
                              "train.max_iterations=1", "optim.warmup_epochs=0", "optim.lr=0.01",
                              "model.layerscale_init=0.5",
                              # fp32 RoPE: timm recomputes the periods in fp32 (the bf16-rounded
                              # training default is test_qa_rope_dtype's export warning)
                              "model.pos_embed_rope_dtype=fp32"])
    trainer = Trainer(cfg)
    trainer.train()
    return out, trainer.arch.teacher


def test_with_heads_feeds_continued_pretraining(run, tmp_path, caplog, capsys):
    out, teacher = run
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "t.pth"),
                 "--with-heads"]) == 0
    sd = torch.load(tmp_path / "t.pth", weights_only=True)["teacher"]
    assert any(k.startswith("dino_head.") for k in sd) and any(k.startswith("ibot_head.")
                                                              for k in sd)
    from fastdino.meta_arch import build_student, load_pretrained

    cfg = load_config(SMOKE, [*SMALL, "model.layerscale_init=0.5",
                              "model.pos_embed_rope_dtype=fp32"])
    student = build_student(cfg)
    with caplog.at_level("INFO", logger="fastdino"):
        load_pretrained(student, str(tmp_path / "t.pth"))
    assert "backbone, dino_head, ibot_head" in caplog.text
    got = student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(SystemExit):  # a usage error, with its reason on stderr
        main(["export", "--run", str(out), "--out", str(tmp_path / "t.safetensors"),
              "--with-heads"])
    assert "--with-heads writes one torch file" in capsys.readouterr().err


def test_hugging_face_folder_matches_the_teacher(run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    out, teacher = run
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "hf"), "--format",
                 "hf"]) == 0
    hf = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf").eval()
    bb = teacher.backbone.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = bb.forward_features(x)
        got = hf(pixel_values=x).last_hidden_state  # [CLS, registers, patches], final norm
    n_reg = bb.n_storage_tokens
    torch.testing.assert_close(got[:, 0], ref["x_norm_clstoken"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, 1 + n_reg:], ref["x_norm_patchtokens"], rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(SystemExit):  # argparse: the two options do not combine
        main(["export", "--run", str(out), "--out", str(tmp_path / "x"), "--format", "hf",
              "--with-heads"])


def test_timm_folder_matches_the_teacher(run, tmp_path):
    """timm's own loader (`local-dir:`, its checkpoint filter, strict) builds the exported model;
    the folder also loads back as --weights with the teacher's outputs."""
    from timm_helpers import import_timm

    from fastdino.eval.weights import load_eval_backbone

    timm = import_timm()
    out, teacher = run
    folder = tmp_path / "timm"
    assert main(["export", "--run", str(out), "--out", str(folder), "--format", "timm"]) == 0
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    run_cfg = load_config(out / "config.yaml")
    assert model.pretrained_cfg["mean"] == list(run_cfg.crops.mean)  # timm's data config
    back, info = load_eval_backbone(folder)
    assert info.source.startswith("timm vit_")
    bb = teacher.backbone.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = bb.forward_features(x)
        got = model.forward_features(x)
        pooled = model(x)
        again = back.forward_features(x)
    n = 1 + bb.n_storage_tokens
    torch.testing.assert_close(got[:, 0], ref["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, n:], ref["x_norm_patchtokens"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        torch.testing.assert_close(again[key], ref[key], rtol=0, atol=0)
    with pytest.raises(SystemExit):  # argparse: the two options do not combine
        main(["export", "--run", str(out), "--out", str(tmp_path / "x"), "--format", "timm",
              "--with-heads"])


def test_a_bad_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pth")])
    assert e.value.code == 2
    assert f"--run '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["export", "--run", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pth")])
    assert "checkpoints/latest (a training run)" in capsys.readouterr().err


def test_a_key_error_prints_its_message_not_its_repr(tmp_path, capsys):
    tag = tmp_path / "run" / "checkpoints" / "iter_1"
    tag.mkdir(parents=True)
    torch.save({"iteration": 1}, tag / "trainer_state.pt")  # read_weights: KeyError, no teacher
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(tag), "--out", str(tmp_path / "x.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {tag / 'trainer_state.pt'} has no 'teacher' entry (keys: iteration)\n" in err


def test_out_suffixes_folders_and_refused_weight_formats(run, tmp_path, capsys):
    """--out model.v1 keeps .v1 (model.v1.pth + .safetensors, not model.pth); an existing folder
    (or DIR/) gets teacher_backbone.{pth,safetensors} inside, not DIR.pth beside it; .bin / .ckpt
    are refused, naming the allowed forms."""
    from fastdino.eval.weights import load_eval_backbone
    from fastdino.export import backbone_targets

    out, teacher = run
    assert backbone_targets(tmp_path / "a.pt") == [tmp_path / "a.pt"]
    assert backbone_targets(tmp_path / "a.SAFETENSORS") == [tmp_path / "a.SAFETENSORS"]
    new = tmp_path / "new"
    assert backbone_targets(f"{new}/") == [new / "teacher_backbone.pth",
                                           new / "teacher_backbone.safetensors"]
    main(["export", "--run", str(out), "--out", str(tmp_path / "ex" / "model.v1")])
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "model.v1.pth", "model.v1.safetensors"]
    (tmp_path / "folder").mkdir()
    main(["export", "--run", str(out), "--out", str(tmp_path / "folder")])
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == [
        "teacher_backbone.pth", "teacher_backbone.safetensors"]
    assert not (tmp_path / "folder.pth").exists()
    want = teacher.backbone.state_dict()
    main(["export", "--run", str(out), "--out", str(tmp_path / "upper.SAFETENSORS")])
    for f in ("folder/teacher_backbone.safetensors", "upper.SAFETENSORS"):
        got, _ = load_eval_backbone(tmp_path / f, config=out / "config.yaml")
        for k, v in got.state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    capsys.readouterr()
    for bad in ("x.bin", "x.ckpt"):
        with pytest.raises(SystemExit) as e:
            main(["export", "--run", str(out), "--out", str(tmp_path / bad)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--out '{tmp_path / bad}': fastdino does not write {bad[1:]} files" in err, err
        assert "allowed are FILE.pth / FILE.pt (torch), FILE.safetensors" in err, err
        assert not (tmp_path / bad).exists() and not (tmp_path / f"{bad}.pth").exists()


@pytest.mark.parametrize("registers,offset,antialias,warned", [
    (0, 0.1, False, True),  # DINOv2's plain models: the 0.1 offset HF does not take
    (4, 0.0, False, True),  # a register model without antialias: HF's register model has it
    (4, 0.0, True, False),  # the released register models' rule = HF's
])
def test_hf_export_of_dinov2_warns_where_hf_resizes_otherwise(tmp_path, monkeypatch, caplog,
                                                              registers, offset, antialias,
                                                              warned):
    """HF's Dinov2 configs have no interpolate_offset / antialias field: an export whose teacher
    resizes otherwise says so (one line), and the outputs indeed differ off the trained grid."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from fastdino import export
    from fastdino.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    bb = DinoVisionTransformer(
        patch_size=14, embed_dim=32, depth=2, num_heads=2, ffn_ratio=4.0, mask_k_bias=False,
        layerscale_init=0.5, n_storage_tokens=registers, pos_embed="learned", pos_embed_grid=4,
        interpolate_offset=offset, interpolate_antialias=antialias)
    bb.init_weights()
    bb.eval()
    monkeypatch.setattr(export, "_teacher_backbone", lambda run, config=None: (bb, None))
    with caplog.at_level("WARNING", logger="fastdino.export"):
        export.export_hf("unused", tmp_path / "hf")
    notes = [r.getMessage() for r in caplog.records if "export --format hf" in r.getMessage()]
    assert len(notes) == int(warned), notes
    if warned:
        assert "\n" not in notes[0] and f"interpolate_offset={offset:g}" in notes[0]
        assert "match at the trained 4 x 4 grid (56 px) and differ at other resolutions" \
            in notes[0]
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    hf = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for size, same in ((56, True), (84, not warned)):
            x = torch.randn(1, 3, size, size)
            ours = bb.forward_features(x)["x_norm_patchtokens"]
            theirs = hf(pixel_values=x).last_hidden_state[:, 1 + registers:]
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4) == same, size


@pytest.mark.parametrize("fmt", ["official", "hf", "timm"])
def test_exported_files_are_readable_by_others(run, tmp_path, fmt):
    """safetensors writes 0600 files (a private temp file renamed; huggingface/safetensors#782):
    an exported model, the run's teacher_backbone.safetensors included, was unreadable by anyone
    but its writer while the .pth beside it was 0644. Every file gets 0666 minus the umask."""
    import os
    import stat

    if fmt == "hf":
        pytest.importorskip("transformers", reason="transformers is the interop extra")
    out, _ = run
    old = os.umask(0o027)  # a group-readable umask: the files must follow it, not be 0600
    try:
        args = ["export", "--run", str(out), "--out", str(tmp_path / "m")]
        assert main(args + ([] if fmt == "official" else ["--format", fmt])) == 0
    finally:
        os.umask(old)
    files = list(tmp_path.glob("m*")) if fmt == "official" else list((tmp_path / "m").iterdir())
    assert any(f.suffix == ".safetensors" for f in files), files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, (f.name, oct(f.stat().st_mode))
    # the end-of-run export of the fixture's run too (the default umask 022 here)
    assert stat.S_IMODE((out / "teacher_backbone.safetensors").stat().st_mode) == 0o666 & ~old
