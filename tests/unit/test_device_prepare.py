"""scripts/device_prepare.sh: the device call it prints must run as printed (bench/README.md's
prepared run)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "device_prepare.sh"


def _default_check_args() -> list[str]:
    m = re.search(r"^CHECK_ARGS='([^']*)'$", SCRIPT.read_text(), re.M)
    assert m, "CHECK_ARGS='...' not found in scripts/device_prepare.sh"
    return shlex.split(m.group(1))


_SELECT = """
import json, sys
from bench._paths import ensure_importable
ensure_importable()
from bench.harness import load_cases
from bench.runner import selection_problems
ops, cases, providers, quick = json.loads(sys.argv[1])
loaded = [(op, load_cases(op, quick=quick, on_gpu=True), None) for op in ops]
print(json.dumps(selection_problems(loaded, cases, providers, quick, True)))
"""


def test_prepared_run_names_only_cases_and_providers_that_exist():
    """`python -m bench` refuses --cases texts and --providers names that select nothing (exit 2
    before any work): the prepared run's bench stage would time nothing. Its lists, against the
    GPU cases of its --ops (built here without a GPU; nothing runs)."""
    args = _default_check_args()
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    ops = opt["--ops"].split(",")
    quick = "--full" not in args
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _SELECT,
         json.dumps([ops, opt.get("--cases"), opt.get("--providers"), quick])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def _prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_no_dali_says_when_the_command_is_over_the_device_limit():
    """The device tool takes 2,000 characters a command; the --no-dali branch printed a longer
    one without a word (it exited before the length check). --print-only: nothing is made."""
    long_args = "--budget 420 --cases " + ",".join(f"case-{i:04d}" for i in range(250))
    proc = _prepare("--no-dali", "--print-only", "--check-args", long_args)
    assert proc.returncode == 0, proc.stderr
    cmd = next(x.strip() for x in proc.stdout.splitlines() if "device_check.sh" in x)
    assert len(cmd) > 2000
    assert f"that command is {len(cmd)} characters: over the 2,000" in proc.stderr, proc.stderr
    short = _prepare("--no-dali", "--print-only", "--check-args", "--budget 420")
    assert short.returncode == 0, short.stderr
    assert "bench/device_check.sh --out $OUT --budget 420" in short.stdout
    assert "characters" not in short.stderr, short.stderr
