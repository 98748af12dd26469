#!/usr/bin/env bash
# Make here everything the next GPU run needs, then print the device calls to make, in order,
# with this commit filled in (the device copy's git metadata can be stale).
#
#   bash scripts/device_prepare.sh [--no-dali] [--print-only] [--check-args "ARGS"]
#
# 1. scripts/device_wheels.sh: .whl/ (deepspeed + the pydantic/hjson it needs, ~5 MiB);
# 2. scripts/device_dali.sh: .dali/ (DALI + codecs in 56 MiB parts, ~2 min), unless --no-dali;
# 3. prints one `run` call per DALI part but the last (command bash bench/device_stage.sh), then
#    the call that carries the last part with .whl and runs bench/device_check.sh with ARGS
#    (default: the prepared run of bench/README.md, "What is built but not yet timed").
# --print-only skips 1 and 2 (no download): the calls for the .whl and .dali parts already here
# (with --no-dali: the one call), e.g. to see what ARGS make.
# The machine goes back 30 s after a call: make the staging calls back to back. A command may be
# 2,000 characters at most; this script says so when ARGS make it longer.
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DALI=yes
MAKE=yes
CHECK_ARGS='--budget 420 --full --stages pytest,bench,profile,data --ops sk_pass,gram,dino_loss,koleo,photometric --cases vitl16-ibot-row-bf,vitl16-ibot-bf,vitl16-dino-bf,vitl16-224-img,vitl16-512,vitl16-1024,koleo-B,koleo-gathered256,photometric- --providers torch,torch_compile,triton,triton_two_calls,triton_rows,triton_row_loop,triton_bwd_gemm_triton,triton_pp_recompute,row_first,col_mode0,col_mode1,triton_old,triton_ks1,triton_fused --tests "tests/unit/test_dali.py tests/unit/test_dali_jitter.py tests/unit/test_floors.py tests/kernels/test_photometric.py tests/unit/test_loader.py tests/kernels/test_gram.py tests/kernels/test_sinkhorn.py tests/kernels/test_dino_loss_gpu.py tests/kernels/test_dino_loss.py tests/kernels/test_koleo.py tests/gpu/test_model_cuda.py tests/gpu/test_gram_teacher_cuda.py"'
while [ $# -gt 0 ]; do
  case "$1" in
    --no-dali) DALI=no; shift ;;
    --print-only) MAKE=no; shift ;;
    --check-args) CHECK_ARGS="$2"; shift 2 ;;
    *) echo "device_prepare.sh: unknown argument '$1' (allowed: --no-dali, --print-only, --check-args ARGS)" >&2; exit 2 ;;
  esac
done
# the device tool takes a command of 2,000 characters at most: say so under the printed one
check_length() {
  [ "${#1}" -le 2000 ] || echo "device_prepare.sh: that command is ${#1} characters: over the 2,000 a call takes" >&2
}
cd "$REPO"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "device_prepare.sh: WARNING: uncommitted changes travel to the device but the commit below does not name them" >&2
fi
COMMIT="$(git rev-parse HEAD)"
if [ "$MAKE" = yes ]; then
  bash scripts/device_wheels.sh > /dev/null
  echo "made .whl ($(du -sh .whl | cut -f1))"
else
  echo ".whl not made (--print-only): $(ls .whl/*.whl 2>/dev/null | wc -l) wheel(s) there"
fi
CHECK="FASTDINO_COMMIT=$COMMIT bash bench/device_check.sh --out \$OUT $CHECK_ARGS"
echo
if [ "$DALI" = no ]; then
  echo "One device call: carry [\".whl\"], timeout_s 480, command:"
  echo "  $CHECK"
  check_length "$CHECK"
  exit 0
fi
[ "$MAKE" = yes ] && bash scripts/device_dali.sh > /dev/null
parts=(.dali/dali.tar.xz.part*)
if [ ! -f "${parts[0]}" ]; then
  echo "device_prepare.sh: no .dali parts here (--print-only makes none): run it without --print-only, or add --no-dali" >&2
  exit 2
fi
echo "made .dali: ${#parts[@]} part(s) ($(du -ch "${parts[@]}" | tail -1 | cut -f1))"
# every part but the last alone; the last rides with the device_check call when it fits beside
# the tree and .whl under the 64 MiB a call carries (2 MiB kept spare)
mib() { echo $(( ($(cat "$@" 2>/dev/null | wc -c) + 1048575) / 1048576 )); }
last="${parts[${#parts[@]}-1]}"
rides=no
[ $(( $(mib "$last") + $(mib $(git ls-files)) + $(mib .whl/*.whl) )) -le 62 ] && rides=yes
n=0
for p in "${parts[@]}"; do
  n=$((n + 1))
  [ "$p" = "$last" ] && [ "$rides" = yes ] && break
  echo "call $n: carry [\".dali/MANIFEST\", \"$p\"], timeout_s 120, command: bash bench/device_stage.sh"
done
if [ "$rides" = yes ]; then
  cmd="bash bench/device_stage.sh && $CHECK"
  echo "call $n: carry [\".dali/MANIFEST\", \"$last\", \".whl\"], timeout_s 480, command:"
else
  n=$((n + 1))
  cmd="$CHECK"
  echo "call $n: carry [\".whl\"], timeout_s 480, command:"
fi
echo "  $cmd"
check_length "$cmd"
echo "Then give the machine back, commit \$OUT under bench/results/ and index it in bench/results/README.md."
