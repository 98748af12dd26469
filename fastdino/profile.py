"""`fastdino profile --config configs/vits16.yaml [--steps 20] [k=v ...]` (or
`python -m fastdino.profile ...`): throughput of the training step on this GPU.

Runs `warmup + steps` iterations of the real `Trainer.step` (one process, the engine the trainer
picks) and reports:
- images/s per GPU = B / (wall time of the timed steps / steps), an image being its 2 global +
  n_local local crops; the timed steps run as training runs them, without synchronisations
  between phases (the host enqueues ahead of the GPU across phases, which is what a host-bound
  step lives on);
- the step-time breakdown from `phase_steps` more steps under
  `fastdino.timing.PhaseTimer(sync=True)` (a CUDA synchronisation at every phase boundary; phases
  recorded by the trainer: data_wait, teacher_forward, student_forward, losses, backward,
  optimizer, ema; "other" is the rest: schedules, gradient clipping, Python), as ms per step of
  those synchronised steps (`phase_step_s`, at least `step_s`). On CPU nothing needs
  synchronising: the timed steps give the breakdown;
- achieved TFLOP/s and MFU from the FLOP model below, MFU against the GPU's dense bf16 peak
  (datasheet, PEAK_BF16_TFLOPS);
- GPU utilisation, memory, power and SM clock sampled by pynvml (nvidia-ml-py) every 100 ms in a
  background thread. Without a GPU (or without pynvml) those columns say n/a.
It prints a table and writes JSON (--json).

FLOP model (matmul FLOPs, 2 per multiply-add; norms, softmax, GELU, RoPE, losses, Sinkhorn and
the optimizer are not counted — the usual MFU convention; attention's two T×T matmuls are):
  ViT forward, per image of side S (P = (S/p)^2 patches, T = 1 + n_storage + P tokens):
    patch embed  2·P·(3·p²)·D
    per block    2·T·D·3D (qkv) + 2·T²·D (q·kᵀ) + 2·T²·D (attn·v) + 2·T·D·D (proj)
                 + 2·T·D·F·m (FFN; MLP: m = 2, F = ratio·D; SwiGLU: m = 3,
                   F = align_up(int(D·ratio·2/3), align))
  Student stochastic depth processes ⌊b·(1−p)⌋ of the b crops of a type in every residual
  branch, so student block FLOPs are scaled by that fraction (executed FLOPs, not model FLOPs).
  DINO/iBOT head forward, per row: 2·(D·H + (nlayers−2)·H·H + H·bn + bn·K) (nlayers ≥ 2;
    nlayers = 1: 2·(D·bn + bn·K)).
  One training step per GPU (B images):
    student = 3 × forward (backward = 2 × forward; continued pretraining: 1 × for a LoRA block,
              0 × for the patch embedding and blocks below optim.frozen_blocks, whole backbone
              at -1: backbone_backward_factors) of: backbone on 2B global + n_local·B local
              crops, DINO head on (2 + n_local)·B CLS rows, iBOT head on M masked patch rows;
    teacher = 1 × forward of: backbone on 2B global crops, DINO head on 2B rows, iBOT head on M;
    Gram teacher (gram.use) = 1 × backbone forward on 2B crops at the Gram crop size.
  M (masked rows) = Σ_{i<n} int(P·(lo + (hi−lo)/n·(i+1))), n = int(2B·mask_sample_probability)
  (SPEC.md §1.4; the same count as bench/registry.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

PHASES = ("data_wait", "teacher_forward", "student_forward", "losses", "backward", "optimizer",
          "ema")
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity), by a substring of the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H800": 989.0,
                    "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


# ------------------------------------------------------------------------------------------------
# FLOP model


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def arch_dims(model_cfg) -> dict[str, Any]:
    """D, depth, FFN hidden width F and matrix count m of `model_cfg` (a ModelConfig)."""
    from fastdino.models.backbones import ARCH_TABLE

    if model_cfg.arch not in ARCH_TABLE:
        raise ValueError(f"model.arch = {model_cfg.arch!r}: allowed is one of "
                         f"{', '.join(ARCH_TABLE)}")
    D, depth, _, ffn, ratio, _ = ARCH_TABLE[model_cfg.arch]
    D = model_cfg.embed_dim or D
    depth = model_cfg.depth or depth
    ffn = model_cfg.ffn_layer or ffn
    ratio = model_cfg.ffn_ratio or ratio
    if ffn == "mlp":
        hidden, mats = int(D * ratio), 2
    else:  # swiglu (align 8), swiglu32, swiglu64
        align = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64}[ffn]
        hidden, mats = _align_up(int(D * ratio * 2 / 3), align), 3
    return {"D": D, "depth": depth, "ffn_hidden": hidden, "ffn_mats": mats,
            "patch": model_cfg.patch_size, "n_storage": model_cfg.n_storage_tokens}


def vit_block_flops(D: int, T: int, ffn_hidden: int, ffn_mats: int) -> int:
    """Forward FLOPs of one block on one sequence of T tokens."""
    return 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * T * D * ffn_hidden * ffn_mats


def vit_flops(model_cfg, image_size: int, batch: int, drop_path_rate: float = 0.0) -> int:
    """Forward FLOPs of the backbone on `batch` square images of side `image_size`; with
    `drop_path_rate` p, the blocks run on ⌊batch·(1−p)⌋ (≥ 1) of the images (student only)."""
    embed, block = vit_parts(model_cfg, image_size, batch, drop_path_rate)
    return embed + arch_dims(model_cfg)["depth"] * block


def vit_parts(model_cfg, image_size: int, batch: int, drop_path_rate: float = 0.0
              ) -> tuple[int, int]:
    """vit_flops as (patch embedding, one block): the parts the backward counts apart."""
    d = arch_dims(model_cfg)
    D, p = d["D"], d["patch"]
    P = (image_size // p) ** 2
    T = 1 + d["n_storage"] + P
    kept = batch if drop_path_rate <= 0 else max(1, math.floor(batch * (1 - drop_path_rate)))
    return (batch * 2 * P * 3 * p * p * D,
            kept * vit_block_flops(D, T, d["ffn_hidden"], d["ffn_mats"]))


def backbone_backward_factors(cfg) -> tuple[float, list[float]]:
    """Backward FLOPs of the student's patch embedding and of each block, in forwards: 2 where
    its weights train (input and weight gradients); 1 for a LoRA block (input gradients through
    the frozen base; the rank-r adapters are not counted); 0 before optim.frozen_blocks (nothing
    below needs a gradient) and for the whole backbone at -1. The patch embedding counts 2 when
    it trains, as the blocks (its input gradient, to the images, is not computed; kept so that
    the plain count stays 3 forwards)."""
    o, depth = cfg.optim, arch_dims(cfg.model)["depth"]
    if o.frozen_blocks == -1:
        return 0.0, [0.0] * depth
    first = max(o.frozen_blocks, 0)
    trained = 1.0 if o.lora_rank > 0 else 2.0
    embed = 2.0 if first == 0 and o.lora_rank == 0 else 0.0
    return embed, [0.0 if i < first else trained for i in range(depth)]


def head_flops(head_cfg, in_dim: int, rows: int) -> int:
    """Forward FLOPs of a DINOHead (MLP + bias-free last layer) on `rows` rows."""
    H, bn = head_cfg.hidden_dim, head_cfg.bottleneck_dim
    K, n = head_cfg.n_prototypes, head_cfg.nlayers
    mlp = in_dim * bn if n == 1 else in_dim * H + (n - 2) * H * H + H * bn
    return 2 * rows * (mlp + bn * K)


def masked_rows(batch: int, n_patches: int, probability: float, ratio_min_max) -> int:
    lo, hi = ratio_min_max
    n = int(2 * batch * probability)
    if n == 0:
        return 0
    step = (hi - lo) / n
    return sum(int(n_patches * (lo + step * (i + 1))) for i in range(n))


def step_flops(cfg, teacher_cfg=None) -> dict[str, int] | None:
    """FLOPs of one training step (an optimizer step: gas micro-batches) on one GPU (see the
    module docstring), by part; with crops.resolution_mix, the expectation over its triples.
    `teacher_cfg`: the distillation teacher's config (its architecture and heads), None for the
    EMA teacher (the student's). None for a ConvNeXt student or teacher (no FLOP model)."""
    teacher_cfg = teacher_cfg or cfg
    if any(c.model.arch.startswith("convnext_") for c in (cfg, teacher_cfg)):
        return None
    variants = cfg.crops.variants()
    if len(variants) == 1:
        return _step_flops_at(cfg, cfg.crops, teacher_cfg)
    parts = [(_step_flops_at(cfg, c, teacher_cfg), r) for c, r in variants]
    return {k: round(sum(p[k] * r for p, r in parts)) for k in parts[0][0]}


def _step_flops_at(cfg, c, teacher_cfg) -> dict[str, int]:
    """step_flops at the crop sizes of `c` (a CropsConfig)."""
    B, m, tm = cfg.data.batch_size_per_gpu, cfg.model, teacher_cfg.model
    D, tD = arch_dims(m)["D"], arch_dims(tm)["D"]
    n_glob, n_loc = 2 * B, c.local_crops_number * B
    P = (c.global_crops_size // m.patch_size) ** 2
    M = masked_rows(B, P, cfg.ibot.mask_sample_probability, cfg.ibot.mask_ratio_min_max)
    dp = m.drop_path_rate
    embed_g, block_g = vit_parts(m, c.global_crops_size, n_glob, dp)
    embed_l, block_l = vit_parts(m, c.local_crops_size, n_loc, dp)
    heads = head_flops(cfg.dino.head, D, n_glob + n_loc) + head_flops(cfg.ibot.head, D, M)
    embed_bwd, block_bwd = backbone_backward_factors(cfg)
    student_fwd = embed_g + embed_l + len(block_bwd) * (block_g + block_l) + heads
    student_bwd = (embed_bwd * (embed_g + embed_l) + sum(block_bwd) * (block_g + block_l)
                   + 2 * heads)
    teacher = (vit_flops(tm, c.global_crops_size, n_glob)
               + head_flops(teacher_cfg.dino.head, tD, n_glob)
               + head_flops(teacher_cfg.ibot.head, tD, M))
    gram = 0
    if cfg.gram.use:
        gram = vit_flops(m, c.gram_teacher_crops_size or c.global_crops_size, n_glob)
    gas = cfg.deepspeed.gradient_accumulation_steps  # every micro-batch pays the same
    parts = {"student_fwd_bwd": round(student_fwd + student_bwd) * gas,
             "teacher_fwd": teacher * gas,
             "gram_teacher_fwd": gram * gas}
    parts["total"] = sum(parts.values())
    parts["masked_rows"] = M
    return parts


def peak_bf16_tflops(gpu_name: str) -> float | None:
    for key, val in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in gpu_name:
            return val
    return None


# ------------------------------------------------------------------------------------------------
# NVML sampling


class NvmlSampler:
    """Samples utilisation (%), memory used (MiB), power (W) and SM clock (MHz) of one GPU every
    `interval` s in a daemon thread. `available` is False without pynvml or a GPU."""

    def __init__(self, device_index: int = 0, interval: float = 0.1, enabled: bool = True):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = None
        self.available, self.why = False, "no CUDA device"
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._find_handle(pynvml, device_index)
            self.available = True
        except Exception as e:  # no package, no driver, no GPU
            self.why = f"{type(e).__name__}: {e}"

    @staticmethod
    def _find_handle(pynvml, index: int):
        try:  # match by PCI bus id: CUDA_VISIBLE_DEVICES renumbers CUDA devices, not NVML's
            props = torch.cuda.get_device_properties(index)
            bus_id = (f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:"
                      f"{props.pci_device_id:02x}.0")
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(index)

    def _sample(self) -> dict[str, float]:
        n, h = self._nvml, self._handle
        return {"util_pct": float(n.nvmlDeviceGetUtilizationRates(h).gpu),
                "mem_used_mib": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "power_w": n.nvmlDeviceGetPowerUsage(h) / 1e3,
                "sm_clock_mhz": float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except Exception as e:
                self.why = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any] | None:
        """{metric: {"mean", "max"}} over the samples, or None (n/a)."""
        if not self.samples:
            return None
        out = {}
        for k in self.samples[0]:
            vals = [s[k] for s in self.samples]
            out[k] = {"mean": sum(vals) / len(vals), "max": max(vals)}
        out["n_samples"] = len(self.samples)
        return out


# ------------------------------------------------------------------------------------------------
# The run


def profile(cfg, steps: int = 20, warmup: int = 5, fixed_batch: bool = False,
            phase_steps: int | None = None) -> dict[str, Any]:
    """Run warmup + steps training iterations of `cfg` and measure them (then, on a GPU,
    `phase_steps` (default min(steps, 5)) synchronised ones for the phase breakdown).
    `fixed_batch` reuses the first batch for every step (compute only: data_wait is then ~0)."""
    from fastdino.data import build_train_loader
    from fastdino.timing import PhaseTimer
    from fastdino.train import Trainer

    timer = PhaseTimer(sync=False)
    if cfg.distillation.students:  # codistill.py: the others add their own student steps
        logging.getLogger("fastdino").warning(
            "profile: distillation.students is set; this profiles the main student's "
            "distillation step alone, at data.batch_size_per_gpu (in the co-distillation run "
            "each further student adds its forward, backward and optimizer step and the teacher "
            "forward is shared; with distillation.student_ranks each student steps on its own "
            "ranks at its own per-rank batch, after the exchange of the teacher's outputs)")
    trainer = Trainer(cfg, timer=timer)
    device = trainer.info.device
    loader = build_train_loader(cfg, trainer.info.rank, trainer.info.world_size, 0)
    on_gpu = device.type == "cuda"
    sampler = NvmlSampler(device.index or 0 if on_gpu else 0, enabled=on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    gas = cfg.deepspeed.gradient_accumulation_steps  # micro-batches per optimizer step
    state = {"batches": None, "skipped": 0}

    def run(first: int, n: int, count_skips: bool) -> float:
        """n steps from iteration `first`; their wall time (GPU drained at both ends)."""
        if on_gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for it in range(first, first + n):
            with timer("data_wait"):
                if state["batches"] is None or not fixed_batch:
                    state["batches"] = [next(loader).to(device) for _ in range(gas)]
            if trainer.step(it, state["batches"]) is None and count_skips:
                state["skipped"] += 1
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    run(0, warmup, count_skips=False)
    timer.reset()
    sampler.start()
    wall = run(warmup, steps, count_skips=True)
    sampler.stop()
    phase_wall, n_phase = wall, steps
    if on_gpu:  # the breakdown needs a synchronisation at every phase boundary: separate steps
        n_phase = max(1, min(steps, 5) if phase_steps is None else phase_steps)
        timer.reset()
        timer.sync = True
        phase_wall = run(warmup + steps, n_phase, count_skips=False)
        timer.sync = False
    teacher = trainer.arch.distillation_teacher
    return report(cfg, steps, wall, timer.totals, state["skipped"], sampler, device, fixed_batch,
                  phase_wall / n_phase, n_phase,
                  teacher_cfg=None if teacher is None else teacher.config)


def report(cfg, steps: int, wall: float, totals: dict[str, float], skipped: int,
           sampler: NvmlSampler | None, device: torch.device, fixed_batch: bool,
           phase_step_s: float | None = None, phase_steps: int | None = None,
           teacher_cfg=None) -> dict[str, Any]:
    """`totals`: phase seconds over `phase_steps` steps of `phase_step_s` each (default: the
    timed steps themselves). `teacher_cfg`: a distillation teacher's config (step_flops)."""
    step_s = wall / steps
    phase_step_s = step_s if phase_step_s is None else phase_step_s
    phase_steps = steps if phase_steps is None else phase_steps
    phases = {k: totals.get(k, 0.0) / phase_steps for k in PHASES}
    phases["other"] = max(0.0, phase_step_s - sum(phases.values()))
    flops = step_flops(cfg, teacher_cfg)
    achieved = None if flops is None else flops["total"] / step_s / 1e12
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(gpu) if device.type == "cuda" else None
    nvml = sampler.summary() if sampler is not None else None
    return {
        "gpu": gpu, "arch": cfg.model.arch, "batch_per_gpu": cfg.data.batch_size_per_gpu,
        "crops": {"global": [2, cfg.crops.global_crops_size],
                  "local": [cfg.crops.local_crops_number, cfg.crops.local_crops_size]},
        "kernels_impl": cfg.kernels.impl, "precision": cfg.deepspeed.precision,
        "fixed_batch": fixed_batch, "steps": steps, "skipped_steps": skipped,
        "gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
        "step_s": step_s, "phase_step_s": phase_step_s, "phase_steps": phase_steps,
        "images_per_s_per_gpu": (cfg.data.batch_size_per_gpu
                                 * cfg.deepspeed.gradient_accumulation_steps / step_s),
        "phases_s": phases, "flops_per_step": flops, "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": None if peak is None or achieved is None else achieved / peak,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None),
        "nvml": nvml, "nvml_note": None if nvml else (sampler.why if sampler else "not sampled"),
        "torch": torch.__version__,
    }


def format_report(r: dict[str, Any]) -> str:
    def na(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [f"{r['arch']} on {r['gpu']}: B={r['batch_per_gpu']}, crops 2x{r['crops']['global'][1]}"
             f" + {r['crops']['local'][0]}x{r['crops']['local'][1]}, {r['steps']} steps"
             + (" (fixed batch)" if r["fixed_batch"] else ""),
             f"  images/s per GPU   {r['images_per_s_per_gpu']:.1f}",
             f"  step               {r['step_s'] * 1e3:.1f} ms",
             (f"  achieved           {r['achieved_tflops']:.4g} TFLOP/s "
              f"({r['flops_per_step']['total'] / 1e12:.4g} TFLOP/step)"
              if r["flops_per_step"] is not None else
              "  achieved           n/a (no FLOP model for a ConvNeXt)"),
             f"  MFU                {na(r['mfu'] and 100 * r['mfu'], '.1f')} % of "
             f"{na(r['peak_bf16_tflops'], '.0f')} TFLOP/s bf16 peak",
             f"  peak memory        {na(r['peak_mem_gib'], '.2f')} GiB",
             f"  phase              ms/step   share   ({r['phase_steps']} steps synchronised at "
             f"every phase: {r['phase_step_s'] * 1e3:.1f} ms/step)"]
    for k, v in r["phases_s"].items():
        lines.append(f"    {k:<16} {v * 1e3:>8.2f}  {100 * v / r['phase_step_s']:>5.1f} %")
    n = r["nvml"]
    for key, label, spec in (("util_pct", "GPU util %", ".0f"),
                             ("mem_used_mib", "memory MiB", ".0f"),
                             ("power_w", "power W", ".0f"),
                             ("sm_clock_mhz", "SM clock MHz", ".0f")):
        if n is None:
            lines.append(f"  {label:<18} n/a")
        else:
            lines.append(f"  {label:<18} mean {n[key]['mean']:{spec}}  max {n[key]['max']:{spec}}")
    if r["skipped_steps"]:
        lines.append(f"  WARNING: {r['skipped_steps']} step(s) skipped (non-finite loss)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastdino profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="yaml preset, e.g. configs/vits16.yaml")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--fixed-batch", action="store_true",
                   help="reuse the first batch every step (measures compute, not the loader)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("overrides", nargs="*",
                   help="dotted config overrides, e.g. data.batch_size_per_gpu=32")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")

    from fastdino.config import ConfigError, load_config

    # the run's folder (its config.yaml) is the measurement's scratch: removed however it ends
    out_dir = tempfile.mkdtemp(prefix="fastdino-profile-")
    overrides = [f"train.output_dir={out_dir}", "train.resume=none", "train.knn_every=0",
                 *args.overrides]
    try:
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as e:
            p.error(f"config error: {e}")
        try:  # what the build finds: a backend this machine lacks, a data folder not there
            r = profile(cfg, args.steps, args.warmup, args.fixed_batch)
        except ConfigError as e:
            p.error(f"config error: {e}")
        except FileNotFoundError as e:
            p.error(str(e))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    from fastdino import dist as fdist

    if not fdist.is_main_process():  # under a launcher every rank measures; rank 0 reports
        return 0
    print(format_report(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
