"""Parity of a kernel against the truth, judged by the DESIGN.md rule (FlashAttention / CCE).

Per case, three runs on the same inputs:
    truth   = providers["torch"] on the inputs upcast to `case.reference_dtype` (fp32 or fp64)
    torch_lp = providers["torch"] on the inputs at the case dtype (PyTorch's own rounding error)
    kernel  = providers["triton"] on the inputs at the case dtype
The inputs are drawn once at the case dtype and *then* upcast, so input rounding is not counted as
error. Forward output and the gradient of every `grad_inputs` tensor are compared (max abs error
over all elements, in fp64).

The rule, per quantity (err_x = max|x - truth|, scale = max|truth|):
    fp32 / fp64 cases:  err_kernel <= max(rtol * scale, 2 * err_torch) + atol
                        (err_torch is 0 when the truth is fp32 too; with an fp64 truth PyTorch's
                        own fp32 error also sets the bar, as in the low-precision rule)
    bf16 / fp16 cases:  err_kernel <= 2 * err_torch + atol
                        (+ one fp16 ulp at the truth's scale for fp16 results under the Triton
                        interpreter, whose fp32 -> fp16 casts truncate; see bound_for)
A NaN or Inf in the kernel's result where the truth is finite always fails; so does a shape
mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from fastdino.kernels._utils import is_interpreter

from bench.harness import BenchCase, fresh_inputs, grad_names

LOW_PRECISION = (torch.bfloat16, torch.float16)
FACTOR = 2.0  # kernel error may be at most this multiple of PyTorch's at the same precision


@dataclass
class ParityRow:
    op: str
    case: str
    quantity: str  # "forward" or "grad:<input name>"
    dtype: str
    err_kernel: float
    err_torch: float
    scale: float  # max |truth|
    bound: float
    passed: bool
    note: str = ""

    @property
    def rel_kernel(self) -> float:
        return self.err_kernel / self.scale if self.scale > 0 else self.err_kernel


def bound_for(dtype: torch.dtype, err_torch: float, scale: float, rtol: float,
              atol: float, truncated_dtype: torch.dtype | None = None) -> float:
    """`truncated_dtype`: set under the Triton interpreter when the kernel's result is stored in
    fp16. The interpreter (3.6 and 3.9, measured) casts fp32 -> bf16/fp16 by truncation, not
    round-to-nearest, so such a result can be 1 ulp off where PyTorch is half an ulp off; the
    bound then allows one ulp of that dtype at the truth's scale. Never on a GPU, and not for bf16:
    the kernels round their bf16 stores to nearest under the interpreter (kernels/_rounding.py)."""
    if dtype in LOW_PRECISION:
        ulp = torch.finfo(truncated_dtype).eps * scale if truncated_dtype is not None else 0.0
        return FACTOR * err_torch + ulp + atol
    return max(rtol * scale, FACTOR * err_torch) + atol


def judge(kernel: torch.Tensor, torch_lp: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
          rtol: float, atol: float, interpreter: bool = False
          ) -> tuple[float, float, float, float, bool, str]:
    """(err_kernel, err_torch, scale, bound, passed, note) for one quantity."""
    if kernel is None or truth is None or torch_lp is None:
        missing = "kernel" if kernel is None else "truth" if truth is None else "torch"
        return float("nan"), float("nan"), 0.0, 0.0, False, f"no {missing} gradient"
    if kernel.shape != truth.shape:
        return (float("nan"), float("nan"), 0.0, 0.0, False,
                f"shape {tuple(kernel.shape)} != truth {tuple(truth.shape)}")
    t = truth.detach().double()
    k = kernel.detach().double()
    lp = torch_lp.detach().double()
    finite = torch.isfinite(t)
    if not bool(torch.isfinite(k)[finite].all()):
        return float("nan"), 0.0, 0.0, 0.0, False, "non-finite kernel output"
    err_k = (k - t)[finite].abs().max().item() if finite.any() else 0.0
    err_t = (lp - t)[finite].abs().max().item() if finite.any() else 0.0
    scale = t[finite].abs().max().item() if finite.any() else 0.0
    if not finite.all():  # the truth itself is inf / nan there: the kernel must agree exactly
        same = (k[~finite] == t[~finite]) | (k[~finite].isnan() & t[~finite].isnan())
        if not bool(same.all()):
            return err_k, err_t, scale, 0.0, False, "non-finite truth not reproduced"
    # bf16 stores round to nearest under the interpreter too (kernels/_rounding.py); fp16 ones
    # still truncate there
    truncated = kernel.dtype if interpreter and kernel.dtype == torch.float16 else None
    b = bound_for(dtype, err_t, scale, rtol, atol, truncated)
    return err_k, err_t, scale, b, err_k <= b, ""


def _upcast(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.is_floating_point():
            out[k] = v.detach().to(dtype).requires_grad_(v.requires_grad)
        elif torch.is_tensor(v):
            out[k] = v.detach().clone()
        else:
            out[k] = v
    return out


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(fn, inputs: dict[str, Any], names: list[str], ref_dtype: torch.dtype):
    """Forward outputs and d(sum <g_i, out_i>)/d input for every name; the cotangents g_i are a
    fixed-seed randn in `ref_dtype` cast to each output's dtype (1 for scalar losses)."""
    outs = _outputs(fn(**inputs))
    cot = []
    gen = torch.Generator().manual_seed(4321)
    for o in outs:
        g = torch.randn(o.shape, generator=gen, dtype=ref_dtype) if o.numel() > 1 else \
            torch.ones(o.shape, dtype=ref_dtype)
        cot.append(g.to(device=o.device, dtype=o.dtype))
    leaves = [inputs[n] for n in names]
    diff = [(o, g) for o, g in zip(outs, cot, strict=True) if o.requires_grad]
    grads = [None] * len(leaves)
    if leaves and diff:
        grads = torch.autograd.grad([o for o, _ in diff], leaves, [g for _, g in diff],
                                    allow_unused=True)
    return outs, list(grads)


def check_case(case: BenchCase, device: torch.device, provider: str = "triton") -> list[ParityRow]:
    base = case.make_inputs(device, case.dtype)
    names = grad_names(case, base)
    ref = case.providers["torch"]
    t_out, t_grad = _run(ref, _upcast(base, case.reference_dtype), names, case.reference_dtype)
    l_out, l_grad = _run(ref, fresh_inputs(base), names, case.reference_dtype)
    k_out, k_grad = _run(case.providers[provider], fresh_inputs(base), names,
                         case.reference_dtype)
    dtype = str(case.dtype).replace("torch.", "")
    rows = []
    quantities = [(f"forward[{i}]" if len(t_out) > 1 else "forward", k, l, t)
                  for i, (k, l, t) in enumerate(zip(k_out, l_out, t_out, strict=False))]
    quantities += [(f"grad:{n}", k, l, t) for n, k, l, t in zip(names, k_grad, l_grad, t_grad,
                                                               strict=True)]
    if len(k_out) != len(t_out):
        rows.append(ParityRow(case.op, case.name, "forward", dtype, float("nan"), float("nan"),
                              0.0, 0.0, False, f"{len(k_out)} outputs, truth has {len(t_out)}"))
    for q, k, l, t in quantities:
        res = judge(k, l, t, case.dtype, case.rtol, case.atol, is_interpreter())
        rows.append(ParityRow(case.op, case.name, q, dtype, *res))
    return rows
