"""The `--device` flag of the command-line tools (eval, curate): a name checked up front, so a
bad one is one line naming the flag instead of a RuntimeError / AssertionError traceback from
deep inside the first tensor move."""

from __future__ import annotations

import torch


def parse_device(name: str) -> torch.device:
    """torch.device(`name`), or ValueError naming --device and what is allowed: cpu, cuda or
    cuda:N, N below the GPU count, CUDA only where it is available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is invalid: allowed is cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is invalid: allowed is cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: no CUDA GPU is available here; allowed is "
                         "--device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) "
                         "here")
    return device
