"""The sweep behind `python -m bench <op|all> [--check]`: load cases, time or check them, print the
tables, append the JSON lines."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from bench import results
from bench.harness import case_selected, load_cases, run_case
from bench.parity import check_case
from bench.roofline import Roofline, derived_metric, measure


def _load(ops: list[str], args: argparse.Namespace, on_gpu: bool
          ) -> list[tuple[str, list | None, str | None]]:
    """(op, all its cases or None, error) per op: an op whose module fails to import is
    reported, not fatal."""
    out = []
    for op in ops:
        try:
            out.append((op, load_cases(op, quick=args.quick, on_gpu=on_gpu), None))
        except Exception as e:
            traceback.print_exc()
            out.append((op, None, f"{type(e).__name__}: {e}"))
    return out


def _names(spec: str | None) -> list[str]:
    return [s for s in (spec or "").split(",") if s]


def provider_names(case) -> list[str]:
    """Every provider name a case knows: its own, `torch_compile` (the harness adds it) and the
    ones left out on this machine (`params["unsupported"]`: a known backend, not a typo)."""
    names = [*case.providers, "torch_compile",
             *((case.params or {}).get("unsupported") or {})]
    return list(dict.fromkeys(names))


def selection_problems(loaded, cases_spec: str | None, providers_spec: str | None,
                       quick: bool, on_gpu: bool, modes_spec: str | None = None) -> list[str]:
    """--cases texts that no case of the run's ops contains, --providers names that no selected
    case has, and --modes (timing runs) that no selected case runs: one message each, naming
    them and listing what exists (a typo would otherwise select nothing and read as a pass)."""
    msgs = []
    where = (f"{'--quick' if quick else 'full'} cases, "
             f"{'GPU' if on_gpu else 'CPU interpreter'} sizes")
    ok = [(op, cases) for op, cases, _ in loaded if cases is not None]
    names = [c.name for _, cases in ok for c in cases]
    missing = [t for t in _names(cases_spec) if not any(t in n for n in names)]
    if missing:
        listing = "; ".join(f"{op}: {', '.join(c.name for c in cases) or '(none)'}"
                            for op, cases in ok)
        msgs.append(f"--cases {', '.join(map(repr, missing))} "
                    f"{'matches' if len(missing) == 1 else 'match'} no case of this run "
                    f"({where}); the cases are {listing or '(none)'}")
    selected = [c for _, cases in ok for c in cases if case_selected(c.name, cases_spec)]
    known = list(dict.fromkeys(n for c in selected for n in provider_names(c)))
    missing = [p for p in _names(providers_spec) if p not in known]
    if missing:
        msgs.append(f"--providers {', '.join(map(repr, missing))} "
                    f"{'matches' if len(missing) == 1 else 'match'} no provider of the "
                    f"{len(selected)} selected case(s) ({where}); their providers are "
                    f"{', '.join(known) or '(none)'}")
    # --modes that no selected case runs (e.g. bwd on ops without a gradient) time nothing: an
    # error; a case that runs none of them while others do is reported as it comes (bench_records)
    asked = set(_names(modes_spec))
    if asked and selected and not any(asked & set(c.modes) for c in selected):
        have = sorted({m for c in selected for m in c.modes})
        msgs.append(f"--modes {modes_spec} matches no mode of the {len(selected)} selected "
                    f"case(s) ({where}); their modes are {', '.join(have)}")
    return msgs


def bench_records(cases, args, device, env, roof: Roofline) -> list[dict]:
    providers = args.providers.split(",") if args.providers else None
    records = []
    for case in cases:
        rows = run_case(case, device, tuple(args.modes.split(",")), providers, args.quick)
        if not rows:
            print(f"# {case.name}: not timed, it runs none of --modes {args.modes} "
                  f"(only {', '.join(case.modes)})", flush=True)
            continue
        by_mode: dict[str, dict[str, float]] = {}
        for m in rows:
            if m.timing is not None:
                by_mode.setdefault(m.mode, {})[m.provider] = m.timing.median
        for m in rows:
            metric = None if m.timing is None else derived_metric(case, m.mode, m.timing.median,
                                                                  roof)
            sp = results.speedups(by_mode.get(m.mode, {}), m.provider)
            records.append(results.bench_record(env, m, metric, sp, roof.to_dict()))
        print(results.format_bench_table(records[-len(rows):]), flush=True)
        print(flush=True)
    return records


def check_records(cases, env, device) -> list[dict]:
    """Parity rows of every case: the provider `triton` against the reference, or each provider a
    case names in `extra["check_providers"]` (e.g. every attention backend)."""
    records = []
    for case in cases:
        for provider in (case.extra or {}).get("check_providers", ["triton"]):
            try:
                rows = check_case(case, device, provider=provider)
            except Exception as e:
                traceback.print_exc()
                rows = None
                err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            if rows is None:
                rec = {"schema": results.SCHEMA_VERSION, "kind": "check", "time": results.now(),
                       **env, "op": case.op, "case": case.name,
                       "dtype": str(case.dtype).replace("torch.", ""), "params": case.params,
                       "provider": provider, "quantity": "run", "err_kernel": None,
                       "err_torch": None, "rel_kernel": None, "scale": None, "bound": None,
                       "passed": False, "note": err}
                records.append(rec)
            else:
                records += [results.check_record(env, r, case.params, provider) for r in rows]
            n = 1 if rows is None else len(rows)
            print(results.format_check_table(records[-n:]), flush=True)
    return records


class OpBudget:
    """Fair shares of a wall-clock budget over ops run in order: an op starting with T seconds
    left and n ops to go (itself included) may start cases until T/n from now. A case already
    running is never cut (the caller's `timeout` is the hard stop)."""

    def __init__(self, seconds: float | None, n_ops: int, clock=time.monotonic):
        self.clock, self.n_left = clock, n_ops
        self.end = None if seconds is None else clock() + seconds

    def start_op(self) -> float:
        """Deadline (clock time) for starting this op's cases; +inf without a budget."""
        if self.end is None:
            return float("inf")
        now, n = self.clock(), max(1, self.n_left)
        self.n_left -= 1
        return now + max(0.0, self.end - now) / n


def run(ops: list[str], args: argparse.Namespace, on_gpu: bool) -> int:
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        # one intra-op thread: on a shared CPU an OpenMP barrier waiting for a descheduled worker
        # turns a 50 µs op into a 10-25 ms outlier; single-threaded numbers are reproducible
        torch.set_num_threads(1)
    # the budget counts from here: loading every op's cases first (to check --cases and
    # --providers before any work) and the roofline are inside it, as the stage's timeout is
    budget = OpBudget(getattr(args, "time_budget", None), len(ops))
    loaded = _load(ops, args, on_gpu)
    problems = selection_problems(loaded, args.cases, args.providers, args.quick, on_gpu,
                                  None if args.check else args.modes)
    if problems and not any(cases is None for _, cases, _ in loaded):
        for msg in problems:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    for msg in problems:  # the names may belong to an op that failed to load
        print(f"# warning: {msg} (or of the op(s) that failed to load)", flush=True)
    env = results.environment()
    print(f"# bench on {env['gpu']} | torch {env['torch']} | triton {env['triton']} | "
          f"commit {env['commit']} | interpreter={env['interpreter']}", flush=True)
    roof = Roofline(None, None)
    if on_gpu and not args.check:
        roof = measure(quick=args.quick)
        print(f"# roofline: D2D copy {roof.copy_gbps:.0f} GB/s (2 x {roof.copy_bytes / 2**30:.0f} "
              f"GiB / t), bf16 GEMM {roof.gemm_tflops:.0f} TFLOP/s ({roof.gemm_mnk}^3)", flush=True)
    all_records, failed_ops, over_budget = [], [], 0
    path = results.results_path(args.out, env)
    for op, cases, err in loaded:
        deadline = budget.start_op()
        if cases is None:
            print(f"# {op}: skipped, module failed to load: {err}", flush=True)
            failed_ops.append(op)
            continue
        if args.cases:
            cases = [c for c in cases if case_selected(c.name, args.cases)]
        if not cases:
            print(f"# {op}: no cases", flush=True)
            continue
        print(f"## {op}: {len(cases)} case(s)", flush=True)
        for i, case in enumerate(cases):  # one at a time, saved as it ends (a timeout keeps them)
            if budget.clock() > deadline:
                left = len(cases) - i
                over_budget += left
                print(f"# {op}: {left} case(s) skipped: over this op's share of --time-budget",
                      flush=True)
                break
            if args.check:
                recs = check_records([case], env, device)
            else:
                recs = bench_records([case], args, device, env, roof)
            if not args.no_save:
                results.append_jsonl(path, recs)
            all_records += recs
    if not args.no_save and all_records:
        print(f"# {len(all_records)} JSON lines appended to {path}", flush=True)
    if over_budget:
        print(f"# {over_budget} case(s) skipped by --time-budget", flush=True)
    if args.check:
        bad = [r for r in all_records if not r["passed"]]
        print(f"# check: {len(all_records) - len(bad)} passed, {len(bad)} failed"
              + (f", {len(failed_ops)} op(s) failed to load" if failed_ops else ""), flush=True)
        if not all_records:  # nothing judged is no pass
            why = (f"{over_budget} case(s) skipped by --time-budget" if over_budget
                   else "no case selected")
            print(f"# check: FAILED: no quantity was checked ({why})", flush=True)
            return 1
        return 1 if bad or failed_ops else 0
    errors = [r for r in all_records if r["error"]]
    if errors or failed_ops:
        print(f"# {len(errors)} measurement(s) raised, {len(failed_ops)} op(s) failed to load",
              file=sys.stderr)
        return 1
    return 0
