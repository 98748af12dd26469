"""Config keys that interact, checked when the config loads (one line naming the key), not at the
first step: a local crop smaller than one patch, a Gram loss on masked tokens with nothing
masked, a distillation teacher_config without distillation, an empty output_dir / resume."""

import pytest

from fastdino.config import ConfigError, load_config


@pytest.mark.parametrize("overrides, key", [
    # the patch embedding's 16 x 16 convolution cannot run on an 8 px crop
    (["crops.local_crops_size=8"], "crops.local_crops_size"),
    (["crops.resolution_mix=[[64, 8, null, 1.0]]"], "crops.resolution_mix"),
    # a ConvNeXt student: its stride-32 map needs >= 32 px
    (["model.arch=convnext_test", "model.embed_dim=null", "model.depth=null",
      "model.num_heads=null", "distillation.enabled=true", "distillation.teacher=/t",
      "crops.local_crops_size=16"], "crops.local_crops_size"),
])
def test_a_local_crop_smaller_than_a_patch_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"'{key}'.*>= (16|32)"):
        load_config("smoke", overrides)


def test_a_local_crop_of_one_patch_and_a_remainder_still_loads():
    """The official high-res local crop (168 px at patch 16) leaves a remainder: allowed."""
    assert load_config("smoke", ["crops.local_crops_size=16"]).crops.local_crops_size == 16
    assert load_config("smoke", ["crops.local_crops_size=40"]).crops.local_crops_size == 40


def test_gram_on_masked_tokens_needs_masks():
    base = ["gram.use=true", "gram.it_load_ema_teacher=0", "gram.img_level=false",
            "gram.tokens_used=masked"]
    with pytest.raises(ConfigError, match=r"'gram.tokens_used'.*mask_sample_probability"):
        load_config("smoke", [*base, "ibot.mask_sample_probability=0"])
    assert load_config("smoke", base).gram.tokens_used == "masked"


def test_a_teacher_config_without_distillation_is_refused():
    """It would be ignored: the run self-distils."""
    with pytest.raises(ConfigError, match=r"'distillation.teacher_config'.*distillation.enabled"):
        load_config("smoke", ["distillation.teacher_config=vitl16"])


@pytest.mark.parametrize("key", ["train.output_dir", "train.resume"])
def test_empty_output_dir_and_resume_are_refused(tmp_path, key):
    """'' reads as the working directory (output_dir) or no checkpoint at all (resume)."""
    cfg_file = tmp_path / "c.yaml"
    section, name = key.split(".")
    cfg_file.write_text(f"{section}:\n  {name}: ''\n")
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(cfg_file)


def test_every_backbone_the_models_build_is_a_model_arch():
    """vit_large_plus (the hub's dinov3_vitl16plus) loaded in `fastdino eval --arch` but
    model.arch refused it, so its released weights could not be trained on."""
    from fastdino.config import ARCHS
    from fastdino.models.backbones import ARCH_TABLE
    from fastdino.models.convnext import CONVNEXT_ARCHS

    assert set(ARCHS) == set(ARCH_TABLE) | set(CONVNEXT_ARCHS)
    assert load_config(None, ["model.arch=vit_large_plus"]).model.arch == "vit_large_plus"


@pytest.mark.parametrize("override, expected", [
    # the type in words, not Python's `int | None` / `tuple[str, ...] | None`
    ("model.embed_dim=abc", "'model.embed_dim' = 'abc' has the wrong type: expected an integer "
                            "or null"),
    ("train.pca_images=5", "expected a list of strings or null"),
    # the whole value as given, not the one element that failed ('a')
    ("crops.global_crops_scale=[a, b]", "'crops.global_crops_scale' = ['a', 'b'] has the wrong "
                                        "type: expected a list of 2 numbers"),
    ("crops.mean=[1, 2]", "expected a list of 3 numbers (got 2)"),
    ("crops.resolution_mix=[[1, 2]]", "expected a list of lists [an integer, an integer, an "
                                      "integer or null, a number] (got 2)"),
    ("model.qkv_bias=3", "expected true or false"),
    ("train.output_dir=", "'train.output_dir' is null: expected a string"),
])
def test_type_errors_say_the_type_in_words(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_integer_keys_take_scientific_notation_of_integers():
    """`train.max_iterations=1e6`: yaml 1.1 reads 1e6 as a string; an integer key takes it when
    it is a whole number, and still refuses a fraction."""
    cfg = load_config(None, ["train.max_iterations=1e6", "gram.start_iteration=1.25E5"])
    assert cfg.train.max_iterations == 1_000_000 and isinstance(cfg.train.max_iterations, int)
    assert cfg.gram.start_iteration == 125_000
    with pytest.raises(ConfigError, match="'train.epochs' = '2.5e0'.*expected an integer"):
        load_config(None, ["train.epochs=2.5e0"])
