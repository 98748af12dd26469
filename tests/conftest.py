# The Triton interpreter must be switched on before ANY Triton kernel module is imported:
# triton.jit decides at decoration time whether a function is interpreted, and a kernel that
# calls a helper decorated before the switch fails ("Cannot call @triton.jit'd outside of the
# scope of a kernel"). Unit and e2e tests import kernel modules too (through the losses), and
# pytest collects tests/e2e before tests/kernels, so the switch lives here, at the root of the
# test tree. Only without a GPU: on a GPU machine the same tests run the compiled kernels.
# `kernels.impl=auto` still picks the reference on CPU tensors, so this changes nothing for the
# unit/e2e paths that don't ask for Triton.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
