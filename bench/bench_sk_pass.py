"""One streaming pass of the Sinkhorn-Knopp teacher (kernels/sinkhorn.py, KERNELS.md §3): the A/B
of the row-pass variants (ROW_VARIANTS) against one MODE-1 column pass as the yardstick.

    providers: torch         the row pass in PyTorch (logsumexp of t·inv_temp - col_shift)
               torch_compile (added by the harness) Inductor's fusion of it
               triton        teacher_row_pass at DEFAULT_ROW_VARIANT
               row:<name>    teacher_row_pass at each ROW_VARIANTS entry (the default included,
                             under its name too); one row launch + the split-merge launch
               col_mode1     one MODE-1 column pass (teacher_col_pass, statistics returned, not
                             finalised): the other half of an SK iteration, 83 % of the copy on an
                             H200 (2026-11-26), the bar the row pass is held to
               col_mode0     the first column pass (online column LSE: no shift known yet)
               row_first     the first row pass as sinkhorn_knopp runs it at this shape (on the
                             state after the first column pass: the loose bound -log(K/N) with
                             the redo launch for teachers >= LOOSE_BOUND_MIN_BYTES, else the
                             default's fallback); timed only (--check compares the passes of
                             the second iteration)
    GB/s = N·K·e / time (one read of the teacher logits; the col_shift / row-bound vectors and
    the [N, splits] partials are not counted), against the measured D2D copy.

The inputs are the state a row pass of the second SK iteration sees (τ_t = 0.07, bf16 logits of
N(0,1)): col_shift after two column passes, the previous row_shift as the fixed-shift variants'
bound, log(K/N). So every variant runs itself (`params.row_plans` records what each one ran:
variant, tile, K split or row groups). The teacher has no gradient: outputs pass through an
identity autograd node on a dummy leaf so the harness' bwd modes run (and time nothing); time
with `--modes fwd`. --check judges every row provider against `torch` (forward only).

Shapes: bench/registry.py, the ViT-L iBOT teacher (ibot_rows × ibot_K = 3,771 × 65,536); --quick
is that shape in bf16 alone (one row pass without entropy). The full run adds the last pass (with
entropy: the providers return [2, N], one small stack launch more), fp32 and the 7B iBOT shape.
Without a GPU: interpreter-sized (37 × 2048), same code paths.
"""

from __future__ import annotations

import math

import torch
from fastdino.kernels import sinkhorn as sk

from bench.harness import BenchCase
from bench.registry import get

TEACHER_TEMP = 0.07  # τ_t after warm-up (SPEC.md §1.3)
FORMULA = "fwd N·K·e: one read of the teacher logits (vectors and split partials not counted)"


class _ForwardOnly(torch.autograd.Function):
    """Identity on `out`, made a function of the dummy leaf `anchor`: a view, no kernel, no
    gradient (backward returns None)."""

    @staticmethod
    def forward(ctx, anchor, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _sk_state(t: torch.Tensor, inv_temp: float) -> dict[str, torch.Tensor]:
    """col_shift, row bound and log(K/N) as the second SK row pass sees them (fp32 torch, the
    formulas of kernels/sinkhorn.py: column LSE, row LSE, one column update)."""
    n, k = t.shape
    log_scale = torch.full((1,), math.log(k / n), device=t.device)
    x = t.float() * inv_temp
    col1 = torch.logsumexp(x, dim=0) + log_scale
    row = torch.logsumexp(x - col1, dim=1)
    col = col1 + torch.log(torch.exp(x - col1 - row[:, None]).sum(dim=0).clamp_min(sk._TINY))
    col = col + log_scale
    return {"col_shift": col.contiguous(), "row_bound": row.contiguous(), "log_scale": log_scale,
            "col_shift1": col1.contiguous()}


def _plan_text(t: torch.Tensor, name: str, entropy: bool) -> str:
    """What variant `name` launches on t (fallbacks resolved; on a GPU after its first launch,
    with the measured occupancy)."""
    p = sk._row_plan(t, name, has_bound=True, flags=(False, entropy))
    v = p.variant
    occ = sk._OCCUPANCY.get(sk._occupancy_key(v, t, (False, entropy)))
    return (f"{v.name} {p.block_n}x{p.block_k} fast={int(p.fast)} splits={p.n_splits} "
            f"k_per_split={p.k_per_split} {'groups' if v.lockstep else 'row_blocks'}={p.n_groups}"
            f" programs={p.n_splits * p.n_groups} per_sm={occ or 'est ' + str(v.programs_per_sm)}"
            f"{' one_wave' if v.one_wave else ''}")


def _case(label: str, n: int, k: int, dtype: torch.dtype, entropy: bool,
          shape_from: str) -> BenchCase:
    inv_temp = 1.0 / TEACHER_TEMP

    def make_inputs(device, dt):
        g = torch.Generator().manual_seed(0)
        t = torch.randn(n, k, generator=g).to(device=device, dtype=dt)
        anchor = torch.zeros((), device=device, requires_grad=True)
        return {"t": t, **_sk_state(t, inv_temp), "anchor": anchor}

    def ref(t, col_shift, row_bound, log_scale, anchor, col_shift1=None):
        y = t.float() * inv_temp - col_shift
        lse = torch.logsumexp(y, dim=1)
        if entropy:
            p = torch.exp(y - lse[:, None])
            lse = torch.stack((lse, lse - (p * y).sum(dim=1)))
        return _ForwardOnly.apply(anchor, lse)

    def row(variant: str | None):
        calls = []

        def run(t, col_shift, row_bound, log_scale, anchor, col_shift1=None):
            lse, ent, _ = sk.teacher_row_pass(t, col_shift, inv_temp, False, entropy, variant,
                                              row_bound, log_scale)
            if t.is_cuda and len(calls) < 2:  # the grid after the occupancy is known (2nd call)
                calls.append(1)
                if len(calls) == 2:
                    print(f"# sk_pass {label} {variant or 'triton'}: "
                          f"{_plan_text(t, variant or sk.DEFAULT_ROW_VARIANT, entropy)}",
                          flush=True)
            return _ForwardOnly.apply(anchor, torch.stack((lse, ent)) if entropy else lse)
        return run

    def col_mode1(t, col_shift, row_bound, log_scale, anchor, col_shift1=None):
        _, s = sk.teacher_col_pass(t, col_shift, row_bound, log_scale, inv_temp,
                                   sk._MODE_SUMEXP, False)
        return _ForwardOnly.apply(anchor, s)

    def col_mode0(t, col_shift, row_bound, log_scale, anchor, col_shift1=None):
        m, d = sk.teacher_col_pass(t, col_shift, row_bound, log_scale, inv_temp, sk._MODE_LSE,
                                   False)
        return _ForwardOnly.apply(anchor, m + torch.log(d))

    def row_first(t, col_shift, row_bound, log_scale, anchor, col_shift1=None):
        loose = not entropy and t.numel() * t.element_size() >= sk.LOOSE_BOUND_MIN_BYTES
        bound = (sk._zeros(t.shape[0], t.device), log_scale) if loose else (None, None)
        lse, ent, _ = sk.teacher_row_pass(t, col_shift1, inv_temp, False, entropy, None, *bound,
                                          loose_bound=loose)
        return _ForwardOnly.apply(anchor, torch.stack((lse, ent)) if entropy else lse)

    meta = torch.empty(n, k, device="meta", dtype=dtype)
    plans = {name: _plan_text(meta, name, entropy) for name in sk.ROW_VARIANTS}
    providers = {"torch": ref, "triton": row(None)}
    providers.update({f"row:{name}": row(name) for name in sk.ROW_VARIANTS})
    providers.update(col_mode1=col_mode1, col_mode0=col_mode0, row_first=row_first)
    e = torch.finfo(dtype).bits // 8
    tag = str(dtype).replace("torch.", "")
    return BenchCase(
        op="sk_pass", name=f"{label}-{'row_ent' if entropy else 'row'}-{tag}",
        params={"N": n, "K": k, "entropy": entropy, "teacher_temp": TEACHER_TEMP,
                "shape_from": shape_from, "default_row_variant": sk.DEFAULT_ROW_VARIANT,
                "row_plans": plans},
        dtype=dtype, make_inputs=make_inputs, providers=providers, grad_inputs=[],
        bytes_fwd=n * k * e, bytes_bwd=None, formula=FORMULA, atol=1e-5,
        extra={"check_providers": ["triton"] + [f"row:{v}" for v in sk.ROW_VARIANTS]})


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    if not on_gpu:  # interpreter-sized: K a multiple of every variant's tile, a partial row block
        out = [_case("cpu", 37, 2048, torch.bfloat16, False, "interpreter size")]
        if not quick:
            out += [_case("cpu", 37, 2048, torch.float32, True, "interpreter size")]
        return out
    s = get("vitl16")
    out = [_case("vitl16-ibot", s.ibot_rows, s.ibot_K, torch.bfloat16, False, "vitl16")]
    if quick:
        return out
    out.append(_case("vitl16-ibot", s.ibot_rows, s.ibot_K, torch.bfloat16, True, "vitl16"))
    out.append(_case("vitl16-ibot", s.ibot_rows, s.ibot_K, torch.float32, False, "vitl16"))
    b = get("vit7b16")
    out.append(_case("vit7b16-ibot", b.ibot_rows, b.ibot_K, torch.bfloat16, False, "vit7b16"))
    return out
