"""`python -m fastdino` runs the `fastdino` command (there was no fastdino/__main__.py: 'No module
named fastdino.__main__', so a venv without its console script on PATH had no CLI)."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastdino", *args], capture_output=True,
                          text=True, timeout=120)


def test_python_m_fastdino_is_the_cli():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fastdino"), proc.stdout
    proc = _run("health", "/nonexistent-run")  # a subcommand runs, with its exit code
    assert proc.returncode == 2 and "metrics.jsonl does not exist" in proc.stderr, proc.stderr
