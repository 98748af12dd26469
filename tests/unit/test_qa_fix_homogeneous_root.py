"""A bad `data.homogeneous_root` is reported under its own key, not as data.root."""

import re

import numpy as np
import pytest
from PIL import Image

from fastdino.config import load_config
from fastdino.data.loader import build_dataset


def test_missing_or_empty_homogeneous_root_names_its_key(tmp_path):
    (tmp_path / "main").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "main" / "a.png")
    (tmp_path / "empty").mkdir()
    base = [f"data.root={tmp_path / 'main'}"]
    missing = tmp_path / "nonexistent"
    quoted = re.escape(repr(str(missing)))
    with pytest.raises(FileNotFoundError, match=rf"^data.homogeneous_root {quoted} does not exist"):
        build_dataset(load_config(None, [*base, f"data.homogeneous_root={missing}"]))
    with pytest.raises(FileNotFoundError, match=r"^data.homogeneous_root: no images found in"):
        build_dataset(load_config(None, [*base, f"data.homogeneous_root={tmp_path / 'empty'}"]))
    with pytest.raises(FileNotFoundError, match=r"^data.root '.*' does not exist$"):
        build_dataset(load_config(None, [f"data.root={missing}"]))  # data.root keeps its name
