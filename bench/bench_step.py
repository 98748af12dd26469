"""`python -m bench step`: the end-to-end training-step benchmark (images/s per GPU, phase
breakdown, TFLOP/s and MFU) through `fastdino.profile`, for ViT-S/16 and ViT-B/16 by default.

    python -m bench step [--models vits16,vitb16] [--impls triton,torch] [--quick] [--loader]
    python -m bench step --impls triton,triton+compile     # + each ViT block torch.compiled

Each model runs configs/<model>.yaml with the registry's batch per GPU (bench/registry.py), one
process, the engine the trainer picks (plain torch when DeepSpeed is absent or not launched), and
`kernels.impl` = each of --impls, so the Triton kernels' end-to-end effect shows up as a pair of
rows. By default every step reuses one batch (compute only; --loader measures with the real
loader). Without a GPU the models are replaced by configs/smoke.yaml (a CPU-sized model) with
impl torch, and the GPU columns say n/a. Results: a table, JSON lines (kind "step") appended to
<out>/<gpu-slug>-<date>.jsonl, and --json PATH with the full reports.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from bench import results
from bench.registry import get

REPO = Path(__file__).resolve().parent.parent


IMPLS = ("triton", "torch")


def _parse_impl(impl: str) -> tuple[str, bool]:
    """'triton' | 'torch', each optionally '+compile' (model.compile=true: every ViT block
    through torch.compile, fewer launches for the host-bound small models)."""
    base, plus, suffix = impl.partition("+")
    if base not in IMPLS or (plus and suffix != "compile"):
        raise ValueError(f"--impls: {impl!r} is invalid: allowed are triton, torch, each "
                         "optionally with +compile")
    return base, bool(plus)


def _config(name: str, impl: str, on_gpu: bool, out: str | None = None):
    """The run config of one row; `out` its train.output_dir (default: a new temp folder)."""
    from fastdino.config import load_config

    base, compile_blocks = _parse_impl(impl)
    out = out or tempfile.mkdtemp(prefix=f"bench-step-{name}-")
    common = [f"train.output_dir={out}", "train.resume=none", "train.knn_every=0",
              f"kernels.impl={base}", f"model.compile={str(compile_blocks).lower()}"]
    if not on_gpu:
        return load_config(REPO / "configs" / "smoke.yaml", common)
    s = get(name)
    return load_config(REPO / "configs" / f"{name}.yaml",
                       common + [f"data.batch_size_per_gpu={s.batch_per_gpu}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vits16,vitb16", help="registry names (configs/<name>.yaml)")
    p.add_argument("--impls", default=None,
                   help="kernels.impl values to compare, each optionally +compile "
                        "(model.compile=true), e.g. triton,triton+compile,torch (default: "
                        "triton,torch on GPU, torch on CPU)")
    p.add_argument("--quick", action="store_true", help="5 timed steps after 2 warm-up (else 20/5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (overrides --quick)")
    p.add_argument("--loader", action="store_true", help="real data loader every step")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="JSONL folder")
    p.add_argument("--json", default=None, help="also write the full reports here")
    p.add_argument("--no-save", action="store_true", help="append no JSON lines")
    args = p.parse_args(argv)
    if not args.no_save and (problem := results.out_dir_problem(args.out)):
        # before any model is built, not at the append after the runs
        print(f"{p.prog}: error: {problem}", file=sys.stderr)
        return 2

    from fastdino.profile import format_report, profile

    on_gpu = torch.cuda.is_available()
    steps = args.steps or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    impls = (args.impls or ("triton,torch" if on_gpu else "torch")).split(",")
    for impl in impls:  # fail on a typo before any model is built
        try:
            _parse_impl(impl)
        except ValueError as e:
            p.error(str(e))
    models = args.models.split(",") if on_gpu else ["smoke"]
    if not on_gpu:
        print("# no GPU: running configs/smoke.yaml (CPU-sized) instead of "
              f"{args.models}; GPU columns are n/a", flush=True)
    env = results.environment()
    runs, failed = [], 0
    for name in models:
        for impl in impls:
            print(f"## step {name} kernels.impl={impl} ({steps} steps after {warmup} warm-up)",
                  flush=True)
            out = tempfile.mkdtemp(prefix=f"bench-step-{name}-")  # the row's run folder
            try:
                cfg = _config(name, impl, on_gpu, out)
                r = profile(cfg, steps, warmup, fixed_batch=not args.loader)
                r["model"], r["impl"] = name, impl
                print(format_report(r), flush=True)
            except Exception as e:
                traceback.print_exc()
                failed += 1
                r = {"model": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:300]}
            finally:  # scratch (its config.yaml): each row left one under the temp dir
                shutil.rmtree(out, ignore_errors=True)
            runs.append(r)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    print(format_summary(runs), flush=True)
    if not args.no_save:
        recs = [{"schema": results.SCHEMA_VERSION, "kind": "step", "time": results.now(), **env,
                 **r} for r in runs]
        path = results.results_path(args.out, env)
        results.append_jsonl(path, recs)
        print(f"# {len(recs)} JSON lines appended to {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": env, "runs": runs}, indent=1))
    return 1 if failed else 0


def format_summary(runs: list[dict]) -> str:
    head = f"{'model':<8} {'impl':<15} {'img/s/GPU':>10} {'step ms':>9} {'TFLOP/s':>9} {'MFU %':>6}"
    lines = ["", head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['model']:<8} {r['impl']:<15} error: {r['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}"
        lines.append(f"{r['model']:<8} {r['impl']:<15} {r['images_per_s_per_gpu']:>10.1f} "
                     f"{r['step_s'] * 1e3:>9.1f} {r['achieved_tflops']:>9.4g} {mfu:>6}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
