"""USERS.md §3: fp16 diverges for DINO (v1#58, v1#104, ibot#19) and DINOv3 does not support it
(v3#181). fastdino has no fp16 path: asking for it, in the yaml or in a user DeepSpeed json, is a
one-line error naming the setting and what is allowed, before any work."""

import json

import pytest
import torch

from fastdino.config import ConfigError, load_config
from fastdino.parallel import build_ds_config


def test_fp16_in_the_yaml_is_refused_naming_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["deepspeed.precision=fp16"])
    msg = str(e.value)
    assert "\n" not in msg and "deepspeed.precision" in msg and "'fp16'" in msg
    assert "auto | bf16 | fp32" in msg


def test_fp16_in_a_user_deepspeed_json_is_refused(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True, "loss_scale": 0}}))
    cfg = load_config(None, [f"deepspeed.config_file={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, world_size=2, dtype=torch.bfloat16)
    msg = str(e.value)
    assert "\n" not in msg and "fp16.enabled" in msg and "fp16 is not supported" in msg
    # the same json with fp16 off is merged, bf16 from the yaml
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": False}}))
    ds = build_ds_config(cfg, world_size=2, dtype=torch.bfloat16)
    assert ds["fp16"] == {"enabled": False} and ds["bf16"] == {"enabled": True}
