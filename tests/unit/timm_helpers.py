"""Import timm for the interop parity tests on a machine without a working torchvision.

timm's model code (the DINOv3 `Eva` included) never calls torchvision, but `import timm` reaches
torchvision names at import time (FrozenBatchNorm2d, transforms, InterpolationMode members). PyPI's
torchvision is built against CUDA torch and cannot import beside the CPU wheel CI uses, so while
timm is imported each `torchvision.*` module is an empty stand-in whose attributes are inert
classes. The stand-ins are removed from sys.modules afterwards, so nothing else sees a
torchvision. Where torchvision imports (a GPU machine), timm is imported as is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import pytest


class _Inert(type):
    def __getattr__(cls, name):  # InterpolationMode.NEAREST etc.: distinct dummy members
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {})


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Inert(name, (), {})

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def import_timm():
    # not importorskip: importing timm is what needs the stand-ins
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (scripts/setup.sh installs it with --no-deps)")
    if "timm" in sys.modules:
        return sys.modules["timm"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or PyPI's CUDA build beside a CPU torch
        _forget_torchvision()
    else:
        import timm

        return timm
    finder = _StandIn()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        _forget_torchvision()
    return timm


def _forget_torchvision() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
