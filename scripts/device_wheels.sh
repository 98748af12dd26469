#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a bare GPU machine lacks for the trainer's DeepSpeed
# path: a pure deepspeed wheel (no ops prebuilt; they JIT-build there if ever used) and the
# pydantic / hjson dependencies the GPU image does not hold (python 3.12, manylinux x86_64).
# Versions come from constraints.txt, so the GPU run uses what CI tests. Run it here, then carry
# `.whl` with the device run: bench/device_check.sh installs .whl/*.whl into a temp --target dir
# (nothing is installed into the image) and runs its DeepSpeed stage when that works.
#
#   bash scripts/device_wheels.sh [--python PY]
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ "${1:-}" = "--python" ] && PY="$2"
. "$REPO/scripts/_pins.sh"
DEST="$REPO/.whl"
rm -rf "$DEST"; mkdir -p "$DEST"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps "deepspeed==$(pin deepspeed)" -w "$DEST"
# typing_extensions too: pydantic needs a newer one than the image may hold (pure, backward compatible)
for pkg in hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${MANYLINUX_X86_64[@]}" -d "$DEST" "$pkg==$(pin "$pkg")"
done
ls -la "$DEST"
du -sh "$DEST"
