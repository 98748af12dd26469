#!/usr/bin/env bash
# Collect the DALI parts of scripts/device_dali.sh on the GPU machine, one device call at a time,
# and unpack them once all have arrived.
#
#   bash bench/device_stage.sh [--dest DIR] [--from PARTS]
#
# DIR: $FASTDINO_DALI_DIR or /tmp/fastdino-dali; PARTS: the tree's .dali (what the call carried).
#
# Each call carries `.dali/MANIFEST` and one or more `.dali/dali.tar.xz.part<k>`. This script
# checks every carried part against the manifest's sha256 and copies it to DIR/parts, outside the
# tree copy: /tmp lives as long as the machine (it goes back 30 s after a call, so make the calls
# back to back). A manifest different from the one DIR holds (another build) discards the parts
# kept so far. When every part is there it joins them, checks the whole archive's sha256 and
# unpacks it into DIR/site (DIR/site.ok marks a complete unpack); bench/device_check.sh puts
# DIR/site on PYTHONPATH and the codec libraries on LD_LIBRARY_PATH.
# Exit status: 0 = staged (complete or not; the last line says which), 1 = a bad part or archive,
# 2 = usage (no manifest carried).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${FASTDINO_DALI_DIR:-/tmp/fastdino-dali}"
FROM="$REPO/.dali"
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2 ;;
    --from) FROM="$2"; shift 2 ;;
    *) echo "device_stage.sh: unknown argument '$1' (allowed: --dest DIR, --from PARTS)" >&2; exit 2 ;;
  esac
done
MAN="$FROM/MANIFEST"
[ -f "$MAN" ] || { echo "device_stage.sh: no MANIFEST in $FROM: carry it with every part (scripts/device_dali.sh makes it)" >&2; exit 2; }
mkdir -p "$DEST/parts"
if [ -f "$DEST/MANIFEST" ] && ! cmp -s "$MAN" "$DEST/MANIFEST"; then
  echo "device_stage.sh: a different build's manifest: dropping the parts staged before"
  rm -rf "$DEST/parts" "$DEST/site" "$DEST/site.ok"
  mkdir -p "$DEST/parts"
fi
cp "$MAN" "$DEST/MANIFEST"

want_sha() { awk -v n="$1" '$1 == "part" && $3 == n { print $2 }' "$MAN"; }
for f in "$FROM"/dali.tar.xz.part*; do
  [ -f "$f" ] || continue
  name="$(basename "$f")"
  want="$(want_sha "$name")"
  [ -n "$want" ] || { echo "device_stage.sh: $name is not in the manifest (another build?)" >&2; exit 1; }
  [ -f "$DEST/parts/$name" ] && continue  # kept from an earlier call (checked then)
  got="$(sha256sum "$f" | cut -d' ' -f1)"
  [ "$got" = "$want" ] || { echo "device_stage.sh: $name sha256 $got, manifest $want: re-carry it" >&2; exit 1; }
  cp "$f" "$DEST/parts/$name.tmp" && mv "$DEST/parts/$name.tmp" "$DEST/parts/$name"
  echo "staged $name ($(du -h "$f" | cut -f1))"
done

parts=(); missing=()
while read -r _ _ name; do
  parts+=("$DEST/parts/$name")
  [ -f "$DEST/parts/$name" ] || missing+=("$name")
done < <(grep '^part ' "$MAN")
if [ ${#missing[@]} -gt 0 ]; then
  echo "INCOMPLETE: $(( ${#parts[@]} - ${#missing[@]} )) of ${#parts[@]} parts in $DEST/parts; still to carry: ${missing[*]}"
  exit 0
fi
if [ -f "$DEST/site.ok" ]; then
  echo "COMPLETE: DALI already unpacked in $DEST/site"
  exit 0
fi
want="$(awk '$1 == "archive" { print $2 }' "$MAN")"
got="$(cat "${parts[@]}" | sha256sum | cut -d' ' -f1)"
[ "$got" = "$want" ] || { echo "device_stage.sh: joined archive sha256 $got, manifest $want" >&2; exit 1; }
rm -rf "$DEST/site"
t0=$SECONDS
if command -v xz >/dev/null 2>&1; then
  cat "${parts[@]}" | xz -d -T0 | tar -C "$DEST" -xf - || { echo "device_stage.sh: unpack failed" >&2; exit 1; }
else  # no xz binary: Python's lzma + tarfile read the same stream
  # (our own archive: fully trusted, as tar itself extracts it; the filter argument is 3.11.4+)
  cat "${parts[@]}" | python3 -c 'import sys, tarfile; kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], **kw)' "$DEST" \
    || { echo "device_stage.sh: unpack failed" >&2; exit 1; }
fi
touch "$DEST/site.ok"
echo "COMPLETE: DALI unpacked in $DEST/site ($(du -sh "$DEST/site" | cut -f1), $(( SECONDS - t0 )) s)"
