# Sourced by the scripts that fetch wheels for the GPU machine: `pin NAME` prints the version of
# NAME pinned in constraints.txt (names compared case- and _/- blind), so the GPU run uses what CI
# tests. Needs REPO set by the caller.
pin() {
  local want name _ ver
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  while IFS='=' read -r name _ ver; do
    [ "$(echo "$name" | tr 'A-Z_' 'a-z-')" = "$want" ] && { echo "$ver"; return; }
  done < <(grep -E '^[A-Za-z0-9_.-]+==' "$REPO/constraints.txt")
  echo "$(basename "$0"): $1 is not pinned in constraints.txt" >&2
  exit 1
}

# pip's --platform list for manylinux x86_64 wheels (pip matches each tag exactly)
MANYLINUX_X86_64=()
for _p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
          manylinux2014_x86_64 manylinux1_x86_64; do
  MANYLINUX_X86_64+=(--platform "$_p")
done
