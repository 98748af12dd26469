"""The config surface: every preset loads, and bad keys, types and values fail with their name."""

from pathlib import Path

import pytest

from fastdino.config import Config, ConfigError, load_config, load_unvalidated, save_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "vits16", "vitb16", "vitl16", "vit7b16_pretrain", "vit7b16_gram",
            "vit7b16_highres", "vitl16_distill", "vitl16_gram", "vitl16_highres"} <= names


def _needed(path: Path) -> list[str]:
    """What a preset leaves to the command line (the distillation teacher run)."""
    return ["distillation.teacher=/runs/teacher"] if path.stem.endswith("_distill") else []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_loads_and_starts_with_a_provenance_header(path):
    cfg = load_config(path, _needed(path))
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("#"), "presets start with a comment saying where they ran"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_presets_hold_only_differences(path):
    """A preset key equal to the dataclass default is noise (STYLE.md rule 9) - except `arch`."""
    import yaml

    default = Config().to_dict()

    def walk(d, ref, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, ref[k], f"{prefix}{k}.")
            elif ref[k] == (list(v) if isinstance(v, tuple) else v):
                yield f"{prefix}{k}"

    data = yaml.safe_load(path.read_text())
    if "base" in data:  # against what the base gives: a key repeating it is the noise
        default = load_config(path.parent / f"{data.pop('base')}.yaml").to_dict()
    redundant = list(walk(data, default, ""))
    allowed = {"model.arch", "optim.weight_decay", "schedules.teacher_temp"}
    assert not [k for k in redundant if k not in allowed], redundant


def test_vitl16_matches_the_official_imagenet_recipe():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "vitl16.yaml")
    assert cfg.model.arch == "vit_large"
    assert cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 1e-6
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert (cfg.schedules.momentum_teacher, cfg.schedules.final_momentum_teacher) == (0.992, 1.0)
    assert (cfg.schedules.warmup_teacher_temp, cfg.schedules.teacher_temp) == (0.04, 0.07)
    assert cfg.dino.head.n_prototypes == cfg.ibot.head.n_prototypes == 65536
    assert cfg.model.drop_path_rate == 0.3 and cfg.optim.layerwise_decay == 0.9
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (224, 96)
    assert cfg.train.total_iterations == 125_000


def test_distillation_preset_matches_the_official_example():
    path = Path(__file__).parents[2] / "configs" / "vitl16_distill.yaml"
    with pytest.raises(ConfigError, match="distillation.teacher"):  # the teacher is required
        load_config(path)
    cfg = load_config(path, _needed(path))
    assert cfg.distillation.enabled and not cfg.gram.use
    assert cfg.optim.lr == cfg.optim.min_lr == 5e-5 and cfg.optim.warmup_epochs == 10
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.04)
    assert (cfg.schedules.momentum_teacher, cfg.schedules.final_momentum_teacher) == (0.994, 1.0)
    assert cfg.schedules.warmup_teacher_temp == cfg.schedules.teacher_temp == 0.07
    assert cfg.model.drop_path_rate == 0.0 and cfg.optim.layerwise_decay == 0.99
    assert cfg.optim.freeze_last_layer_epochs == 0 and not cfg.crops.horizontal_flip
    assert (cfg.dino.head.n_prototypes, cfg.ibot.head.n_prototypes) == (262144, 98304)
    assert cfg.train.total_iterations == 25_000


def test_overrides_apply_with_types():
    cfg = load_config(None, ["optim.lr=2e-3", "crops.global_crops_scale=[0.3, 1.0]",
                             "data.root=/tmp/imgs", "model.rope_rescale=null", "train.epochs=3"])
    assert cfg.optim.lr == 2e-3
    assert cfg.crops.global_crops_scale == (0.3, 1.0)
    assert cfg.data.root == "/tmp/imgs"
    assert cfg.model.rope_rescale is None
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-3", "optim.lrr"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("dino.head.prototypes=10", "dino.head.prototypes"),
])
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=abc", "optim.lr"),
    ("train.epochs=1.5", "train.epochs"),
    ("model.qkv_bias=3", "model.qkv_bias"),
    ("crops.global_crops_scale=[0.3]", "crops.global_crops_scale"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("crops.local_crops_number=-1", "crops.local_crops_number"),
    ("crops.global_crops_size=100", "crops.global_crops_size"),
    ("crops.gram_teacher_crops_size=50", "crops.gram_teacher_crops_size"),
    ("schedules.teacher_temp=0", "schedules.teacher_temp"),
    ("schedules.warmup_teacher_temp=-0.1", "schedules.warmup_teacher_temp"),
    ("dino.student_temp=0", "dino.student_temp"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("kernels.impl=cuda", "kernels.impl"),
    ("model.arch=vit_giant", "model.arch"),
    ("dino.centering=none", "dino.centering"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ("crops.blur_probabilities=sometimes", "crops.blur_probabilities"),
    ("data.dali_jitter=approx", "data.dali_jitter"),
])
def test_invalid_value_names_the_key_and_what_is_allowed(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*allowed"):
        load_config(None, [override])


@pytest.mark.parametrize("raw", ["2024", "yes", "1e5", "{/a/imgs,/b/imgs}", "/d/*.[tT]ar"])
def test_a_text_key_keeps_values_yaml_reads_otherwise(raw):
    """Paths and names that yaml would read as a number, a bool, a mapping or a list reach a
    str key as typed; other keys keep yaml's types, and null still unsets."""
    cfg = load_config(None, [f"data.root={raw}", f"train.output_dir={raw}"])
    assert cfg.data.root == raw and cfg.train.output_dir == raw
    assert load_config(None, ["data.root=null"]).data.root is None
    assert load_config(None, ["data.root='2024'"]).data.root == "2024"
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=yes"])


@pytest.mark.parametrize("raw", ["*.tar", "{a,b}.tar", "["])
def test_a_text_key_takes_values_that_are_not_yaml(raw):
    assert load_config(None, [f"data.root={raw}"]).data.root == raw


def test_an_override_that_is_not_yaml_names_it():
    with pytest.raises(ConfigError, match=r"override 'optim.betas=\[0.9,0.99' is not a yaml"):
        load_config(None, ["optim.betas=[0.9,0.99"])


def test_a_config_file_that_is_not_yaml_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid yaml"):
        load_config(bad)


def test_config_takes_a_preset_name():
    assert load_config("smoke").model.arch == "vit_test"
    with pytest.raises(ConfigError, match="nor is it a preset: .*smoke"):
        load_config("no_such_preset")


@pytest.mark.parametrize("override, key", [("data.seed=-1", "data.seed"),
                                           ("train.seed=-2", "train.seed")])
def test_negative_seeds_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_distributed_koleo_groups_are_whole_ranks_batches():
    with pytest.raises(ConfigError, match="koleo.group_size.*batch_size_per_gpu=8"):
        load_config(None, ["koleo.distributed=true", "koleo.group_size=12",
                           "data.batch_size_per_gpu=8"])
    load_config(None, ["koleo.distributed=true", "koleo.group_size=16",
                       "data.batch_size_per_gpu=8"])


def test_a_teacher_without_distillation_enabled_is_refused():
    """It would be ignored: the run would self-distil while the user thinks it distils."""
    with pytest.raises(ConfigError, match="distillation.teacher.*unless distillation.enabled"):
        load_config(None, ["distillation.teacher=/runs/t"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="optim.warmup"):
        load_config(p)


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "gram.use=true", "gram.it_load_ema_teacher=5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_gram_needs_a_teacher_source():
    with pytest.raises(ConfigError, match="gram.it_load_ema_teacher"):
        load_config(None, ["gram.use=true"])


def test_base_applies_a_preset_or_a_file_first(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: vitl16\ndata: {root: /imgs}\noptim: {lr: 2.0e-3}\n")
    cfg = load_config(tmp_path / "mine.yaml", ["optim.min_lr=1e-7"])
    ref = load_config(Path(__file__).parents[2] / "configs" / "vitl16.yaml")
    assert cfg.model.arch == "vit_large" and cfg.train.epochs == ref.train.epochs  # from base
    assert (cfg.data.root, cfg.optim.lr, cfg.optim.min_lr) == ("/imgs", 2e-3, 1e-7)
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ntrain: {epochs: 7}\n")  # a chain
    child = load_config(tmp_path / "child.yaml")
    assert (child.train.epochs, child.data.root, child.model.arch) == (7, "/imgs", "vit_large")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="chain loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: vitl17\n")
    with pytest.raises(ConfigError, match=r"'vitl17' is neither .*c.yaml|'vitl17' is neither"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: vitl16\nmodel: {archh: x}\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.archh'"):
        load_config(tmp_path / "d.yaml")


def test_vitl16_stages_chain():
    """The ViT-L three-stage recipe: stage 2 continues stage 1's run from its last iteration with
    the Gram teacher loaded there and constant schedules; stage 3 is a fixed-Gram-teacher run at
    1.5x its 512 px crops."""
    d = Path(__file__).parents[2] / "configs"
    s1, s2, s3 = (load_config(d / f"vitl16{x}.yaml") for x in ("", "_gram", "_highres"))
    assert s2.model == s1.model and s2.dino.head == s1.dino.head  # the same run, resumed
    end1 = s1.train.total_iterations
    assert s2.gram.use and s2.gram.start_iteration == s2.gram.it_load_ema_teacher == end1
    assert s2.train.total_iterations > end1 and s2.gram.it_first_update > end1
    for c in (s2, s3):
        assert c.optim.lr == c.optim.min_lr and c.optim.weight_decay == c.optim.weight_decay_end
        assert c.schedules.momentum_teacher == c.schedules.final_momentum_teacher == 0.999
        assert c.schedules.warmup_teacher_temp == c.schedules.teacher_temp
        assert c.dino.local_loss_weight == 0.5
    assert s3.gram.it_load_ema_teacher == 0 and not s3.gram.rep_update
    assert s3.crops.gram_teacher_crops_size == 1.5 * s3.crops.global_crops_size == 768


def test_print_config_shows_the_resolved_config(capsys):
    """`train.py --print-config`: presets, base: chains and overrides applied, every key, then
    exit without training; it loads back to the same config."""
    import yaml

    from fastdino.train import main

    preset = Path(__file__).parents[2] / "configs" / "vitl16_gram.yaml"
    assert main(["--config", str(preset), "--print-config", "optim.lr=3e-5"]) == 0
    out = capsys.readouterr().out  # (less DeepSpeed's import-time "[...] Setting accelerator"
    printed = yaml.safe_load("\n".join(line for line in out.splitlines()  # lines on a CPU box)
                                        if not line.startswith("[")))
    want = load_config(preset, ["optim.lr=3e-5"])
    assert printed == want.to_dict()
    assert printed["model"]["arch"] == "vit_large" and printed["gram"]["use"] is True


def test_koleo_at_batch_one_is_a_config_error():
    """v2#314: KoLeo needs a neighbour, so at one image per rank it is NaN / an error mid-run;
    the config says so at the start, with the ways out."""
    with pytest.raises(ConfigError, match=r"koleo.loss_weight.*batch_size_per_gpu is 1"):
        load_config(None, ["data.batch_size_per_gpu=1"])
    for ok in (["koleo.loss_weight=0"], ["koleo.distributed=true"]):
        assert load_config(None, ["data.batch_size_per_gpu=1", *ok]).data.batch_size_per_gpu == 1


def test_a_leading_tilde_in_path_keys_is_the_home_folder(tmp_path, monkeypatch):
    """`train.output_dir=~/runs/x` reaches the config as written (the shell expands ~ only at the
    start of a word): the run wrote into a folder named `~` in the working directory, and its
    end-of-run export (which expanded it) failed. Every path key expands it, in yaml files too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  output_dir: ~/runs/a\n  pca_images: [~/p.jpg]\n")
    cfg = load_config("~/c.yaml", ["data.root=~/imgs", "data.file_list=~/list.txt",
                                   "model.pretrained_weights=~/w.pth", "train.resume=~/ck"])
    assert cfg.train.output_dir == str(tmp_path / "runs/a")
    assert cfg.train.pca_images == (str(tmp_path / "p.jpg"),)
    assert cfg.data.root == str(tmp_path / "imgs")
    assert cfg.data.file_list == str(tmp_path / "list.txt")
    assert cfg.model.pretrained_weights == str(tmp_path / "w.pth")
    assert cfg.train.resume == str(tmp_path / "ck")
    # not a path key, and not a leading ~: unchanged
    assert load_config(None, ["train.wandb_run_name=~x", "data.root=/a/~b"]).data.root == "/a/~b"
    assert load_config(None, ["train.wandb_run_name=~x"]).train.wandb_run_name == "~x"
    assert load_unvalidated(yml).train.output_dir == str(tmp_path / "runs/a")


def test_untie_cls_and_patch_norms_and_layerscale_init_keys():
    """model.untie_cls_and_patch_norms (the official option; the model had it, the config did
    not, so no run could train one) builds a backbone with a `cls_norm`; layerscale_init 0 (which
    zeroed every residual branch) is refused by name."""
    from fastdino.models.backbones import build_backbone

    cfg = load_config("smoke", ["model.untie_cls_and_patch_norms=true"])
    assert any(k.startswith("cls_norm.") for k in build_backbone(cfg.model).state_dict())
    assert not any(k.startswith("cls_norm.")
                   for k in build_backbone(load_config("smoke").model).state_dict())
    with pytest.raises(ConfigError, match="model.layerscale_init.*a float > 0"):
        load_config("smoke", ["model.layerscale_init=0"])


def test_load_unvalidated_reads_a_config_saved_by_another_version(tmp_path, caplog):
    """A run's config.yaml holding a key removed or renamed since was refused by every reader of
    saved runs (eval, export, distillation): it is dropped with a warning naming it; a wrong type
    in a key that exists is still an error."""
    yml = tmp_path / "config.yaml"
    yml.write_text("model:\n  arch: vit_base\n  old_knob: 3\ntrain:\n  removed_key: x\n")
    with caplog.at_level("WARNING"):
        cfg = load_unvalidated(yml)
    assert cfg.model.arch == "vit_base"
    assert "model.old_knob, train.removed_key" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'model.old_knob'"):
        load_config(yml)  # training stays strict
    yml.write_text("model:\n  depth: many\n")
    with pytest.raises(ConfigError, match="model.depth"):
        load_unvalidated(yml)
