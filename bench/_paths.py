"""Make `fastdino` and `fastdino.kernels` importable when the package is NOT pip-installed (the GPU
machine gets a bare copy of the working tree).

pyproject maps the top-level `kernels/` folder to `fastdino.kernels` (package-dir), which only an
install makes real. Without one we put the repo root on sys.path (so `fastdino` and `bench` import
from the tree) and register `fastdino.kernels` as a package whose search path is `kernels/`, so
`from fastdino.kernels import dino_loss` resolves exactly as it would installed. An installed
(editable) package wins: nothing is touched when `fastdino.kernels` already imports.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_importable() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import fastdino

    if "fastdino.kernels" in sys.modules:
        return
    try:
        import fastdino.kernels  # noqa: F401  (installed: the package-dir mapping exists)

        return
    except ImportError:
        pass
    init = REPO_ROOT / "kernels" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "fastdino.kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastdino.kernels"] = module
    spec.loader.exec_module(module)
    fastdino.kernels = module
