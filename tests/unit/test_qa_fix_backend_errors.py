"""Backends this machine cannot run are one-line ConfigErrors naming the key when the SSL arch is
built (train.py's main prints them as one line, exit 2), not a RuntimeError at the first step."""

import pytest
import torch

from fastdino.config import ConfigError, load_config
from fastdino.layers import attn_backend
from fastdino.meta_arch import SSLMetaArch

SMALL = ["model.arch=vit_test", "crops.global_crops_size=32", "crops.local_crops_size=16",
         "dino.head.n_prototypes=32", "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8",
         "ibot.head.n_prototypes=32", "ibot.head.hidden_dim=16", "ibot.head.bottleneck_dim=8"]


def _arch(*overrides: str) -> SSLMetaArch:
    return SSLMetaArch(load_config(None, [*SMALL, *overrides]), torch.device("cpu"))


def test_triton_kernels_on_cpu_without_the_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU: Triton cannot run
    with pytest.raises(ConfigError, match=r"'kernels.impl' = 'triton'.*cpu.*allowed here is "
                                          r"auto \| torch"):
        _arch("kernels.impl=triton")
    _arch("kernels.impl=auto")  # the fallback it names builds


def test_flash_attn_not_installed_or_off_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(attn_backend, "flash_attn_versions", lambda: ())
    with pytest.raises(ConfigError, match=r"'model.attn_impl' = 'flash_attn'.*installed.*"
                                          r"allowed here is auto \| sdpa \| torch"):
        _arch("model.attn_impl=flash_attn")
    monkeypatch.setattr(attn_backend, "flash_attn_versions", lambda: ("fa2",))
    with pytest.raises(ConfigError, match=r"'model.attn_impl' = 'flash_attn'.*CUDA only.*cpu"):
        _arch("model.attn_impl=flash_attn")
