"""Photometric augmentation benchmark cases (issue 9): kernels/photometric.py on one step's crops
at DINOv3's multi-crop settings (B = 64 images per GPU: 2B global crops of 224², 8B local crops of
96²), parameters drawn with the plan's probabilities (jitter 0.8 in a random order, greyscale 0.2,
blur with the official per-crop probabilities, solarize 0.2 on the second global crop, flip 0.5).

    bytes = N·H·W·(3 + 12)   (read the uint8 HWC crop, write the fp32 CHW normalised crop: the
                              floor; the kernel's passes over the crop are L2 traffic)

Providers: torch = photometric_ref (eager, on the GPU), triton = the kernel; each call first copies
the crops (the op distorts its input in place), as the loader's concatenation does. Forward only
(a data op: no gradient). No torch.compile row: the reference's data-dependent branches (which
crops have which op) break its graph into dozens of pieces, and it would time compile stubs.
"""

from __future__ import annotations

import numpy as np
import torch
from fastdino.kernels.photometric import photometric_, photometric_ref

from bench.harness import BenchCase
from bench.registry import get
from fastdino.data import dali_plan as P

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _plan_params(n_images: int, crop: str, seed: int) -> torch.Tensor:
    """Kernel parameters of one crop type for n_images, drawn by the DALI loader's own plan."""
    from fastdino.config import load_config

    cfg = load_config(None, ["crops.blur_probabilities=official"])
    g = np.random.default_rng(seed)
    rows = np.stack([P.plan_image(640, 480, cfg.crops, g) for _ in range(n_images)])
    rows = rows[:, :2] if crop == "global" else rows[:, 2:]
    return torch.from_numpy(P.photometric_params(rows.transpose(1, 0, 2).reshape(-1, P.N_PARAMS)))


def _case(name: str, crop: str, n_images: int, side: int, shape_from: str) -> BenchCase:
    params = _plan_params(n_images, crop, seed=side)
    n = len(params)

    def make_inputs(device: torch.device, dt: torch.dtype) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, 256, (n, side, side, 3), generator=g, dtype=torch.uint8)
        return {"x": x.to(device), "params": params.to(device)}

    def ref(x, params):
        return photometric_ref(x.clone(), params, MEAN, STD)

    def kernel(x, params):
        return photometric_(x.clone(), params, MEAN, STD)

    return BenchCase(
        op="photometric", name=name,
        params={"crops": n, "side": side, "crop": crop, "shape_from": shape_from},
        dtype=torch.float32, make_inputs=make_inputs,
        providers={"torch": ref, "triton": kernel, "torch_compile": None}, grad_inputs=[],
        bytes_fwd=n * side * side * 15,
        formula="N·H·W·(3 B uint8 in + 12 B fp32 out); passes over the crop are L2 traffic",
        atol=0.0, rtol=0.0, modes=("fwd",))


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized
        return [_case("photometric-cpu-odd", "local", 3, 19, "odd size")]
    s = get("vitb16")
    out = [_case(f"photometric-local{s.local_size}", "local", s.batch_per_gpu, s.local_size,
                 f"vitb16 B={s.batch_per_gpu}, {s.n_local} local crops"),
           _case(f"photometric-global{s.global_size}", "global", s.batch_per_gpu, s.global_size,
                 f"vitb16 B={s.batch_per_gpu}, 2 global crops")]
    return out[:1] if quick else out
