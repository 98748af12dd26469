#!/usr/bin/env bash
# Pack NVIDIA DALI for the GPU machine, in parts that fit its 64 MiB per call.
#
#   bash scripts/device_dali.sh [--python PY] [--python-version 3.12] [--part-mib 56] [--out .dali]
#
# The GPU image has no DALI and no network, and a device call carries at most 64 MiB (working tree
# included), while DALI 2.4 for CUDA 13 is a 199 MB wheel (492 MB installed) plus ~65 MB of codec
# wheels. So this script, run here:
#   1. downloads, at the versions pinned in constraints.txt (what CI tests), DALI, the nvImageCodec
#      codecs it loads (nvJPEG, nvJPEG2000, nvTIFF, nvCOMP) and the pure-Python / small binary
#      packages DALI imports that the image lacks (astunparse, gast, optree, makefun, libcst,
#      nvtx), as manylinux x86_64 wheels for that Python (the GPU image's: 3.12);
#   2. installs them into one --target tree (no compile, no deps) and drops what only other
#      Python versions load (DALI's and nvImageCodec's per-version extension modules) and the
#      nvCOMP command-line tools;
#   3. packs that tree as one tar.xz and splits it into parts of --part-mib MiB under the
#      git-ignored .dali/, with .dali/MANIFEST (sha256 of every part and of the whole archive).
# On the GPU machine, one call per part (each carrying `.dali/MANIFEST` and that part) runs
# `bash bench/device_stage.sh`, which keeps the parts outside the tree copy (/tmp, alive while the
# machine stays warm: 30 s after a call) and unpacks the archive once all of them are there;
# bench/device_check.sh then finds the unpacked tree and its `data` stage runs the DALI loader.
# scripts/device_prepare.sh runs this script and prints the sequence of calls.
set -eu
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PYVER=3.12
PART_MIB=56
DEST="$REPO/.dali"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY="$2"; shift 2 ;;
    --python-version) PYVER="$2"; shift 2 ;;
    --part-mib) PART_MIB="$2"; shift 2 ;;
    --out) DEST="$2"; shift 2 ;;
    *) echo "device_dali.sh: unknown argument '$1' (allowed: --python PY, --python-version X.Y, --part-mib N, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$PYVER" in 3.[0-9]|3.[0-9][0-9]) ;; *) echo "device_dali.sh: --python-version '$PYVER' must look like 3.12" >&2; exit 2 ;; esac
case "$PART_MIB" in ''|*[!0-9]*) echo "device_dali.sh: --part-mib '$PART_MIB' must be whole MiB" >&2; exit 2 ;; esac
[ "$PART_MIB" -ge 1 ] && [ "$PART_MIB" -le 60 ] || { echo "device_dali.sh: --part-mib $PART_MIB: allowed 1..60 (a call carries 64 MiB with the tree)" >&2; exit 2; }
if [ -d "$DEST" ] && [ -n "$(ls -A "$DEST")" ] && [ ! -f "$DEST/MANIFEST" ]; then
  echo "device_dali.sh: --out $DEST holds files that are not an earlier pack (no MANIFEST): not replacing it" >&2; exit 2
fi
. "$REPO/scripts/_pins.sh"
CP="cp${PYVER/./}"

# DALI's Requires-Dist and nvimgcodec[all]'s, less what the GPU image holds (numpy, six,
# packaging, pyyaml, typing_extensions: KINDS.md's package list)
PKGS=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
      nvidia-nvtiff-cu13 nvidia-libnvcomp-cu13 astunparse gast optree makefun libcst nvtx)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/wheels"
for pkg in "${PKGS[@]}"; do
  ver="$(pin "$pkg")"
  echo "download $pkg==$ver ($CP)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${MANYLINUX_X86_64[@]}" -d "$WORK/wheels" "$pkg==$ver"
done
"$PY" -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: \
  --python-version "$PYVER" --implementation cp "${MANYLINUX_X86_64[@]}" \
  --target "$WORK/site" "$WORK"/wheels/*.whl

# prune: extension modules built for other Pythons (DALI ships one per CPython, free-threaded
# builds too) and nvCOMP's command-line tools; nothing the loader imports or dlopens
site="$WORK/site"
find "$site/nvidia/dali" "$site/nvidia/nvimgcodec" -maxdepth 1 -name '*.cpython-*.so' \
  ! -name "*.cpython-${CP#cp}-*" -delete
rm -rf "$site/nvidia/libnvcomp/bin"
find "$site" -name '__pycache__' -prune -exec rm -rf {} +
[ -n "$(find "$site/nvidia/dali" -maxdepth 1 -name "backend_impl.cpython-${CP#cp}-*.so")" ] || {
  echo "device_dali.sh: DALI has no backend_impl for $CP after pruning" >&2; exit 1; }
echo "installed tree: $(du -sh "$site" | cut -f1)"

# pack and split; the manifest lists the parts in order with their sha256
rm -rf "$DEST"; mkdir -p "$DEST"
tar -C "$WORK" -cf - site | xz -T0 -9 > "$WORK/dali.tar.xz"
(cd "$DEST" && split -b "${PART_MIB}M" -d -a 1 "$WORK/dali.tar.xz" dali.tar.xz.part)
{
  echo "# scripts/device_dali.sh $(date -u +%FT%TZ): $CP, parts of $PART_MIB MiB"
  echo "# packages: $(cd "$WORK/wheels" && ls | tr '\n' ' ')"
  echo "archive $(sha256sum "$WORK/dali.tar.xz" | cut -d' ' -f1) dali.tar.xz"
  for f in "$DEST"/dali.tar.xz.part*; do
    echo "part $(sha256sum "$f" | cut -d' ' -f1) $(basename "$f")"
  done
} > "$DEST/MANIFEST"
ls -la "$DEST"
echo "$(grep -c '^part ' "$DEST/MANIFEST") part(s) in $DEST; bash scripts/device_prepare.sh prints the device calls"
