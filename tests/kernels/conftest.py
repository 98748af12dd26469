# The Triton interpreter must be switched on before any Triton kernel module is imported, so it is
# set here, at collection time of tests/kernels, and only when no GPU is present (on a GPU machine
# the same tests run the compiled kernels).
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
