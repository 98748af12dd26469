"""fastdino Triton kernels, one op per file (DESIGN.md "Kernels: one contract for every op").

Each module holds, in order: `<op>_ref` (pure PyTorch, fp32, the truth), the `@triton.jit`
kernels, the launchers, the `torch.library` registration, `<Op>Fn` and the functional `<op>()`.
Import the modules directly (`from fastdino.kernels import dino_loss`); importing this package
does not import Triton.
"""
