# The Triton interpreter must be switched on before ANY Triton kernel module is imported:
# triton.jit decides at decoration time whether a function is interpreted, and a kernel that
# calls a helper decorated before the switch fails ("Cannot call @triton.jit'd outside of the
# scope of a kernel"). Unit and e2e tests import kernel modules too (through the losses), and
# pytest collects tests/e2e before tests/kernels, so the switch lives here, at the root of the
# test tree. Only without a GPU: on a GPU machine the same tests run the compiled kernels.
# `kernels.impl=auto` still picks the reference on CPU tensors, so this changes nothing for the
# unit/e2e paths that don't ask for Triton.
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ------------------------------------------------------------------------------------------------
# Counting what an op launches (host-bound ops: every launch and torch op costs host time, every
# node of a CUDA graph device time)


class LaunchCounter(TorchDispatchMode):
    """Inside `with LaunchCounter() as c:`, `c.launches` gets the Triton kernels launched (names,
    in order) and `c.ops` the torch ops run outside those launches (the interpreter's own tensor
    work inside a launch is not the caller's). The launchers are patched only inside the block."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []
        self.ops: list[str] = []
        self._inside = 0
        self._saved: list[tuple[type, object]] = []

    def __enter__(self):
        import triton.runtime.jit as jit

        targets = [jit.JITFunction]
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            from triton.runtime.interpreter import InterpretedFunction
            targets.append(InterpretedFunction)
        for cls in targets:
            self._saved.append((cls, vars(cls).get("run")))  # None: inherited
            cls.run = self._counted(cls.run)
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, own in self._saved:
            if own is None:
                del cls.run
            else:
                cls.run = own
        self._saved.clear()
        return super().__exit__(*exc)

    def _counted(self, real):
        def run(fn, *args, **kwargs):
            self.launches.append(fn.fn.__name__)
            self._inside += 1
            try:
                return real(fn, *args, **kwargs)
            finally:
                self._inside -= 1
        return run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._inside:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_launches():
    """`with count_launches() as c:` counts into c.launches / c.ops (see LaunchCounter)."""
    return LaunchCounter
