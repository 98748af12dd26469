"""`python -m bench data`: images/s and CPU cores used by the DALI and torch loaders on the same
folder at DINOv3 crop settings (2 x 224 + 8 x 96 by default).

    python -m bench data --root /imgs --batch 64 --steps 30 --workers 8
    python -m bench data --quick            # embedded sample images, small batch, few steps

Both loaders are given the same CPU budget: `--workers` torch DataLoader workers, or `--workers`
DALI CPU threads. Throughput = images per second over the timed steps (after warm-up; steady
state, see `measure`: the second-half rate is printed as a check), with the
batch on the GPU when there is one (torch batches are copied there; DALI's are made there).
CPU cores used = CPU time of this process and its children (user + system) / wall time, read with
psutil (live worker processes included). Results are appended as JSON lines to
<out>/<gpu-slug>-<date>.jsonl (kind "data").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def cases(quick: bool, on_gpu: bool) -> list:
    """No kernel cases: this module is a loader benchmark (the op harness skips it)."""
    return []


def _cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def measure(loader, steps: int, warmup: int, device) -> dict[str, Any]:
    """Steady-state throughput: `warmup` untimed steps (workers / DALI threads started), then
    `steps` timed ones. Neither loader can bank batches during warm-up: the consumer here is
    faster than either producer, so their prefetch queues (torch: prefetch_factor x workers,
    DALI: prefetch_queue_depth) stay near empty. As a check, the rate over the second half
    of the timed steps is reported too; a first half inflated by prefetched batches would show as a
    lower second-half rate. torch batches arrive in rounds of `workers` (each worker makes a whole
    batch), so use a number of steps that is a multiple of --workers."""
    import torch

    def one():
        b = next(loader)
        if device.type == "cuda":
            b = b.to(device)  # no-op for DALI (already there), H2D for torch
        return b

    for _ in range(warmup):
        b = one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    half = steps // 2
    t_half = t0
    for k in range(steps):
        if k == half:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_half = time.perf_counter()
        b = one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    wall = t1 - t0
    cpu = _cpu_seconds() - cpu0
    n = steps * b.n_images
    return {"images": n, "wall_s": wall, "images_per_s": n / wall,
            "images_per_s_2nd_half": (steps - half) * b.n_images / (t1 - t_half),
            "cpu_cores_used": cpu / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="image folder (default: embedded sample images)")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--workers", type=int, default=4, help="torch workers = DALI CPU threads")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-number", type=int, default=8)
    p.add_argument("--loaders", default="dali,torch", help="comma list of dali, torch")
    p.add_argument("--jitter", choices=("triton", "exact", "fast"), default=None,
                   help="the DALI loader's photometric ops (data.dali_jitter; default: the "
                   "config's, triton): triton = the graph crops and resizes, "
                   "kernels/photometric.py does the rest; exact = all in the DALI graph, PIL's "
                   "ColorJitter bit for bit; fast = DALI's own jitter ops (~3x fewer operators "
                   "than exact). exact / fast differ only on the GPU: CPU-only DALI runs PIL's "
                   "jitter in the graph")
    p.add_argument("--fast-hue", action="store_true", help="the same as --jitter fast")
    p.add_argument("--torch-photometric", choices=("cpu", "gpu"), default=None,
                   help="the torch loader's photometric ops (data.torch_photometric; default: "
                   "the config's, cpu): gpu = the workers cut, resize and flip, "
                   "kernels/photometric.py does the rest on the GPU")
    p.add_argument("--jpeg-draft", choices=("on", "off"), default=None,
                   help="the torch loader's reduced JPEG decoding (data.jpeg_draft; default: "
                   "the config's, on): off = every JPEG decoded at full size")
    p.add_argument("--source-workers", type=int, default=None,
                   help="DALI source processes (data.dali_source_workers; default: the "
                   "config's, 2; 0 = file reads, plans and masks in this process)")
    p.add_argument("--quick", action="store_true", help="batch 8, 3 steps, 1 warm-up")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.warmup = 8, 3, 1
    if args.fast_hue:
        args.jitter = "fast"

    import torch

    from bench import results
    from fastdino.config import ConfigError, load_config
    from fastdino.data.dali import build_dali_loader, dali_available, graph_operators
    from fastdino.data.loader import build_train_loader
    from fastdino.data.sources import find_images

    def error(msg: str) -> int:
        print(f"{p.prog}: error: {msg}", file=sys.stderr)
        return 2

    # what would fail later with a traceback (or after the runs: --out), as one line now
    out = args.out or Path(__file__).resolve().parent / "results"
    if problem := results.out_dir_problem(out):
        return error(problem)
    if args.root:
        try:  # a folder, shard or pattern, as data.root takes it
            if not find_images(args.root, what="--root"):
                return error(f"--root {args.root}: no images")
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            return error(str(e))

    overrides = [f"data.batch_size_per_gpu={args.batch}", f"data.num_workers={args.workers}",
                 f"crops.global_crops_size={args.global_size}",
                 f"crops.local_crops_size={args.local_size}",
                 f"crops.local_crops_number={args.local_number}"]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.jitter:
        overrides.append(f"data.dali_jitter={args.jitter}")
    if args.torch_photometric:
        overrides.append(f"data.torch_photometric={args.torch_photometric}")
    if args.jpeg_draft:
        overrides.append(f"data.jpeg_draft={'true' if args.jpeg_draft == 'on' else 'false'}")
    if args.source_workers is not None:
        overrides.append(f"data.dali_source_workers={args.source_workers}")
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        return error(f"config error: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = results.environment()
    records = []
    for name in [s.strip() for s in args.loaders.split(",") if s.strip()]:
        if name == "dali" and not dali_available():
            print("dali: skipped (NVIDIA DALI is not installed: pip install 'fastdino[dali]')")
            continue
        if name not in ("dali", "torch"):
            raise SystemExit(f"--loaders: unknown loader {name!r}; allowed are dali, torch")
        t0 = time.perf_counter()
        loader = build_dali_loader(cfg) if name == "dali" else build_train_loader(cfg)
        setup_s = time.perf_counter() - t0
        operators = graph_operators(loader.pipe) if name == "dali" else None
        m = measure(loader, args.steps, args.warmup, device)
        del loader
        print(f"{name:5s}  {m['images_per_s']:8.1f} images/s  {m['cpu_cores_used']:5.2f} CPU cores"
              f"  (2nd half {m['images_per_s_2nd_half']:.1f} images/s)"
              f"  ({m['images']} images in {m['wall_s']:.2f} s; setup {setup_s:.1f} s; "
              f"B={args.batch}, {args.global_size}x2 + {args.local_size}x{args.local_number}, "
              f"{args.workers} workers/threads, {device.type}"
              + (f", {operators} DALI operators, photometric {cfg.data.dali_jitter}, "
                 f"{cfg.data.dali_source_workers} source processes" if operators else
                 f", photometric on {cfg.data.torch_photometric}, JPEG draft "
                 f"{'on' if cfg.data.jpeg_draft else 'off'}") + ")")
        if abs(m["images_per_s_2nd_half"] / m["images_per_s"] - 1) > 0.25:
            print(f"{name:5s}  not steady state (halves differ by >25%): use more --steps, a "
                  "multiple of --workers")
        records.append({"schema": 1, "kind": "data", "time": results.now(), **env,
                        "loader": name, "dali_jitter": cfg.data.dali_jitter,
                        "exact_hue": cfg.data.dali_jitter == "exact",
                        "dali_source_workers": cfg.data.dali_source_workers,
                        "torch_photometric": cfg.data.torch_photometric,
                        "jpeg_draft": cfg.data.jpeg_draft, "batch": args.batch,
                        "workers": args.workers,
                        "crops": [args.global_size, args.local_size, args.local_number],
                        "root": args.root or "sample", "setup_s": setup_s,
                        "dali_operators": operators, **m})
    by = {r["loader"]: r for r in records}
    if "dali" in by and "torch" in by:
        ratio = by["dali"]["images_per_s"] / by["torch"]["images_per_s"]
        print(f"dali / torch images/s: {ratio:.2f}x")
    if records:
        path = results.results_path(out, env)
        results.append_jsonl(path, records)
        print(f"results appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
