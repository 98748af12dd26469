#!/usr/bin/env bash
# The one prepared script for a GPU machine (DESIGN.md "Benchmarks, profiling and GPU checks").
#
#   bash bench/device_check.sh [--out DIR] [--budget SECONDS] [--python PYTHON]
#                              [--stages LIST] [--ops LIST] [--tests FILES] [--cases LIST] [--full]
#                              [--providers LIST] [--pytest-workers N] [--step-impls LIST]
#
# --stages  comma list of pytest,check,bench,profile,step,data,ds (default: all of them). A follow-up
#           run on the same lease time names only what it needs (e.g. pytest,profile,bench).
# --ops     comma list of bench ops for check / bench / profile (default: every op for check
#           and bench; dino_loss,koleo for profile, the ops whose timings are not explained by
#           their bytes).
# --tests   space-separated test files for pytest (default: tests/gpu + every tests/kernels file
#           that runs kernels, GPU-only cases first; tests/unit/test_dali.py and test_dali_jitter.py where DALI imports).
# --cases   comma list of texts: check / bench / profile run only the cases whose name contains
#           one of them (default: every case).
# --full    check / bench / profile take every case of the named ops, not only the --quick ones
#           (e.g. KoLeo's B x D grid: --ops koleo --full); name --ops or --cases with it.
# --providers  comma list: the bench stage times only these providers of each case (default: all
#           of them; e.g. skip A/B variants that are already decided).
# --pytest-workers  pytest-xdist workers for the pytest stage on a GPU (default: half the cores,
#           at most 8, 4 under 100 GiB of GPU memory; 0 = one process, the files in order).
# --step-impls  the step stage's `bench step --impls` (default triton,torch; e.g.
#           triton,triton+compile,torch adds every ViT block through torch.compile).
#
# From a bare copy of the repo (no pip install, no network): prints the environment, runs
# tests/gpu + tests/kernels (kernel parity on CUDA), `python -m bench all --check --quick` (every
# kernel's parity on its quick cases), `python -m bench all --quick` (the kernel benchmarks) and
# `python -m bench step --quick` (ViT-S/16 and ViT-B/16 training steps, Triton vs torch kernels)
# and, when deepspeed imports (carry `.whl` made by scripts/device_wheels.sh), a short ZeRO-2 bf16
# training run of ViT-S/16 through the trainer (logged into step.log); when DALI imports (staged in
# parts: scripts/device_dali.sh, bench/device_stage.sh), `python -m bench data` (DALI against the
# torch loader) and the ViT-B/16 step fed by DALI (logged into step.log).
# Every stage runs under `timeout`, with a share of --budget (default 480 s) trimmed so the whole
# script ends inside it. Writes at most 8 files to --out (default bench/results/):
#   env.txt pytest.log check.log bench.log step.log step.json summary.txt <gpu-slug>-<date>.jsonl
# (profile.log replaces step.json when the profile stage runs: 8 files at most come back)
# The device tool's copy of the tree may carry stale git metadata: name the commit in the command,
# `FASTDINO_COMMIT=<hash> bash bench/device_check.sh ...`, or env.txt and the JSONL record the stale one.
# Installs nothing into the image (carried wheels go to a temp dir); skips what is missing. Without a GPU it still runs (CPU
# interpreter cases, smoke-sized step), which is how it is tested.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/bench/results"
BUDGET=480
PY="${PYTHON:-python3}"
ALL_STAGES="pytest,check,bench,profile,step,data,ds"
STAGES="$ALL_STAGES"
OPS=""
TESTS=""
CASES=""
QUICK="--quick"
PROVIDERS=""
WORKERS=""
STEP_IMPLS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --ops) OPS="$2"; shift 2 ;;
    --tests) TESTS="$2"; shift 2 ;;
    --cases) CASES="$2"; shift 2 ;;
    --full) QUICK=""; shift ;;
    --providers) PROVIDERS="$2"; shift 2 ;;
    --pytest-workers) WORKERS="$2"; shift 2 ;;
    --step-impls) STEP_IMPLS="$2"; shift 2 ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1' (allowed: --out DIR, --budget SECONDS, --python PY, --stages LIST, --ops LIST, --tests FILES, --cases LIST, --full, --providers LIST, --pytest-workers N, --step-impls LIST)" >&2; exit 2 ;;
  esac
done
for st in ${STAGES//,/ }; do
  case ",$ALL_STAGES," in *",$st,"*) ;; *) echo "device_check.sh: unknown stage '$st' in --stages (allowed: $ALL_STAGES)" >&2; exit 2 ;; esac
done
want() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
case "$BUDGET" in ''|*[!0-9]*) echo "device_check.sh: --budget '$BUDGET' must be whole seconds" >&2; exit 2 ;; esac
case "$WORKERS" in *[!0-9]*) echo "device_check.sh: --pytest-workers '$WORKERS' must be a whole number (0 = no xdist)" >&2; exit 2 ;; esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# The stages append to their logs (data, step and ds share step.log), so the logs this run
# writes start empty: in a reused --out (the default bench/results) an earlier run's lines would
# otherwise count in this run's summary (its PASS / FAIL counts, its pytest result)
want pytest && rm -f "$OUT/pytest.log"
want check && rm -f "$OUT/check.log"
{ want bench || want profile; } && rm -f "$OUT/bench.log"
{ want data || want step || want ds; } && rm -f "$OUT/step.log"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
cd "$REPO"

say() { echo "$*" | tee -a "$SUMMARY"; }

if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c "import torch" 2>/dev/null; then
  say "FATAL: $PY with torch not found (set PYTHON=... or --python)"; exit 1
fi

# ---- imports without a pip install: fastdino.kernels is the kernels/ folder (pyproject's
# package-dir). If the package is not installed, a link farm in a temp dir gives Python the
# installed layout (fastdino/* + fastdino/kernels -> kernels/), put first on PYTHONPATH; Python
# runs with -P so the repo root (cwd) does not shadow it.
PYFLAGS=""
if (cd / && "$PY" -c "import fastdino.kernels" 2>/dev/null); then
  IMPORTS="installed package"
else
  FARM="$(mktemp -d)/site"
  mkdir -p "$FARM/fastdino"
  for f in "$REPO"/fastdino/*; do ln -s "$f" "$FARM/fastdino/$(basename "$f")"; done
  ln -s "$REPO/kernels" "$FARM/fastdino/kernels"
  export PYTHONPATH="$FARM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  PYFLAGS="-P"
  IMPORTS="link farm $FARM (not installed)"
fi
run_py() { "$PY" $PYFLAGS "$@"; }

# ---- carried wheels (scripts/device_wheels.sh fills .whl/: deepspeed + the pydantic/hjson it
# needs): installed into a temp --target dir, never into the image, and put on PYTHONPATH
WHEELS="none carried (scripts/device_wheels.sh makes them)"
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  SITE="$(mktemp -d)/wheels"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$REPO"/.whl/*.whl > "$SITE.log" 2>&1; then
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$SITE"
    WHEELS="$(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')-> $SITE"
  else
    WHEELS="install FAILED: $(tail -3 "$SITE.log" | tr '\n' ' ')"
  fi
fi

# ---- DALI: carried in parts (scripts/device_dali.sh) and unpacked by bench/device_stage.sh into
# $FASTDINO_DALI_DIR/site (default /tmp/fastdino-dali): on PYTHONPATH, its codec libraries (nvJPEG
# and co., found by dlopen) on LD_LIBRARY_PATH
DALI_DIR="${FASTDINO_DALI_DIR:-/tmp/fastdino-dali}"
DALI="none staged (scripts/device_dali.sh + bench/device_stage.sh)"
if [ -f "$DALI_DIR/site.ok" ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DALI_DIR/site"
  for d in "$DALI_DIR"/site/nvidia/*/lib "$DALI_DIR"/site/nvidia/*/lib64; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  DALI="staged in $DALI_DIR/site"
fi

# ---- budget: rolling shares. A stage gets weight / (the weights of it and of every later selected
# stage) of what is left, so time a stage leaves unused goes to the later ones, and a run of a
# few stages (--stages) splits the whole budget among them.
remaining() { echo $(( BUDGET - (SECONDS - START) )); }
ORDER="pytest check data bench profile step ds"
weight() { case "$1" in pytest) echo 22 ;; check) echo 12 ;; bench) echo 32 ;; profile) echo 12 ;;
  step) echo 14 ;; data) echo 20 ;; ds) echo 6 ;; esac; }
stage_timeout() {  # $1 = stage name
  local total=0 seen=no st
  for st in $ORDER; do
    [ "$st" = "$1" ] && seen=yes
    [ "$seen" = yes ] && want "$st" && total=$(( total + $(weight "$st") ))
  done
  echo $(( $(remaining) * $(weight "$1") / (total > 0 ? total : 1) ))
}
run_stage() {  # name, timeout, log, command... (a program: timeout cannot run shell functions)
  local name="$1" t="$2" log="$3"; shift 3
  if [ "$t" -lt 15 ]; then
    say "$(printf '%-8s SKIPPED: budget exhausted (%ss left)' "$name" "$(remaining)")"; return
  fi
  local t0=$SECONDS
  echo "\$ $*   (timeout ${t}s)" >> "$log"
  timeout --signal=TERM --kill-after=10 "$t" "$@" >> "$log" 2>&1
  local rc=$?
  local how="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && how="TIMEOUT after ${t}s (partial results kept)"
  say "$(printf '%-8s %-40s %4ss  %s' "$name" "$how" $(( SECONDS - t0 )) "$(basename "$log")")"
}

# ---- 0. environment
{
  echo "date: $(date -u +%FT%TZ)   budget: ${BUDGET}s   imports: $IMPORTS"
  echo "wheels: $WHEELS"
  echo "dali: $DALI"
  echo "commit: ${FASTDINO_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found (no NVIDIA driver)"
  # loader worker processes (torch DataLoader, DALI's parallel source) pass batches through it
  echo "cpus: $(nproc)   /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2 " total, " $4 " free"}')"
  run_py - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| sm", f"{p.major}{p.minor}", "| SMs", p.multi_processor_count,
          "| memory GiB", round(p.total_memory / 2**30, 1))
for mod, pkg in (("triton", "triton"), ("flash_attn", "flash-attn"), ("deepspeed", "deepspeed"),
                 ("pynvml", "nvidia-ml-py"), ("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"),
                 ("nvidia.dali", "nvidia-dali")):
    try:
        m = importlib.import_module(mod)
        print(f"{pkg}: {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"{pkg}: not available ({type(e).__name__}) -> the stages that need it skip")
try:
    import nvidia.dali
    print("nvidia-dali from", nvidia.dali.__file__)
except Exception:
    pass
import fastdino.kernels, fastdino
print("fastdino from", fastdino.__file__, "| kernels from", fastdino.kernels.__file__)
EOF
} > "$OUT/env.txt" 2>&1
say "env      $(grep -m1 '^gpu ' "$OUT/env.txt" || echo 'no GPU')  | $(grep -m1 '^python' "$OUT/env.txt")"
DEEPSPEED=$(grep -q '^deepspeed: not available' "$OUT/env.txt" && echo no || echo yes)
CUDA=$(grep -q '^gpu ' "$OUT/env.txt" && echo yes || echo no)
# the ds stage needs deepspeed and a GPU: without them it is not selected (its share goes to the
# other stages)
if want ds && { [ "$DEEPSPEED" = no ] || [ "$CUDA" = no ]; }; then
  say "ds       SKIPPED: needs deepspeed (carry .whl from scripts/device_wheels.sh) and a GPU"
  STAGES="${STAGES//ds/}"
fi
if want data && grep -q '^nvidia-dali: not available' "$OUT/env.txt"; then
  say "data     SKIPPED: needs NVIDIA DALI (scripts/device_dali.sh parts, staged by bench/device_stage.sh)"
  STAGES="${STAGES//data/}"
fi
BENCH_TARGET="${OPS:-all}"
PROFILE_OPS="${OPS:-dino_loss,koleo}"

# ---- 1. GPU tests and kernel parity tests (compile checks run in CI, not here); the files with
# GPU-only cases first (files listed in that order), in case the stage times out (without xdist)
if [ -z "$TESTS" ]; then
  FIRST="tests/kernels/test_dino_loss_gpu.py tests/kernels/test_koleo_split.py"
  TESTS="tests/gpu $FIRST"
  # the DALI loader's tests run its GPU graph where DALI is staged (they take seconds)
  grep -q '^nvidia-dali: not available' "$OUT/env.txt" || TESTS="tests/unit/test_dali.py tests/unit/test_dali_jitter.py $TESTS"
  for f in tests/kernels/test_*.py; do
    case " $FIRST tests/kernels/test_compile.py tests/kernels/test_gram_compile.py " in
      *" $f "*) ;;
      *) TESTS="$TESTS $f" ;;
    esac
  done
fi
if want pytest; then
  if run_py -c "import pytest" 2>/dev/null; then
    # On the GPU machine the stage is bound by Triton's JIT compiles (~1 s per new shape or
    # config; 65 tests took 65 s in check6), which are CPU work: pytest-xdist (in the GPU image)
    # spreads them over worker processes sharing one on-disk Triton cache. Half the cores, at
    # most 8, and 4 under 100 GiB of GPU memory (every worker holds its own DINOv3-sized tensors).
    XDIST=""
    if [ "$CUDA" = yes ] && [ "$WORKERS" != 0 ] && run_py -c "import xdist" 2>/dev/null; then
      n=$(( $(nproc) / 2 )); [ "$n" -gt 8 ] && n=8
      mem=$(grep -m1 '^gpu ' "$OUT/env.txt" | sed -n 's/.*memory GiB \([0-9]*\).*/\1/p')
      [ "${mem:-0}" -lt 100 ] && [ "$n" -gt 4 ] && n=4
      [ -n "$WORKERS" ] && n="$WORKERS"
      [ "$n" -ge 2 ] && XDIST="-n $n"
    fi
    # shellcheck disable=SC2086  # TESTS is a list of paths without spaces
    run_stage pytest "$(stage_timeout pytest)" "$OUT/pytest.log" \
      "$PY" $PYFLAGS -m pytest $TESTS -q -rfEs --tb=short -p no:cacheprovider $XDIST
  else
    say "pytest   SKIPPED: pytest not installed"
  fi
fi

# ---- 2. parity of every kernel at DINOv3 shapes (CUDA) / interpreter shapes (CPU)
# --quick: every op gets checked inside the share (the full sweep holds e.g. k-means at 1M x 100k)
# --time-budget (the stage's timeout less start-up and one case's overrun) gives every op its
# share, so the last ops are not starved by a slow first one
if want check; then
  T=$(stage_timeout check)
  run_stage check "$T" "$OUT/check.log" "$PY" $PYFLAGS -m bench "$BENCH_TARGET" --check $QUICK ${CASES:+--cases "$CASES"} \
    --out "$OUT" --time-budget $(( T > 40 ? T - 20 : 20 ))
fi

# ---- 2b. the data loaders (issue 9; before the kernel timings, which use what it leaves): images/s
# and CPU cores of the DALI (nvJPEG, mixed) and torch
# loaders on one folder of ImageNet-like JPEGs written here (no dataset is reachable), at the
# DINOv3 crops, the same CPU budget for both; then the ViT-B/16 step fed by the DALI loader: its
# data_wait share of the step; then DALI with every op in its graph (exact, fast), and the torch
# loader with its photometric ops on the GPU. Logged into step.log (the file count is capped).
if want data; then
  echo "## stage data: python -m bench data, then fastdino.profile with data.loader=dali" >> "$OUT/step.log"
  if [ "$CUDA" = yes ]; then  # the issue's setting: B = 64, 8 CPU threads / workers, ViT-B/16
    DATA_ENV=(IMAGES=1024 BATCH=64 STEPS=16 WARMUP=4 WORKERS=8 CFG=configs/vitb16.yaml PSTEPS=10 PWARMUP=3)
  else  # CPU (how this script is tested): a smoke-sized run of the same commands
    DATA_ENV=(IMAGES=32 BATCH=8 STEPS=2 WARMUP=1 WORKERS=2 CFG=configs/smoke.yaml PSTEPS=2 PWARMUP=1)
  fi
  run_stage data "$(stage_timeout data)" "$OUT/step.log" env "${DATA_ENV[@]}" PY="$PY" \
    PYFLAGS="$PYFLAGS" RESULTS="$OUT" bash -c '
    imgs=$("$PY" $PYFLAGS -c "from fastdino.data.sample_data import benchmark_jpeg_dir as b; print(b($IMAGES))") || exit 1
    echo "images: $imgs ($(ls "$imgs" | wc -l) files, $(du -sh "$imgs" | cut -f1))"
    # the two targets first (images/s against torch, then the data_wait of the DALI-fed step),
    # with the default photometric ops (triton: DALI crops + resizes, kernels/photometric.py does
    # the rest); then the all-DALI graphs (exact 4,995 operators, fast 1,795) as the A/B; each
    # runs even when an earlier one fails
    "$PY" $PYFLAGS -m bench data --root "$imgs" --batch "$BATCH" --steps "$STEPS" \
      --warmup "$WARMUP" --workers "$WORKERS" --out "$RESULTS" || echo "bench data: rc=$?"
    "$PY" $PYFLAGS -m fastdino.profile --config "$CFG" --steps "$PSTEPS" --warmup "$PWARMUP" \
      data.loader=dali "data.root=$imgs" "data.num_workers=$WORKERS" \
      "train.output_dir=$(mktemp -d)/profile" || echo "fastdino.profile (dali): rc=$?"
    for jitter in exact fast; do
      "$PY" $PYFLAGS -m bench data --root "$imgs" --batch "$BATCH" --steps "$STEPS" \
        --warmup "$WARMUP" --workers "$WORKERS" --out "$RESULTS" --loaders dali --jitter $jitter \
        || echo "bench data --jitter $jitter: rc=$?"
    done
    # the torch loader with its photometric ops on the GPU (workers: decode, crop, resize, flip)
    "$PY" $PYFLAGS -m bench data --root "$imgs" --batch "$BATCH" --steps "$STEPS" \
      --warmup "$WARMUP" --workers "$WORKERS" --out "$RESULTS" --loaders torch \
      --torch-photometric gpu || echo "bench data --torch-photometric gpu: rc=$?"'
fi

# ---- 3. kernel benchmarks (quick DINOv3 shapes, every provider, fwd / bwd / fwd+bwd)
if want bench; then
  T=$(stage_timeout bench)
  run_stage bench "$T" "$OUT/bench.log" "$PY" $PYFLAGS -m bench "$BENCH_TARGET" $QUICK ${CASES:+--cases "$CASES"} ${PROVIDERS:+--providers "$PROVIDERS"} \
    --out "$OUT" --time-budget $(( T > 40 ? T - 20 : 20 ))
fi

# ---- 3b. where the time of the ops whose timings their bytes do not explain goes (host vs device,
# launches, syncs, top kernels), after this GPU's latency floors (`bench floors`, ~10 s: host µs per
# launch, graph µs per node, ns per dependent load, µs per ticket); appended to bench.log (the file
# count is capped)
if want profile; then
  echo "## stage profile: python -m bench floors, then python -m bench profile (ops $PROFILE_OPS)" >> "$OUT/bench.log"
  # PROFILE_FLAGS is split into words on purpose (no flag value holds a space)
  run_stage profile "$(stage_timeout profile)" "$OUT/bench.log" env PROFILE_OPS="$PROFILE_OPS" \
    PROFILE_FLAGS="$QUICK --providers triton --modes fwd,bwd ${CASES:+--cases $CASES}" \
    bash -c '"$0" "$@" floors; for op in ${PROFILE_OPS//,/ }; do "$0" "$@" profile $PROFILE_FLAGS "$op"; done' \
    "$PY" $PYFLAGS -m bench
fi

# ---- 4. training-step benchmark, ViT-S/16 and ViT-B/16, Triton vs torch kernels
if want step; then
  [ "$DEEPSPEED" = no ] && echo "# deepspeed not installed: the trainer runs its single-process plain-torch engine" >> "$OUT/step.log"
  run_stage step "$(stage_timeout step)" "$OUT/step.log" \
    "$PY" $PYFLAGS -m bench step --quick --models vits16,vitb16 ${STEP_IMPLS:+--impls "$STEP_IMPLS"} --out "$OUT" --json "$OUT/step.json"
fi

# ---- 5. the trainer under DeepSpeed on this GPU (ZeRO-2, bf16, Triton kernels): one rank set up
# as the deepspeed launcher would (its env vars), ViT-S/16 on the embedded sample images; the log
# goes to step.log (the file count is capped). Needs deepspeed, e.g. from the carried wheels.
if want ds; then
  echo "## stage ds: deepspeed single-rank ZeRO-2 training of vits16" >> "$OUT/step.log"
  run_stage ds "$(stage_timeout ds)" "$OUT/step.log" \
    env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 \
    "$PY" $PYFLAGS fastdino/train.py --config configs/vits16.yaml train.max_iterations=12 \
      train.log_every=4 train.checkpoint_every=1000000 data.batch_size_per_gpu=32 \
      data.num_workers=8 deepspeed.zero_stage=2 "train.output_dir=$(mktemp -d)/ds"
fi

# ---- summary: parity verdicts and the step table
{
  # only the stages of this run: logs of stages it did not run may lie in a reused --out
  if want check && [ -f "$OUT/check.log" ]; then
    echo "check:  $(grep -c ' PASS' "$OUT/check.log") PASS, $(grep -c ' FAIL' "$OUT/check.log") FAIL"
    grep ' FAIL' "$OUT/check.log" | head -20
  fi
  if want pytest && [ -f "$OUT/pytest.log" ]; then
    echo "pytest: $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/pytest.log" | tail -1)"
    grep -E '^FAILED|^ERROR' "$OUT/pytest.log" | head -20
  fi
  sed -n '/^model    impl/,$p' "$OUT/step.log" 2>/dev/null | head -8
  sed -n '/^## stage ds/,$p' "$OUT/step.log" 2>/dev/null | grep -E 'engine:| it [0-9]+/|Error|error' | tail -5
  echo "total $(( SECONDS - START ))s of ${BUDGET}s budget; files in $OUT:"; ls "$OUT"
} | tee -a "$SUMMARY"
exit 0
