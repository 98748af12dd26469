"""The benchmark harness's own logic (bench/): the parity judge, the roofline arithmetic, the JSON
result schema, the CLI, and `python -m bench` end to end on CPU (Triton interpreter), also from a
tree where fastdino is not pip-installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import results
from bench.harness import BenchCase, Measurement, Timing, quantiles_ms, run_case
from bench.parity import check_case, judge
from bench.roofline import Roofline, derived_metric, gbps, percent, tflops

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------
# Parity judge


def _truth_and_lowp(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, generator=g, dtype=torch.float64)
    lowp = truth.to(torch.bfloat16).double()  # PyTorch's bf16 error = the rounding of the truth
    return truth, lowp


def test_judge_low_precision_rule_2x():
    truth, lowp = _truth_and_lowp()
    err = lowp - truth
    assert err.abs().max() > 0
    three = truth + 3.0 * err  # a kernel 3x worse than PyTorch at the same precision
    one_half = truth + 1.5 * err
    assert not judge(three, lowp, truth, torch.bfloat16, 1e-5, 1e-8)[4]
    assert judge(one_half, lowp, truth, torch.bfloat16, 1e-5, 1e-8)[4]
    err_k, err_t, scale, bound, ok, _ = judge(one_half, lowp, truth, torch.bfloat16, 1e-5, 1e-8)
    assert err_k == pytest.approx(1.5 * err_t) and bound == pytest.approx(2 * err_t + 1e-8)


def test_judge_interpreter_truncation_allowance_only_for_fp16_results():
    truth, lowp = _truth_and_lowp()
    three = (truth + 3.0 * (lowp - truth))

    def bound(result):
        return judge(result, lowp, truth, torch.bfloat16, 1e-5, 1e-8, interpreter=True)[3]

    # an fp16-stored result under the interpreter may be one ulp off (its casts truncate)
    assert bound(three.to(torch.float16)) > bound(three)
    # bf16 stores round to nearest there too (kernels/_rounding.py): no allowance, nor for fp32
    assert bound(three.to(torch.bfloat16)) == bound(three)
    assert not judge(three, lowp, truth, torch.bfloat16, 1e-5, 1e-8, interpreter=True)[4]


def test_judge_fp32_rtol():
    truth, _ = _truth_and_lowp()
    scale = truth.abs().max().item()
    good = truth + 0.5e-5 * scale
    bad = truth + 3e-5 * scale
    same = truth.clone()  # fp32 truth: PyTorch's error is 0, the bar is rtol * max|truth|
    assert judge(good, same, truth, torch.float32, 1e-5, 0.0)[4]
    assert not judge(bad, same, truth, torch.float32, 1e-5, 0.0)[4]


def test_judge_rejects_nan_and_shape_mismatch():
    truth, lowp = _truth_and_lowp()
    bad = truth.clone()
    bad[7] = float("nan")
    assert not judge(bad, lowp, truth, torch.bfloat16, 1e-5, 1.0)[4]
    assert not judge(truth[:-1], lowp, truth, torch.bfloat16, 1e-5, 1.0)[4]
    assert not judge(None, lowp, truth, torch.bfloat16, 1e-5, 1.0)[4]


def _fake_case(kernel_error: float, dtype=torch.bfloat16) -> BenchCase:
    """y = sum(softmax(x) * w): torch in the working precision; the "kernel" computes the truth in
    fp64 and adds `kernel_error` x PyTorch's own error, in the forward and in dx."""

    def ref(x, w):
        return (torch.softmax(x, -1) * w).sum()

    class Fake(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            t = ref(x.double(), w.double())
            lp = ref(x, w).double()
            return (t + kernel_error * (lp - t)).to(torch.float64)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            xs = [x.double().detach().requires_grad_(), x.detach().clone().requires_grad_()]
            with torch.enable_grad():  # backward runs with grad mode off
                gt, gl = (torch.autograd.grad(ref(xi, w.to(xi.dtype)), xi)[0].double()
                          for xi in xs)
            return (g * (gt + kernel_error * (gl - gt))).to(torch.float64), None

    def make_inputs(device, dt):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, 333, generator=gen).to(device=device, dtype=dt).requires_grad_()
        w = torch.randn(8, 333, generator=gen).to(device=device, dtype=dt)
        return {"x": x, "w": w}

    return BenchCase(op="fake", name="fake", params={}, dtype=dtype, make_inputs=make_inputs,
                     providers={"torch": ref, "triton": Fake.apply}, reference_dtype=torch.float64,
                     atol=0.0)


def test_check_case_forward_and_gradients(monkeypatch):
    # the fake is not a Triton kernel: no interpreter truncation allowance (tests/kernels'
    # conftest turns the interpreter on for the whole session on CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok = check_case(_fake_case(1.5), torch.device("cpu"))
    assert [r.quantity for r in ok] == ["forward", "grad:x"]
    assert all(r.passed for r in ok), ok
    bad = check_case(_fake_case(3.0), torch.device("cpu"))
    assert not any(r.passed for r in bad), bad


def test_check_records_judges_every_named_provider(monkeypatch):
    """`extra["check_providers"]` makes --check judge each named provider (e.g. every attention
    backend), one record per provider and quantity, a wrong one failing on its own."""
    from bench.runner import check_records

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = _fake_case(1.5)
    case.providers["wrong"] = _fake_case(3.0).providers["triton"]
    case.extra["check_providers"] = ["triton", "wrong"]
    recs = check_records([case], results.environment(), torch.device("cpu"))
    verdict = {(r["provider"], r["quantity"]): r["passed"] for r in recs}
    assert verdict == {("triton", "forward"): True, ("triton", "grad:x"): True,
                       ("wrong", "forward"): False, ("wrong", "grad:x"): False}
    assert "wrong" in results.format_check_table(recs)


# ------------------------------------------------------------------------------------------------
# Roofline arithmetic and timing statistics


def test_roofline_arithmetic():
    assert gbps(3_000_000_000, 1.0) == pytest.approx(3000.0)  # 3 GB in 1 ms = 3 TB/s
    assert tflops(2 * 8192**3, 1.4) == pytest.approx(2 * 8192**3 / 1.4e-3 / 1e12)
    assert percent(1500.0, 3000.0) == pytest.approx(50.0)
    assert percent(1.0, None) is None
    case = BenchCase(op="o", name="c", params={}, dtype=torch.float32, make_inputs=None,
                     providers={}, bytes_fwd=2_000_000, bytes_bwd=3_000_000, formula="2N / 3N")
    roof = Roofline(copy_gbps=4000.0, gemm_tflops=800.0)
    m = derived_metric(case, "fwd+bwd", 0.01, roof)  # 5 MB in 10 us = 500 GB/s
    assert m["name"] == "GB/s" and m["value"] == pytest.approx(500.0)
    assert m["pct_roofline"] == pytest.approx(12.5) and m["formula"] == "2N / 3N"
    case.flops_fwd, case.flops_bwd = 10**9, 2 * 10**9  # FLOPs given: TFLOP/s wins
    m = derived_metric(case, "bwd", 0.01, roof)
    assert m["name"] == "TFLOP/s" and m["value"] == pytest.approx(200.0)
    assert m["pct_roofline"] == pytest.approx(25.0)
    case.flops_fwd = case.flops_bwd = case.bytes_bwd = None
    assert derived_metric(case, "bwd", 0.01, roof) is None
    assert derived_metric(case, "fwd", 0.01, Roofline(None, None))["pct_roofline"] is None


def test_quantiles_and_speedups():
    assert quantiles_ms([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))
    sp = results.speedups({"torch": 2.0, "torch_compile": 1.0, "triton": 0.5}, "triton")
    assert sp == {"torch": pytest.approx(4.0), "torch_compile": pytest.approx(2.0)}
    assert results.speedups({"triton": 0.5}, "triton") == {"torch": None, "torch_compile": None}


# ------------------------------------------------------------------------------------------------
# Result schema


def test_result_schema_roundtrip(tmp_path):
    env = results.environment()
    assert set(env) == {"gpu", "device", "commit", "torch", "triton", "python", "interpreter"}
    m = Measurement("op", "case", "triton", "fwd", "bfloat16", {"R": 3},
                    Timing(1.0, 0.9, 1.2, "perf_counter"), None, None)
    metric = {"name": "GB/s", "value": float("nan"), "ceiling": None, "ceiling_name": "x",
              "pct_roofline": None, "formula": "f"}
    rec = results.bench_record(env, m, metric, {"torch": 2.0}, Roofline(None, None).to_dict())
    assert tuple(rec) == results.BENCH_KEYS
    path = results.results_path(tmp_path, {"gpu": "NVIDIA H100 80GB HBM3"})
    assert path.name.startswith("nvidia-h100-80gb-hbm3-") and path.suffix == ".jsonl"
    results.append_jsonl(path, [rec, rec])
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    back = json.loads(lines[0])  # strict JSON: the NaN became null
    assert back["metric"]["value"] is None and back["ms"] == {"median": 1.0, "p20": 0.9, "p80": 1.2}
    assert back["schema"] == results.SCHEMA_VERSION and back["kind"] == "bench"
    assert back["graph_ms"] is None  # a CPU timing has no CUDA-graph probe


def test_table_shows_the_graph_device_time_next_to_the_event_time():
    env = results.environment()
    m = Measurement("op", "case", "triton", "fwd", "bfloat16", {},
                    Timing(1.7, 1.6, 1.8, "do_bench", graph_ms=0.31), None, None)
    rec = results.bench_record(env, m, None, {}, Roofline(None, None).to_dict())
    assert rec["graph_ms"] == 0.31
    head, _, row = results.format_bench_table([rec]).splitlines()
    col = head.index("graph ms")
    assert row[col - 1:col + len("graph ms")].strip() == "0.3100", (head, row)


def test_run_case_times_every_provider_and_mode_on_cpu():
    case = _fake_case(1.0, dtype=torch.float32)
    rows = run_case(case, torch.device("cpu"), ("fwd", "fwd+bwd"), ["torch", "triton"], quick=True)
    assert [(r.provider, r.mode) for r in rows] == [
        ("torch", "fwd"), ("triton", "fwd"), ("torch", "fwd+bwd"), ("triton", "fwd+bwd")]
    assert all(r.error is None and r.timing.median > 0 and r.timing.timer == "perf_counter"
               for r in rows), rows
    assert all(r.timing.p20 <= r.timing.median <= r.timing.p80 for r in rows)


# ------------------------------------------------------------------------------------------------
# CLI, end to end (subprocesses: the interpreter must be on before kernels are imported)


def _bench(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_profile_prints_host_times_and_top_ops_on_cpu():
    # the GPU numbers (device µs, launches) need CUDA; on CPU the host side and the top-level ops
    proc = _bench("profile", "selftest", "--quick", "--calls", "2", "--modes", "fwd", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("selftest "))
    assert "triton fwd: host" in line and "device n/a (no CUDA)" in line, line
    assert "top-level host ops/call" in line
    assert " µs host " in proc.stdout  # the top host ops are listed
    bad = _bench("profile", "no_such_op")
    assert bad.returncode == 2 and "unknown op 'no_such_op'" in bad.stderr


def test_profile_drops_grads_between_calls():
    # each profiled backward must see .grad = None, as the timed benchmark does: else every call
    # after the first adds an accumulation kernel that training never runs
    from bench.harness import mode_fn
    from bench.profile_op import fresh_grads

    x = torch.randn(5, requires_grad=True)
    seen = []

    def fn(x):
        seen.append(x.grad)
        return (x * x).sum()

    call = fresh_grads(mode_fn(fn, {"x": x}, "fwd+bwd", None), [x])
    call()
    call()
    assert seen == [None, None]
    torch.testing.assert_close(x.grad, 2 * x.detach())  # one backward's gradient, not two


def test_cli_unknown_op_lists_available():
    proc = _bench("no_such_op")
    assert proc.returncode == 2
    assert "unknown op(s) 'no_such_op'" in proc.stderr and "selftest" in proc.stderr, proc.stderr
    # a comma list runs several ops; one unknown name in it is named and nothing runs
    proc = _bench("selftest,nope", "--quick")
    assert proc.returncode == 2 and "'nope'" in proc.stderr and "'selftest'" not in proc.stderr


def test_cli_all_quick_end_to_end_on_cpu(tmp_path):
    """`python -m bench all --quick` on CPU, restricted to the harness self-test case (other ops'
    cases run in their own tests): a table on stdout and schema-complete JSON lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("all", "--quick", "--cases", "selftest-cpu", "--providers", "torch,triton",
                  "--modes", "fwd,fwd+bwd", "--out", str(tmp_path), env=env)
    assert "selftest" in proc.stdout and "median ms" in proc.stdout, proc.stdout + proc.stderr
    files = list(tmp_path.glob("cpu-*.jsonl"))
    assert len(files) == 1, proc.stdout + proc.stderr
    recs = [json.loads(line) for line in files[0].read_text().splitlines()]
    mine = [r for r in recs if r["op"] == "selftest"]
    assert {(r["provider"], r["mode"]) for r in mine} == {
        ("torch", "fwd"), ("triton", "fwd"), ("torch", "fwd+bwd"), ("triton", "fwd+bwd")}
    for r in mine:
        assert tuple(r) == results.BENCH_KEYS and r["error"] is None, r
        assert r["interpreter"] is True and r["gpu"] == "cpu"
        assert r["metric"]["name"] == "GB/s" and r["metric"]["value"] > 0
        assert math.isfinite(r["ms"]["median"])


_NO_INSTALL = """
import runpy, sys
# drop the editable install's finders: fastdino.kernels must come from bench/_paths.py's shim
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
try:
    import fastdino.kernels
    sys.exit("fastdino.kernels imported without the shim: the isolation did not work")
except ImportError:
    pass
for k in [k for k in sys.modules if k.startswith("fastdino")]:
    del sys.modules[k]
sys.argv = ["bench", "selftest", "--check", "--no-save"]
runpy.run_path("MAIN", run_name="__main__")
"""


def test_cli_check_runs_without_pip_install(tmp_path):
    """The GPU machine gets a bare copy of the tree: with the editable install's finders removed
    and the cwd outside the repo, bench/__main__.py still imports fastdino.kernels (shim) and
    `--check` passes on the self-test case."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    script = _NO_INSTALL.replace("MAIN", str(REPO / "bench" / "__main__.py"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout


def test_op_budget_fair_shares_roll_unused_time_forward():
    from bench.runner import OpBudget

    t = [100.0]
    b = OpBudget(90.0, 3, clock=lambda: t[0])
    assert b.start_op() == pytest.approx(130.0)  # 90 s left, 3 ops: 30 s
    t[0] = 110.0  # the first op used 10 s of its 30
    assert b.start_op() == pytest.approx(150.0)  # 80 s left, 2 ops: 40 s
    t[0] = 185.0  # the second overran (a case is never cut): 5 s left for the last
    assert b.start_op() == pytest.approx(190.0)
    t[0] = 200.0  # past the end: deadline is now (no case starts)
    assert b.start_op() == pytest.approx(200.0)
    assert OpBudget(None, 3).start_op() == math.inf


def test_cli_time_budget_skips_and_counts_cases(tmp_path):
    """A budget too small for any case: every case of every op is skipped and counted, nothing is
    timed, and a non-positive budget is a usage error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("selftest", "--quick", "--time-budget", "1e-9", "--no-save", env=env)
    assert "skipped: over this op's share of --time-budget" in proc.stdout, proc.stdout
    assert "median ms" not in proc.stdout, proc.stdout
    bad = _bench("selftest", "--time-budget", "0", env=env)
    assert bad.returncode == 2 and "--time-budget must be > 0" in bad.stderr


def test_cli_cases_and_providers_that_match_nothing_are_errors():
    """A typo in --cases or --providers selects nothing: before, the run printed an empty table
    (or `# check: 0 passed, 0 failed`) and exited 0. Now it is exit 2 before any work, naming the
    texts that match nothing and listing what exists; names that do match are not named."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("selftest", "--check", "--cases", "selftest-cpu,zzz", "--no-save", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--cases 'zzz' matches no case" in proc.stderr, proc.stderr
    assert "selftest-cpu-odd" in proc.stderr and "'selftest-cpu'" not in proc.stderr
    assert "PASS" not in proc.stdout and "# check:" not in proc.stdout, proc.stdout
    proc = _bench("selftest", "--quick", "--providers", "tritn,torch", "--no-save", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--providers 'tritn' matches no provider" in proc.stderr, proc.stderr
    assert "torch, triton, torch_compile" in proc.stderr and "median ms" not in proc.stdout


def test_selection_problems_know_left_out_providers_and_every_op():
    """A --cases text may match another op of the run (device_check passes one list to every
    op); a provider the machine leaves out (`params["unsupported"]`) is known, not a typo."""
    from bench.runner import selection_problems

    def case(name, providers, unsupported=None):
        return BenchCase(op="x", name=name, params={"unsupported": unsupported or {}},
                         dtype=torch.float32, make_inputs=lambda d, t: {},
                         providers=dict.fromkeys(providers))

    loaded = [("a", [case("a-big", ["torch", "triton"], {"flash_attn": "not importable"})],
               None),
              ("b", [case("b-small", ["torch", "triton", "peer"])], None)]
    assert selection_problems(loaded, "a-big,b-", "flash_attn,peer", True, False) == []
    assert selection_problems(loaded, "a-", "torch_compile", True, False) == []
    msgs = selection_problems(loaded, "a-,nope", "peer,trtion", False, True)
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("--cases 'nope' matches no case") and "b: b-small" in msgs[0]
    assert "full cases, GPU sizes" in msgs[0]
    # only a-big is selected: `peer` (b's) and the typo both time nothing
    assert msgs[1].startswith("--providers 'peer', 'trtion' match no provider of the 1 selected")
    assert selection_problems([("a", None, "ImportError")], "x", None, True, False)


def test_selection_problems_modes_that_time_nothing():
    """--modes naming only modes no selected case runs (bwd on ops without a gradient) timed
    nothing and exited 0; it is an error now. A case without the mode among others that have it
    is not (a run over every op with --modes bwd)."""
    from bench.runner import selection_problems

    def case(name, modes):
        return BenchCase(op="x", name=name, params={}, dtype=torch.float32,
                         make_inputs=lambda d, t: {}, providers={"torch": None}, modes=modes)

    fwd_only = [("p", [case("p-img", ("fwd",))], None)]
    both = fwd_only + [("k", [case("k-64", ("fwd", "bwd", "fwd+bwd"))], None)]
    msgs = selection_problems(fwd_only, None, None, True, False, "bwd,fwd+bwd")
    assert len(msgs) == 1 and msgs[0].startswith("--modes bwd,fwd+bwd matches no mode of the 1")
    assert msgs[0].endswith("their modes are fwd"), msgs
    assert selection_problems(fwd_only, None, None, True, False, "fwd,bwd") == []
    assert selection_problems(both, None, None, True, False, "bwd") == []
    assert selection_problems(both, "p-", None, True, False, "bwd")  # only p-img selected
    assert selection_problems(fwd_only, None, None, True, False, None) == []  # --check


def test_cli_check_that_checks_nothing_fails(tmp_path):
    """--check with no quantity judged (every case skipped by --time-budget) is a failure, not
    `0 passed, 0 failed` and exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("selftest", "--check", "--quick", "--time-budget", "1e-9", "--no-save", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "# check: FAILED: no quantity was checked (1 case(s) skipped by --time-budget)" \
        in proc.stdout, proc.stdout


def test_out_dir_problem(tmp_path):
    f = tmp_path / "f.jsonl"
    f.write_text("")
    assert results.out_dir_problem(tmp_path) is None
    assert results.out_dir_problem(tmp_path / "new" / "deeper") is None  # made at the append
    assert results.out_dir_problem(f) == f"--out {f} is a file, not a folder"
    assert results.out_dir_problem(f / "sub") == (f"--out {f / 'sub'}: {f} in it is a file, "
                                                  "not a folder")


def test_cli_bad_out_and_data_root_are_one_line_errors_before_any_work(tmp_path):
    """--out naming a file: the sweep ran its first case, then raised FileExistsError at the
    append (bench step: after every model). bench data --root naming nothing: a
    FileNotFoundError traceback. Now one line, exit 2, before any work."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    f = tmp_path / "results.jsonl"
    f.write_text("")
    for args in (("selftest", "--check", "--quick"), ("step", "--quick"), ("data", "--quick")):
        proc = _bench(*args, "--out", str(f), env=env)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        assert proc.stderr.strip().splitlines() == [
            f"{'error' if args[0] == 'selftest' else f'python -m bench {args[0]}: error'}: "
            f"--out {f} is a file, not a folder"], (args, proc.stderr)
        assert "# bench on" not in proc.stdout and "## step" not in proc.stdout, proc.stdout
    proc = _bench("data", "--quick", "--root", str(tmp_path / "nope"), "--out", str(tmp_path),
                  env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"python -m bench data: error: --root "
                                   f"{str(tmp_path / 'nope')!r} does not exist"), proc.stderr
    assert not list(tmp_path.glob("*-*.jsonl"))


def test_compile_report_summary_counts_specs_not_built_for_an_arch():
    """`compile-report --only rope --arch 90` printed `27 spec(s) x 1 arch(s): 18 ok, 0 with
    problems`: the 9 specs limited to sm_80 went uncounted. Every spec x arch pair is ok, has
    problems or is not built, and the line says which."""
    from types import SimpleNamespace

    from bench.compile_report import summary

    def row(arch, shared=0):
        return {"arch": arch, "error": None, "stack": 0, "local": 0, "shared": shared,
                "shared_limit": 1000}

    specs = [("m", SimpleNamespace(name=f"s{i}", archs=archs))
             for i, archs in enumerate([(90, 80), (90,), (80,), (80,)])]
    line = summary(specs, [90], [row(90), row(90, shared=2000)], 0)
    assert line.startswith("# 4 spec(s) x 1 arch(s) = 4: 1 ok, 1 with problems, 2 not built "
                           "for an arch their spec leaves out (2 for sm_90),"), line
    line = summary(specs, [90, 80], [row(90), row(80), row(90), row(80), row(80)], 1)
    assert "= 8: 5 ok, 0 with problems, 3 not built for an arch their spec leaves out (2 for " \
           "sm_90, 1 for sm_80), 1 module(s) failed to import" in line, line
    one = summary(specs[:1], [90], [row(90)], 0)
    assert "1 ok, 0 with problems, 0 not built for an arch their spec leaves out, " in one, one


def test_cli_profile_providers_and_compile_report_only_that_match_nothing_are_errors():
    """As --cases / --providers of the sweeps: `profile --providers tritn` profiled nothing and
    `compile-report --only zzz` compiled nothing, both exit 0. Now exit 2 naming what exists."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _bench("profile", "selftest", "--quick", "--providers", "tritn", "--calls", "1",
                  env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--providers 'tritn': no selected case of selftest has it" in proc.stderr
    assert "torch, triton" in proc.stderr, proc.stderr
    proc = _bench("compile-report", "--only", "no-such-spec", "--no-kernels", "--module",
                  "bench.bench_selftest", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--only 'no-such-spec' is in no spec name; the specs are of " in proc.stderr
