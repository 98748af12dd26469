"""The attention core, softmax(q k^T / sqrt(d_h)) v, and the one switch choosing its backend.

`model.attn_impl` -> backend that runs (chosen per device/dtype, logged once per pair):
  auto       -> FA3 (flash_attn_interface, sm90+) or FA2 (flash_attn) on CUDA fp16/bf16 when
                installed, else SDPA
  sdpa       -> torch.nn.functional.scaled_dot_product_attention (no mask, no dropout)
  torch      -> `attention_ref`, the explicit fp32 reference (slow; tests)
  flash_attn -> FA3 or FA2, or a clear error (not installed, CPU tensor, fp32 input)
flash-attn is optional: it is imported lazily, never at module import time.

Layouts: dense `attention` takes q, k, v [B, H, N, d_h]; `varlen_attention` takes packed
q, k, v [T, H, d_h] (T = sum of all sequence lengths) with cu_seqlens [S + 1] int32, which lets
all crop types of a multi-crop step run in one flash-attn launch (attention.py).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from fastdino.config import ConfigError

logger = logging.getLogger("fastdino")

ATTN_IMPLS = ("auto", "sdpa", "torch", "flash_attn")
FLASH_BACKENDS = ("fa3", "fa2")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: q, k, v [B, H, N, d_h] -> [B, H, N, d_h], computed in fp32, cast back."""
    scale = q.shape[-1] ** -0.5
    scores_bhnn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (scores_bhnn.softmax(dim=-1) @ v.float()).to(q.dtype)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Reference for packed sequences: q, k, v [T, H, d_h] -> [T, H, d_h]; sequence s is
    rows cu_seqlens[s]:cu_seqlens[s+1] and attends only to itself."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        # [L, H, d] -> [1, H, L, d]
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[a:b] = attention_ref(qs, ks, vs)[0].transpose(0, 1)
    return out


@functools.lru_cache(maxsize=None)
def flash_attn_versions() -> tuple[str, ...]:
    """Installed flash-attn generations, best first: ("fa3", "fa2"), ("fa2",), ... or ()."""
    found = []
    if importlib.util.find_spec("flash_attn_interface") is not None:
        found.append("fa3")
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("fa2")
    return tuple(found)


def flash_attn_available() -> bool:
    return bool(flash_attn_versions())


def check_attn_impl(impl: str, device: torch.device | str | None = None) -> None:
    """ConfigError (one line, at model build) on an unknown `model.attn_impl`, on flash_attn
    when it is not installed, or, given the run's `device`, on flash_attn off CUDA."""
    if impl not in ATTN_IMPLS:
        raise ConfigError(f"config key 'model.attn_impl' = {impl!r} is invalid: allowed is one "
                          "of " + " | ".join(ATTN_IMPLS))
    if impl == "flash_attn" and not flash_attn_available():
        raise ConfigError("config key 'model.attn_impl' = 'flash_attn' is invalid here: neither "
                          "flash_attn_interface (FA3) nor flash_attn (FA2) is installed (the "
                          "`flash` extra): allowed here is auto | sdpa | torch")
    if impl == "flash_attn" and device is not None and torch.device(device).type != "cuda":
        raise ConfigError(f"config key 'model.attn_impl' = 'flash_attn' is invalid here: "
                          f"flash-attn runs on CUDA only, this run is on "
                          f"{torch.device(device).type}: allowed here is auto | sdpa | torch")


@functools.lru_cache(maxsize=None)
def select_backend(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Backend ("fa3" | "fa2" | "sdpa" | "torch") for attention on `device` in `dtype`."""
    check_attn_impl(impl)
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    versions = flash_attn_versions()
    if impl in ("auto", "flash_attn") and flash_ok and versions:
        # FA3 kernels are Hopper-only; elsewhere fall back to FA2 when it is installed.
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
        usable = [v for v in versions if v == "fa2" or hopper]
        backend = usable[0] if usable else "sdpa"
    elif impl == "flash_attn":
        raise RuntimeError(f"model.attn_impl=flash_attn needs CUDA fp16/bf16 inputs, got "
                           f"{device.type} {dtype}: use attn_impl=auto to fall back to SDPA")
    else:
        backend = "torch" if impl == "torch" else "sdpa"
    if impl == "flash_attn" and backend == "sdpa":
        raise RuntimeError(f"model.attn_impl=flash_attn: installed {versions} cannot run on this "
                           "GPU (FA3 needs sm90+)")
    logger.info("model: attn_impl=%s runs the %s attention backend on %s %s", impl, backend,
                device.type, dtype)
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """q, k, v [B, H, N, d_h] -> [B, H, N, d_h]."""
    if backend == "torch":
        return attention_ref(q, k, v)
    if backend in FLASH_BACKENDS:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn wants [B, N, H, d_h]
        if backend == "fa3":
            from flash_attn_interface import flash_attn_func
        else:
            from flash_attn import flash_attn_func
        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, backend: str) -> torch.Tensor:
    """Packed q, k, v [T, H, d_h] -> [T, H, d_h], block-diagonal over the sequences."""
    if backend in FLASH_BACKENDS:
        if backend == "fa3":
            from flash_attn_interface import flash_attn_varlen_func
        else:
            from flash_attn import flash_attn_varlen_func
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return out[0] if isinstance(out, tuple) else out
    return varlen_attention_ref(q, k, v, cu_seqlens)
