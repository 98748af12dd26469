"""bench/floors.py: the latency probes compute what they claim (under the Triton interpreter on
the CPU; the timings themselves need a GPU: bench/device_check.sh's profile stage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import floors

REPO = Path(__file__).resolve().parents[2]
# the probes run where Triton runs: the GPU when there is one, else the CPU interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_pointer_chain_is_one_cycle_through_every_line():
    lines = 64
    nxt, start = floors.pointer_chain(lines, "cpu", seed=3)
    assert nxt.shape == (lines * floors.LINE_INT32,)
    seen, j = [], start
    for _ in range(lines):
        seen.append(j)
        j = int(nxt[j])
    assert j == start  # back at the start after exactly `lines` hops
    assert sorted(seen) == [i * floors.LINE_INT32 for i in range(lines)]  # every line once
    assert seen != sorted(seen)  # not a sequential walk (the prefetchers would hide it)


@pytest.mark.parametrize("steps", [0, 1, 7, 40])
def test_chase_kernel_follows_the_chain(steps):
    nxt, start = floors.pointer_chain(32, DEV, seed=1)
    out = floors.chase(nxt, start, steps)
    assert int(out[0]) == floors.walk(nxt.cpu(), start, steps)


@pytest.mark.parametrize("programs", [1, 5, 64])
def test_ticket_kernel_sums_every_program_and_resets_the_counter(programs):
    count = torch.zeros(1, dtype=torch.int32, device=DEV)
    vals = torch.zeros(programs, device=DEV)
    for _ in range(2):  # a second launch relies on the reset
        out = floors.ticket_sum(count, vals, programs)
        assert float(out[0]) == programs * (programs - 1) / 2
        assert int(count[0]) == 0


def test_empty_kernels_launch_and_write_nothing():
    x = torch.full((256,), 7.0, device=DEV)
    floors._empty_kernel[(3,)](x, 3)
    ptrs = [torch.full((256,), 7.0, device=DEV) for _ in range(6)]
    floors._empty_args_kernel[(2,)](*ptrs, 2, 64, 64, 64, 16, 4, 0.5, 1.0, BLOCK=128)
    assert bool((x == 7.0).all()) and all(bool((p == 7.0).all()) for p in ptrs)


def test_per_step_fit():
    slope, intercept = floors.per_step((16, 256), (3.0, 123.0))
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="two different step counts"):
        floors.per_step((8, 8), (1.0, 2.0))


def test_format_floors_names_every_measurement():
    f = floors.Floors(host_us={"triton 1 arg": 12.5}, graph_node_us={"triton empty": 1.75},
                      round_trip_ns={"l2": 480.0, "hbm": 810.0},
                      chain_intercept_us={"l2": 2.0, "hbm": 2.5}, ticket_us=1.25)
    text = floors.format_floors(f)
    for needle in ("triton 1 arg", "12.50", "triton empty", "1.75", "480.0", "810.0", "1.25"):
        assert needle in text, text


def test_measure_runs_every_probe_with_given_timers():
    # the GPU timers replaced by ones that run each probe (so a probe that cannot launch fails
    # here) and report how many probes ran; small chains
    calls = []

    def host_us(fn):
        fn()
        calls.append("host")
        return 10.0

    def graph_us(fn):
        fn()
        calls.append("graph")
        return float(len(calls))

    f = floors.measure(DEV, host_us, graph_us, chain_bytes=(("small", 64 * 128),))
    base = {"triton 1 arg", "triton 14 args", "torch add_ (1 element)", "torch.empty (1 KiB)"}
    # on a GPU also the compiled launcher called directly (where this triton's API takes it)
    assert base <= set(f.host_us) <= base | {"triton 14 args, direct"}
    assert DEV.type == "cuda" or set(f.host_us) == base
    assert set(f.graph_node_us) == {"triton empty", "torch add_ (1 element)"}
    assert calls.count("host") == len(f.host_us)
    assert calls.count("graph") == 2 + len(floors.CHAIN_STEPS) + 2
    # chain timings 3.0 and 4.0 at 16 and 256 steps: slope 1/240 µs = 4.17 ns
    assert f.round_trip_ns["small"] == pytest.approx(1e3 / 240)
    assert f.ticket_us == pytest.approx(1.0)  # 6th graph timing minus the 5th


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cli_without_cuda_says_nothing_is_measured():
    proc = subprocess.run([sys.executable, "-m", "bench", "floors"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
