"""Result records: the environment tag, one JSON line per measurement / parity quantity appended to
`<out>/<gpu-slug>-<date>.jsonl`, and the stdout tables.

Schema (SCHEMA_VERSION 2; version 1 lines lack graph_ms), every line:
    schema, kind ("bench" | "check"), time (UTC ISO), gpu, device, commit, torch, triton, python,
    interpreter (bool), op, case, dtype, params
kind=bench adds: provider, mode, ms {median, p20, p80}, timer, graph_ms (CUDA-graph device time
    of one call when probed, else null; schema 2), metric {name, value, ceiling, ceiling_name,
    pct_roofline, formula} | null, peak_mem_mb, speedup_vs_torch,
    speedup_vs_torch_compile, roofline {copy_gbps, gemm_tflops, copy_bytes, gemm_mnk}, error
kind=check adds: provider, quantity, err_kernel, err_torch, rel_kernel, scale, bound, passed, note
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 2
BENCH_KEYS = ("schema", "kind", "time", "gpu", "device", "commit", "torch", "triton", "python",
              "interpreter", "op", "case", "dtype", "params", "provider", "mode", "ms", "timer",
              "graph_ms", "metric", "peak_mem_mb", "speedup_vs_torch",
              "speedup_vs_torch_compile", "roofline", "error")
CHECK_KEYS = ("schema", "kind", "time", "gpu", "device", "commit", "torch", "triton", "python",
              "interpreter", "op", "case", "dtype", "params", "provider", "quantity", "err_kernel",
              "err_torch", "rel_kernel", "scale", "bound", "passed", "note")


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def commit() -> str:
    """FASTDINO_COMMIT (set by whoever ships a tree without .git to a GPU machine), else git."""
    if os.environ.get("FASTDINO_COMMIT"):
        return os.environ["FASTDINO_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"gpu": gpu_name(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "commit": commit(), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}


def out_dir_problem(out_dir: str | Path) -> str | None:
    """Why `out_dir` cannot take the results (checked before any work: else a run fails at its
    first append), or None: it, or the nearest part of it that exists (the rest is made), must be
    a writable folder."""
    path = Path(out_dir)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == path else f": {probe} in it"
        return f"--out {out_dir}{where} is a file, not a folder"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"--out {out_dir}: {probe} is not writable"
    return None


def results_path(out_dir: str | Path, env: dict[str, Any]) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path(out_dir) / f"{slug(env['gpu'])}-{date}.jsonl"


def _clean(x: Any) -> Any:
    """JSON-safe: NaN / inf become null (strict JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            # default=str: a case's params may hold a dtype or a tuple-keyed value
            f.write(json.dumps(_clean(r), sort_keys=False, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (one JSON object per non-empty line)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def bench_record(env: dict[str, Any], m: Any, metric: dict | None,
                 speedups: dict[str, float | None],
                 roof: dict[str, Any]) -> dict[str, Any]:
    t = m.timing
    rec = {"schema": SCHEMA_VERSION, "kind": "bench", "time": now(), **env, "op": m.op,
           "case": m.case, "dtype": m.dtype, "params": m.params, "provider": m.provider,
           "mode": m.mode,
           "ms": None if t is None else {"median": t.median, "p20": t.p20, "p80": t.p80},
           "timer": None if t is None else t.timer,
           "graph_ms": None if t is None else t.graph_ms, "metric": metric,
           "peak_mem_mb": m.peak_mem_mb,
           "speedup_vs_torch": speedups.get("torch"),
           "speedup_vs_torch_compile": speedups.get("torch_compile"),
           "roofline": roof, "error": m.error}
    return {k: rec[k] for k in BENCH_KEYS}


def check_record(env: dict[str, Any], row: Any, params: dict[str, Any],
                 provider: str) -> dict[str, Any]:
    rec = {"schema": SCHEMA_VERSION, "kind": "check", "time": now(), **env, "op": row.op,
           "case": row.case, "dtype": row.dtype, "params": params, "provider": provider,
           "quantity": row.quantity, "err_kernel": row.err_kernel, "err_torch": row.err_torch,
           "rel_kernel": row.rel_kernel, "scale": row.scale, "bound": row.bound,
           "passed": row.passed, "note": row.note}
    return {k: rec[k] for k in CHECK_KEYS}


# ------------------------------------------------------------------------------------------------
# Tables.


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_bench_table(records: list[dict[str, Any]]) -> str:
    head = (f"{'op':<12} {'case':<24} {'dtype':<8} {'mode':<7} {'provider':<13} "
            f"{'median ms':>10} {'p20-p80 ms':>17} {'graph ms':>9} {'metric':>16} {'%roof':>6} "
            f"{'x torch':>8} "
            f"{'x compile':>9} {'peak MB':>9}")
    lines = [head, "-" * len(head)]
    formulas: dict[tuple[str, str], str] = {}
    for r in records:
        if r["error"]:
            lines.append(f"{r['op']:<12} {r['case']:<24} {r['dtype']:<8} {r['mode']:<7} "
                         f"{r['provider']:<13} error: {r['error']}")
            continue
        ms, met = r["ms"], r["metric"]
        metric = "n/a" if met is None else f"{met['value']:.4g} {met['name']}"
        pct = None if met is None else met["pct_roofline"]
        if met is not None and met["formula"]:
            formulas[(r["op"], r["case"])] = f"{met['name']}: {met['formula']}"
        lines.append(
            f"{r['op']:<12} {r['case']:<24} {r['dtype']:<8} {r['mode']:<7} {r['provider']:<13} "
            f"{ms['median']:>10.4f} {ms['p20']:>8.4f}-{ms['p80']:<8.4f} "
            f"{_fmt(r.get('graph_ms'), '.4f'):>9} {metric:>16} "
            f"{_fmt(pct, '.0f'):>6} {_fmt(r['speedup_vs_torch'], '.2f'):>8} "
            f"{_fmt(r['speedup_vs_torch_compile'], '.2f'):>9} {_fmt(r['peak_mem_mb'], '.1f'):>9}")
    if formulas:
        lines.append("")
        lines += [f"  {op}/{case}  {f}" for (op, case), f in formulas.items()]
    return "\n".join(lines)


def format_check_table(records: list[dict[str, Any]]) -> str:
    head = (f"{'op':<12} {'case':<24} {'provider':<18} {'dtype':<8} {'quantity':<20} "
            f"{'max|k-truth|':>13} {'max|torch-truth|':>16} {'rel':>9} {'bound':>10}  result")
    lines = [head, "-" * len(head)]
    for r in records:
        ok = "PASS" if r["passed"] else "FAIL"
        lines.append(
            f"{r['op']:<12} {r['case']:<24} {r.get('provider', 'triton'):<18} {r['dtype']:<8} "
            f"{r['quantity']:<20} "
            f"{_fmt(r['err_kernel'], '.3e'):>13} {_fmt(r['err_torch'], '.3e'):>16} "
            f"{_fmt(r['rel_kernel'], '.2e'):>9} {_fmt(r['bound'], '.3e'):>10}  {ok}"
            + (f" ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


def speedups(times: dict[str, float], provider: str) -> dict[str, float | None]:
    """Speed-up of `provider` against each baseline: t_baseline / t_provider."""
    mine = times.get(provider)
    return {b: (times[b] / mine if mine and b in times else None)
            for b in ("torch", "torch_compile")}
