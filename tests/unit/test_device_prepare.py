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
