"""fastdino Triton kernels, one op per file (DESIGN.md "Kernels: one contract for every op").

Each module holds, in order: `<op>_ref` (pure PyTorch, fp32, the truth), the `@triton.jit`
kernels, the launchers, the `torch.library` registration, `<Op>Fn` and the functional `<op>()`.
Import the modules directly (`from fastdino.kernels import dino_loss`); importing this package
does not import Triton. The modules import without triton too (kernels/_triton.py: CPU-only,
macOS and Windows torch wheels ship none): their references and ops work, a launch raises.
"""
