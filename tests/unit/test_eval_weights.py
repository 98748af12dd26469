"""fastdino.eval.weights: every --weights source loads exactly, and a mismatch is a clear error."""

import pickle

import pytest
import torch

from fastdino.config import load_config, save_config
from fastdino.eval.weights import (
    CONFIG_DIR,
    load_eval_backbone,
    resolve_model_config,
    state_dict_digest,
)
from fastdino.models import build_backbone, vit_test


def _perturbed_vit_test(seed=0):
    """vit_test with every tensor random (so a wrong or skipped key shows in the outputs)."""
    torch.manual_seed(seed)
    m = vit_test().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return m


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(x)["x_norm_patchtokens"],
                                   b.forward_features(x)["x_norm_patchtokens"])


def test_plain_pth_safetensors_and_teacher_layouts_load_the_same(tmp_path):
    from safetensors.torch import save_file

    ref = _perturbed_vit_test()
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "plain.safetensors"))
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 32)  # heads are not part of the backbone
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    digests = set()
    for name in ("plain.pth", "plain.safetensors", "teacher_checkpoint.pth"):
        model, info = load_eval_backbone(tmp_path / name, arch="vit_test")
        _same(model, ref)
        assert not model.training
        digests.add(info.digest)
    # the cache key is the weights, not the file format
    assert digests == {state_dict_digest(sd)}


def test_training_run_folder_uses_teacher_and_run_config(tmp_path):
    cfg = load_config(CONFIG_DIR / "smoke.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    torch.manual_seed(3)
    backbone = build_backbone(cfg.model)  # the smoke arch: D 64, depth 4 (not vit_test's 32 / 2)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["ibot_head.last_layer.weight"] = torch.zeros(8, 64)
    tag = tmp_path / "checkpoints" / "iter_0000010"
    tag.mkdir(parents=True)
    torch.save({"teacher": teacher, "iteration": 10}, tag / "trainer_state.pt")
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000010\n")
    for weights in (tmp_path, tmp_path / "checkpoints", tag):  # run, checkpoints/, tag folder
        model, info = load_eval_backbone(weights)  # no --arch: the run's config.yaml
        assert model.embed_dim == 64 and model.n_blocks == 4
        assert "iter_0000010" in info.source
        _same(model.eval(), backbone.eval())
    with pytest.raises(ValueError, match="shape mismatches"):  # the wrong --arch is an error
        load_eval_backbone(tmp_path, arch="vit_test")
    # the trainer's `fastdino export` output (.pth and .safetensors) loads to the same backbone
    from fastdino.export import export_backbone
    for path in export_backbone(tmp_path, tmp_path / "exported" / "teacher"):
        model, _ = load_eval_backbone(path, config=tmp_path / "config.yaml")
        _same(model, backbone.eval())


def test_hugging_face_folder_converts_with_output_parity(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    hf_cfg = transformers.DINOv3ViTConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_register_tokens=4, layerscale_value=1e-5, rope_theta=100.0, image_size=32,
        patch_size=16)
    torch.manual_seed(0)
    hf = transformers.DINOv3ViTModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 5:]  # patches after [CLS, 4 registers]
    for arch in (None, "vit_test"):  # from config.json, or checked against a named arch
        model, info = load_eval_backbone(tmp_path / "hf", arch=arch)
        assert "Hugging Face" in info.source
        with torch.no_grad():
            out = model.forward_features(x)["x_norm_patchtokens"]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_eval_backbone(tmp_path / "hf", arch="vit_tiny")


def test_mismatches_are_errors_never_partial_loads(tmp_path):
    sd = _perturbed_vit_test().state_dict()
    torch.save(sd, tmp_path / "full.pth")
    with pytest.raises(ValueError, match=r"does not fit the architecture D192.*shape mismatches"):
        load_eval_backbone(tmp_path / "full.pth", arch="vit_tiny")  # 32-d weights, 192-d model
    partial = dict(sd)
    del partial["blocks.1.attn.qkv.weight"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.attn\.qkv\.weight"):
        load_eval_backbone(tmp_path / "partial.pth", arch="vit_test")
    extra = {**sd, "blocks.2.norm1.weight": torch.ones(32)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks\.2\.norm1\.weight"):
        load_eval_backbone(tmp_path / "extra.pth", arch="vit_test")
    with pytest.raises(ValueError, match="architecture is unknown"):
        load_eval_backbone(tmp_path / "full.pth")  # a bare file says nothing about its arch
    with pytest.raises(ValueError, match="--arch 'vit_huge'.*vit_test"):
        load_eval_backbone(tmp_path / "full.pth", arch="vit_huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_backbone(tmp_path / "nope.pth", arch="vit_test")


class _NotATensor:
    pass


def test_files_are_read_with_weights_only(tmp_path):
    torch.save({"cls_token": _NotATensor()}, tmp_path / "code.pth")
    # refused, naming the file, and never with torch's advice to pass weights_only=False
    with pytest.raises(ValueError, match="code.pth.*objects other than tensors.*refused") as e:
        load_eval_backbone(tmp_path / "code.pth", arch="vit_test")
    assert "weights_only=False" not in str(e.value)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)


def test_truncated_or_corrupt_files_are_one_error_naming_the_file(tmp_path):
    """torch.load / safetensors on a cut or garbage file raise OSError without the name, KeyError
    of a number, EOFError, SafetensorError: each is a ValueError naming the file."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _perturbed_vit_test().state_dict().items()}
    torch.save(sd, tmp_path / "ok.pth")
    save_file(sd, str(tmp_path / "ok.safetensors"))
    for suffix in (".pth", ".safetensors"):
        data = (tmp_path / f"ok{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        (tmp_path / f"junk{suffix}").write_bytes(b"hello world" * 10)
        (tmp_path / f"empty{suffix}").write_bytes(b"")
    for name in ("cut", "junk", "empty"):
        for suffix, kind in ((".pth", "torch"), (".safetensors", "safetensors")):
            path = tmp_path / f"{name}{suffix}"
            with pytest.raises(ValueError, match=f"{name}{suffix}' is not a readable {kind} file "
                                                 r"\(truncated or corrupt\?\)") as e:
                load_eval_backbone(path, arch="vit_test")
            assert "\n" not in str(e.value)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")  # not a dict
    with pytest.raises(ValueError, match="tensor.pth' holds a Tensor, not a state dict"):
        load_eval_backbone(tmp_path / "tensor.pth", arch="vit_test")
    # a training checkpoint's trainer_state.pt too
    tag = tmp_path / "run" / "checkpoints" / "iter_1"
    tag.mkdir(parents=True)
    (tag / "trainer_state.pt").write_bytes(data[:100])
    with pytest.raises(ValueError, match="trainer_state.pt' is not a readable torch file"):
        load_eval_backbone(tag, arch="vit_test")


def test_a_run_whose_latest_checkpoint_is_damaged_gives_its_newest_complete_one(tmp_path, caplog):
    """eval / export --weights RUN take the checkpoint a resume would: `latest` naming a checkpoint
    cut short by a crash, or no `latest` at all, gives the newest complete one, with a warning
    (was: the damaged one's error, or 'neither trainer_state.pt nor checkpoints/latest')."""
    good, other = _perturbed_vit_test(1), _perturbed_vit_test(2)
    ckpts = tmp_path / "checkpoints"
    for it, model in ((1, good), (2, other)):
        tag = ckpts / f"iter_{it:07d}"
        tag.mkdir(parents=True)
        torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                    "iteration": it}, tag / "trainer_state.pt")
    state = ckpts / "iter_0000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a node crash before the data reached the disk
    for pointer in ("iter_0000002\n", None):
        if pointer is None:
            (ckpts / "latest").unlink()
        else:
            (ckpts / "latest").write_text(pointer)
        caplog.clear()
        with caplog.at_level("WARNING"):
            model, info = load_eval_backbone(tmp_path, arch="vit_test")
        _same(model, good)
        assert "iter_0000001" in info.source and "iter_0000001" in caplog.text


def test_random_init_is_seeded_and_needs_an_arch():
    a, ia = load_eval_backbone("random", arch="vit_test", seed=1)
    b, ib = load_eval_backbone("random", arch="vit_test", seed=1)
    c, ic = load_eval_backbone("random", arch="vit_test", seed=2)
    assert ia.digest == ib.digest != ic.digest
    _same(a, b)
    with pytest.raises(ValueError, match="needs --arch or --config"):
        load_eval_backbone("random")


def test_preset_names_resolve_and_unknown_presets_list_the_choices():
    assert resolve_model_config(config="smoke").embed_dim == 64
    cfg = resolve_model_config(config=CONFIG_DIR / "smoke.yaml", arch="vit_test")
    assert cfg.arch == "vit_test" and cfg.embed_dim == 64  # --arch overrides only the arch
    with pytest.raises(FileNotFoundError, match="presets are .*smoke"):
        resolve_model_config(config="no_such_preset")


def test_official_convnext_file_loads_with_arch_and_a_convnext_config(tmp_path):
    """The released dinov3_convnext_*.pth layout (the final norm also as `norms.3.*`) loads with
    --arch convnext_* and with a config naming a ConvNeXt (training allows one only as a
    distillation student; eval builds the backbone all the same)."""
    from fastdino.models.convnext import build_convnext, to_official_state_dict

    torch.manual_seed(0)
    ref = build_convnext("convnext_test").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    official = to_official_state_dict(ref.state_dict())
    assert "norms.3.weight" in official
    torch.save(official, tmp_path / "dinov3_convnext_test.pth")
    (tmp_path / "convnext.yaml").write_text("model:\n  arch: convnext_test\n")
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = ref.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
    for kwargs in ({"arch": "convnext_test"}, {"config": tmp_path / "convnext.yaml"}):
        model, info = load_eval_backbone(tmp_path / "dinov3_convnext_test.pth", **kwargs)
        assert info.arch.startswith("convnext-D48")
        with torch.no_grad():
            got = model.get_intermediate_layers(x, n=1, reshape=True, norm=True)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="--arch 'convnext_nano' is invalid.*convnext_tiny"):
        load_eval_backbone(tmp_path / "dinov3_convnext_test.pth", arch="convnext_nano")


def test_the_runs_final_export_takes_the_config_beside_it(tmp_path):
    """The trainer writes <run>/teacher_backbone.{pth,safetensors} beside <run>/config.yaml:
    README's `eval pca --weights teacher_backbone.safetensors` inside a run folder needs no
    --arch. An --arch given wins; one that does not fit says that the run's config would."""
    from fastdino.export import export_backbone

    cfg = load_config(CONFIG_DIR / "smoke.yaml")
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(4)
    backbone = build_backbone(cfg.model).eval()  # the smoke arch: D 64, depth 4
    tag = run / "checkpoints" / "iter_0000001"
    tag.mkdir(parents=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               tag / "trainer_state.pt")
    (run / "checkpoints" / "latest").write_text("iter_0000001\n")
    files = export_backbone(run, run / "teacher_backbone")  # as Trainer.finish does
    assert [f.name for f in files] == ["teacher_backbone.pth", "teacher_backbone.safetensors"]
    for f in files:
        model, info = load_eval_backbone(f)
        assert f"architecture from {run / 'config.yaml'}" in info.source
        _same(model, backbone)
        with pytest.raises(ValueError, match=r"does not fit the architecture .*the run's "
                                             r".*config.yaml describes these weights: leave out "
                                             r"--arch vit_test to use it"):
            load_eval_backbone(f, arch="vit_test")
    # an --arch that fits is used as given (the same weights, not a second reading of the config)
    model, info = load_eval_backbone(files[0], arch="vit_small", config=run / "config.yaml")
    assert "architecture from" not in info.source
    # another file name beside a config.yaml is not taken to be that config's model
    torch.save(backbone.state_dict(), run / "other.pth")
    with pytest.raises(ValueError, match="the architecture is unknown; pass --arch"):
        load_eval_backbone(run / "other.pth")


def test_random_is_suggested_for_eval_weights_only(tmp_path):
    """'random' is eval's --weights; model.pretrained_weights=random said "... or 'random'"."""
    from fastdino.eval.weights import read_weights
    from fastdino.meta_arch import load_pretrained

    with pytest.raises(FileNotFoundError) as e:
        load_eval_backbone(tmp_path / "none.pth", arch="vit_test")
    assert str(e.value).startswith(f"--weights '{tmp_path / 'none.pth'}': the path does not "
                                   "exist") and str(e.value).endswith(", or 'random'")
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained(None, "random")  # training: model.pretrained_weights=random
    msg = str(e.value)
    assert "or 'random'" not in msg and "leave model.pretrained_weights unset (null" in msg, msg
    with pytest.raises(FileNotFoundError) as e:  # a wrong path in training: no random advice
        read_weights(tmp_path / "none.pth")
    assert str(e.value).endswith("timm DINOv3 folder"), str(e.value)
    with pytest.raises(FileNotFoundError, match=r"^gram.ckpt='x': the path does not exist"):
        read_weights("x", key="gram.ckpt")


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_registers", "dinov3_wrapped"])
def test_hugging_face_wrapper_folders_load_their_backbone(tmp_path, kind, caplog):
    """A Dinov2(WithRegisters)ForImageClassification folder (the base model under transformers'
    base_model_prefix 'dinov2' / 'dinov2_with_registers', plus classifier.*) failed with
    "no fastdino name for key 'classifier.bias'"; a DINOv3ViTModel inside a wrapper sits under
    'model.' (DINOv3's base_model_prefix). The backbone loads, the head is dropped and logged."""
    transformers = pytest.importorskip("transformers", reason="transformers is the interop extra")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    if kind == "dinov3_wrapped":
        cfg = transformers.DINOv3ViTConfig(
            hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_register_tokens=4, layerscale_value=0.5, rope_theta=100.0, image_size=32,
            patch_size=16)
        base = transformers.DINOv3ViTModel(cfg).eval()
        base.save_pretrained(tmp_path / "hf", safe_serialization=True)
        sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
        wrapped = {f"model.{k}": v for k, v in sd.items()}
        wrapped.update({"classifier.weight": torch.zeros(5, 64), "classifier.bias": torch.zeros(5)})
        save_file(wrapped, str(tmp_path / "hf" / "model.safetensors"))
        x, skip = torch.randn(2, 3, 32, 48), 5
    else:
        registers = kind == "dinov2_registers"
        fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                      patch_size=14, num_labels=3, layerscale_value=0.5)
        if registers:
            cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **fields)
            model = transformers.Dinov2WithRegistersForImageClassification(cfg).eval()
            base = model.dinov2_with_registers
        else:
            model = transformers.Dinov2ForImageClassification(
                transformers.Dinov2Config(**fields)).eval()
            base = model.dinov2
        model.save_pretrained(tmp_path / "hf", safe_serialization=True)
        x, skip = torch.randn(2, 3, 56, 56), 1 + 4 * registers
    with caplog.at_level("INFO", logger="fastdino.eval"):
        ours, info = load_eval_backbone(tmp_path / "hf")
    assert any("dropped 2 classification-head key(s) (classifier.bias, classifier.weight)"
               in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        want = base(pixel_values=x).last_hidden_state[:, skip:]
        got = ours.forward_features(x)["x_norm_patchtokens"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
