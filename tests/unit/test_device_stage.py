"""bench/device_stage.sh: DALI's parts arrive one device call at a time and are unpacked once all
are there; a corrupt part or another build's manifest must never produce a mixed tree."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "device_stage.sh"


def _pack(tmp: Path, files: dict[str, bytes], n_parts: int, tag: str) -> list[bytes]:
    """A tar.xz of site/<name> in n_parts, with the manifest scripts/device_dali.sh writes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"site/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = lzma.compress(buf.getvalue())
    size = -(-len(archive) // n_parts)
    parts = [archive[i * size:(i + 1) * size] for i in range(n_parts)]
    lines = [f"# test pack {tag}", f"archive {hashlib.sha256(archive).hexdigest()} dali.tar.xz"]
    lines += [f"part {hashlib.sha256(p).hexdigest()} dali.tar.xz.part{i}"
              for i, p in enumerate(parts)]
    (tmp / "MANIFEST").write_text("\n".join(lines) + "\n")
    return parts


def _call(carried: Path, dest: Path, parts: dict[int, bytes],
          env: dict | None = None) -> subprocess.CompletedProcess:
    """One device call: the tree carries the manifest and `parts` (earlier parts are gone)."""
    for old in carried.glob("dali.tar.xz.part*"):
        old.unlink()
    for i, data in parts.items():
        (carried / f"dali.tar.xz.part{i}").write_bytes(data)
    return subprocess.run(["bash", str(SCRIPT), "--from", str(carried), "--dest", str(dest)],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def dirs(tmp_path):
    carried, dest = tmp_path / "carried", tmp_path / "dest"
    carried.mkdir()
    return carried, dest


def test_parts_staged_call_by_call_then_unpacked(dirs):
    carried, dest = dirs
    files = {"nvidia/dali/__init__.py": b"VERSION = 'test'\n", "blob.bin": bytes(range(256)) * 400}
    parts = _pack(carried, files, 3, "a")
    for i in (1, 0):  # any order
        r = _call(carried, dest, {i: parts[i]})
        assert r.returncode == 0, r.stderr
        assert "INCOMPLETE" in r.stdout and not (dest / "site").exists()
    assert "dali.tar.xz.part2" in r.stdout  # names what is still to carry
    r = _call(carried, dest, {2: parts[2]})
    assert r.returncode == 0 and "COMPLETE" in r.stdout, r.stderr
    for name, data in files.items():
        assert (dest / "site" / name).read_bytes() == data
    assert (dest / "site.ok").exists()
    r = _call(carried, dest, {})  # a later call: nothing to do
    assert r.returncode == 0 and "already unpacked" in r.stdout


def test_corrupt_part_is_refused(dirs):
    carried, dest = dirs
    parts = _pack(carried, {"x": b"payload" * 1000}, 2, "a")
    bad = bytes([parts[0][0] ^ 1]) + parts[0][1:]
    r = _call(carried, dest, {0: bad})
    assert r.returncode == 1 and "sha256" in r.stderr
    assert not (dest / "parts" / "dali.tar.xz.part0").exists()


def test_another_builds_manifest_drops_the_staged_parts(dirs):
    carried, dest = dirs
    old = _pack(carried, {"x": b"old" * 1000}, 2, "old")
    assert _call(carried, dest, {0: old[0]}).returncode == 0
    new = _pack(carried, {"x": b"new" * 1000}, 2, "new")
    r = _call(carried, dest, {1: new[1]})
    assert r.returncode == 0 and "different build" in r.stdout
    assert "INCOMPLETE" in r.stdout and "dali.tar.xz.part0" in r.stdout.splitlines()[-1]
    r = _call(carried, dest, {0: new[0]})
    assert "COMPLETE" in r.stdout and (dest / "site" / "x").read_bytes() == b"new" * 1000


def test_no_manifest_is_a_usage_error(dirs):
    carried, dest = dirs
    r = _call(carried, dest, {})
    assert r.returncode == 2 and "MANIFEST" in r.stderr


def test_unpacks_without_an_xz_binary(dirs, tmp_path):
    """An image without xz: Python's lzma + tarfile unpack the same archive."""
    carried, dest = dirs
    tools = tmp_path / "bin"  # every tool the script uses, but no xz
    tools.mkdir()
    for name in ("bash", "cat", "tar", "sha256sum", "awk", "grep", "cp", "mv", "mkdir", "rm",
                 "touch", "du", "cut", "cmp", "dirname", "basename"):
        os.symlink(shutil.which(name), tools / name)
    os.symlink(sys.executable, tools / "python3")
    parts = _pack(carried, {"nvidia/dali/x.py": b"ok = 1\n"}, 1, "a")
    r = _call(carried, dest, {0: parts[0]}, env={"PATH": str(tools)})
    assert r.returncode == 0 and "COMPLETE" in r.stdout, r.stderr
    assert (dest / "site" / "nvidia" / "dali" / "x.py").read_bytes() == b"ok = 1\n"
