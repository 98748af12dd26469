"""The attention core, softmax(q k^T / sqrt(d_h)) v, and the one switch choosing its backend.

`model.attn_impl`:
  auto       -> SDPA (flash-attn is picked up by the varlen/FA work when present)
  sdpa       -> torch.nn.functional.scaled_dot_product_attention (no mask, no dropout)
  torch      -> the explicit fp32 reference below (slow, for tests)
  flash_attn -> flash-attn; a clear error when the package is not importable
flash-attn is optional: it is imported lazily, never at module import time. The choice is logged
once per (impl, backend) pair.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("fastdino")
_logged: set[tuple[str, str]] = set()

ATTN_IMPLS = ("auto", "sdpa", "torch", "flash_attn")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference: q, k, v [B, H, N, d_h] -> [B, H, N, d_h], computed in fp32, cast back."""
    scale = q.shape[-1] ** -0.5
    scores_bhnn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (scores_bhnn.softmax(dim=-1) @ v.float()).to(q.dtype)


def flash_attn_available() -> bool:
    return (importlib.util.find_spec("flash_attn_interface") is not None
            or importlib.util.find_spec("flash_attn") is not None)


def resolve_attn_impl(impl: str) -> str:
    """Map the config value to the backend that runs; raise on a bad or unavailable choice."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl = {impl!r} is invalid: allowed is one of "
                         + " | ".join(ATTN_IMPLS))
    if impl == "flash_attn" and not flash_attn_available():
        raise RuntimeError("model.attn_impl=flash_attn but neither flash_attn_interface (FA3) nor "
                           "flash_attn (FA2) is importable: install the `flash` extra or use "
                           "attn_impl=sdpa")
    backend = "sdpa" if impl == "auto" else impl
    if (impl, backend) not in _logged:
        _logged.add((impl, backend))
        logger.info("model: attn_impl=%s uses the %s attention backend", impl, backend)
    return backend


def _flash_attn_bnhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """flash-attn on [B, N, H, d_h] tensors (FA3 first, then FA2)."""
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    except ImportError:
        from flash_attn import flash_attn_func  # FA2
        return flash_attn_func(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """q, k, v [B, H, N, d_h] -> [B, H, N, d_h] with the resolved `backend`."""
    if backend == "torch":
        return attention_ref(q, k, v)
    if backend == "flash_attn":
        out_bnhd = _flash_attn_bnhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out_bnhd.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)
