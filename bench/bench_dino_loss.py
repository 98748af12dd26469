"""DINO CLS and iBOT patch loss benchmark cases (KERNELS.md §2-3, issue 5): teacher
normalisation (Sinkhorn-Knopp, 3 iterations) plus the student soft cross-entropy, as one
training-step call: `teacher_targets` then the loss, differentiated in the student logits.

    providers: torch = DINOLoss / iBOTPatchLoss(impl="torch") (the references of
               kernels/sinkhorn.py and kernels/dino_loss.py); torch_compile (added by the
               harness); triton = the same modules with impl="triton" (fused kernels); the DINO
               case takes the student logits of all crops in one tensor and calls
               `forward_joint`, as the trainer does (triton_two_calls: `forward` on its views,
               i.e. two per-row soft-CE calls and the means in torch); the iBOT case's
               triton_rows runs the per-row form with the weighting in torch (the module's path
               before `dino_soft_ce_sum`)
    GB/s = model bytes / time, against the measured D2D copy (QuACK's "model memory
    throughput"), e = element size of the logits:
        fwd  (N_t + R)·K·e       read the teacher and the student logits once
        bwd  (N_t + 2R)·K·e      read both again, write dS
    What the Triton path actually moves from HBM is recorded next to it in params
    (bytes_fwd_triton / bytes_bwd_triton; GB/s of the kernels themselves = those / time):
        iBOT fwd (6·N_t + N_t + R)·K·e: 6 Sinkhorn-Knopp passes over the teacher
                 (kernels/sinkhorn.py) + the student forward (s and t); bwd = the model bytes
        DINO fwd = the model bytes, bwd 2R·K·e: its teacher (2B × K, 16.8 MB bf16) stays in L2
                 after the first pass (do_bench flushes L2 before every call: that read is HBM)
    so the iBOT forward can reach at most 2/8 of the copy bandwidth in model GB/s, the
    backward and the DINO case all of it.

Shapes come from bench/registry.py: DINO rows R = (2 + n_local)·B student CLS against N_t = 2B
teacher rows, K = dino_K; iBOT R = N_t = ibot_rows masked tokens, K = ibot_K, with the exact
per-image counts of the v3 collate (the weights 1/n_masked) and n_images = 2B.
"""

from __future__ import annotations

import torch
from fastdino.kernels import dino_loss as dl

from bench.harness import BenchCase
from bench.registry import DinoShape, get
from fastdino.losses.dino_clstoken_loss import DINOLoss
from fastdino.losses.ibot_patch_loss import iBOTPatchLoss, own_row_index

TEACHER_TEMP = 0.07  # τ_t after warm-up (SPEC.md §1.3)
SK_PASSES = 6  # streaming reads of the teacher by the Triton Sinkhorn-Knopp (3 iterations)
MODELS = ("vits16", "vitl16", "vit7b16")
FORMULA = ("model bytes fwd (N_t+R)·K·e, bwd (N_t+2R)·K·e (read teacher + student; bwd also "
           "writes dS); Triton HBM bytes in params.bytes_*_triton")


def _randn(shape: tuple[int, ...], seed: int, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def masked_counts(shape: DinoShape) -> list[int]:
    """Masked tokens per image of the 2B global crops, as the v3 collate draws them (SPEC.md
    §1.4): half the images masked with ratios linspace(0.1, 0.5)[1:], the others 0."""
    n_imgs = int(2 * shape.batch_per_gpu * 0.5)
    n, step = shape.global_patches, (0.5 - 0.1) / n_imgs
    counts = [int(n * (0.1 + step * (i + 1))) for i in range(n_imgs)]
    return counts + [0] * (2 * shape.batch_per_gpu - n_imgs)


def _dino_case(name: str, b: int, n_local: int, k: int, dtype: torch.dtype,
               shape_from: str) -> BenchCase:
    n_t, r = 2 * b, (2 + n_local) * b

    def make_inputs(device, dt):  # the student's DINO logits of all crops, as the head gives them
        return {"teacher": _randn((n_t, k), 0, device, dt),
                "student": _randn((r, k), 1, device, dt).requires_grad_()}

    def provider(impl: str, joint: bool = True):
        loss = DINOLoss(k, impl=impl)

        def run(teacher, student):
            targets = loss.teacher_targets(teacher, TEACHER_TEMP)
            if joint:  # as the trainer calls it
                return loss.forward_joint(student, targets)["dino_loss"]
            return loss(student[:n_t], student[n_t:], targets)["dino_loss"]
        return run

    e = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="dino_loss", name=name,
        params={"loss": "dino", "B": b, "n_local": n_local, "R": r, "N_t": n_t, "K": k,
                "centering": "sinkhorn_knopp", "shape_from": shape_from,
                "bytes_fwd_triton": (n_t + r) * k * e, "bytes_bwd_triton": 2 * r * k * e},
        dtype=dtype, make_inputs=make_inputs,
        # triton_two_calls: one soft-CE call per crop type on views of the logits (what the
        # trainer ran before forward_joint; the views' backward fills a zeroed [R, K] each)
        providers={"torch": provider("torch"), "triton": provider("triton"),
                   "triton_two_calls": provider("triton", joint=False)},
        grad_inputs=["student"],
        bytes_fwd=(n_t + r) * k * e, bytes_bwd=(n_t + 2 * r) * k * e, formula=FORMULA,
        atol=1e-5)


def _ibot_case(name: str, counts: list[int], k: int, dtype: torch.dtype,
               shape_from: str) -> BenchCase:
    m, n_images = sum(counts), len(counts)

    def make_inputs(device, dt):
        w = torch.cat([torch.full((c,), 1.0 / c) for c in counts if c]).to(device)
        return {"teacher": _randn((m, k), 3, device, dt),
                "student": _randn((m, k), 4, device, dt).requires_grad_(),
                "masks_weight": w}

    def provider(impl: str, rows: bool = False):
        loss = iBOTPatchLoss(k, impl=impl)

        def run(teacher, student, masks_weight):
            targets = loss.teacher_targets(teacher, TEACHER_TEMP, m)
            if rows:  # per-row losses, weighted and summed in torch (three more kernels)
                r = dl.dino_soft_ce(student, targets, own_row_index(m, student.device),
                                    loss.student_temp)
                return (r * masks_weight.float()).sum() / n_images
            return loss(student, targets, masks_weight, n_images=n_images)
        return run

    e = torch.finfo(dtype).bits // 8
    return BenchCase(
        op="dino_loss", name=name,
        params={"loss": "ibot", "R": m, "N_t": m, "K": k, "n_images": n_images,
                "centering": "sinkhorn_knopp", "shape_from": shape_from,
                "bytes_fwd_triton": (SK_PASSES + 2) * m * k * e, "bytes_bwd_triton": 3 * m * k * e},
        dtype=dtype, make_inputs=make_inputs,
        providers={"torch": provider("torch"), "triton": provider("triton"),
                   "triton_rows": provider("triton", rows=True)},
        grad_inputs=["student"], bytes_fwd=2 * m * k * e, bytes_bwd=3 * m * k * e,
        formula=FORMULA, atol=1e-5)


def cases(quick: bool, on_gpu: bool) -> list[BenchCase]:
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    if not on_gpu:  # interpreter-sized: odd K, few rows, the same code paths
        out = []
        for dt in ([torch.float32] if quick else [torch.float32, torch.bfloat16]):
            tag = str(dt).replace("torch.", "")
            out.append(_dino_case(f"dino-cpu-odd-{tag}", 2, 2, 1000, dt, "odd size"))
            out.append(_ibot_case(f"ibot-cpu-odd-{tag}", [4, 0, 3, 0], 1000, dt, "odd size"))
        return out
    # models whose loss shapes coincide (ViT-S and ViT-L share B, crops and K) are run once
    same: dict[tuple, list[str]] = {}
    for model in (("vitl16",) if quick else MODELS):
        s = get(model)
        key = (s.batch_per_gpu, s.n_local, s.dino_K, s.ibot_K, s.global_patches)
        same.setdefault(key, []).append(model)
    out = []
    for models in same.values():
        s, label = get(models[-1]), "=".join(models)
        counts = masked_counts(s)
        assert sum(counts) == s.ibot_rows, (label, sum(counts), s.ibot_rows)
        for dt in dtypes:
            tag = str(dt).replace("torch.", "")
            out.append(_dino_case(f"{s.name}-dino-{tag}", s.batch_per_gpu, s.n_local, s.dino_K,
                                  dt, label))
            out.append(_ibot_case(f"{s.name}-ibot-{tag}", counts, s.ibot_K, dt, label))
    return out
