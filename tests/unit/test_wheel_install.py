"""A wheel of fastdino (what `pip install fastdino` / `pip install git+...` installs) holds what the
commands need outside a clone: the kernels under fastdino.kernels and the presets, so `--config
smoke` and a preset's `base:` resolve (the presets stayed in the repository: 'config file 'smoke'
does not exist (nor is it a preset: )')."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _source_copy(dest: Path) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) copied to
    `dest`: setuptools builds in the source tree (build/, whose stale files a later wheel would
    take), so the test builds from a copy."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_the_wheel_ships_the_presets_and_an_install_of_it_finds_them(tmp_path):
    src = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "whl"), str(src)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("fastdino-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {f"fastdino/configs/{n}" for n in presets} <= names
    assert "fastdino/kernels/dino_loss.py" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    code = ("import fastdino.config as c; "
            "print(c.PRESET_DIR); print(c.load_config('vitl16').model.arch)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(tmp_path / "site" / "fastdino" / "configs"), "vit_large"]
