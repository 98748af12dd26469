"""Host-side cost of one training step: no host sync besides the clip's single read, no copy of
the patch tokens to pick the masked ones, one EMA pass per chunk built from pairs made once.

A host sync (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero`, a boolean-mask
index) stops the host until the GPU has drained its queue: the GPU then idles while the host
launches the next work. The step has one by design (parallel.py `clip_grad_norms`: the norms,
the non-finite check and the stop flag in one read, needed to decide the step); anything else
between two log steps is a regression. CPU has no device to wait for, so the reads are caught
where they are made: Python-level tensor reads and the dispatcher's `_local_scalar_dense`,
`nonzero` and boolean indexing, outside the Triton interpreter's own kernel work.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdino.config import load_config
from fastdino.data import build_train_loader

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
SMALL = ["data.num_workers=0", "data.batch_size_per_gpu=4", "model.depth=2", "data.loader=torch",
         "dino.head.n_prototypes=128", "ibot.head.n_prototypes=128", "train.resume=none"]

# Python-level reads of a tensor's values on the host (each one a device sync on a GPU)
_HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# dispatcher ops that read values (or data-dependent shapes) on the host
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
             "unique_consecutive", "repeat_interleave"}


def _where() -> str:
    """The innermost fastdino / kernels frame of the current stack (file:line), or torch's."""
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "/fastdino/" in f.filename or "/kernels/" in f.filename]
    f = (ours or frames)[-1]
    return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} ({f.name})"


def _allowed(stack: list[traceback.FrameSummary]) -> bool:
    """The step's one intended read (parallel.py clip_grad_norms), and torch's CPU AdamW, which
    reads its CPU `step` counters (on CUDA the trainer's AdamW is fused, counters on device)."""
    return any(f.name == "clip_grad_norms" and f.filename.endswith("parallel.py") for f in stack) \
        or any("/torch/optim/" in f.filename for f in stack)


def _sync_recorder(launch_counter_cls):
    """A LaunchCounter (tests/conftest.py) that also records every host read outside kernel
    launches: `rec.reads` lists where each was made."""

    class SyncRecorder(launch_counter_cls):
        def __init__(self):
            super().__init__()
            self.reads: list[str] = []
            self._patched: list[tuple[str, object]] = []

        def _record(self):
            if self._inside:  # the Triton interpreter's own tensor work inside a launch
                return
            stack = traceback.extract_stack()
            if not _allowed(stack):
                self.reads.append(_where())

        def __enter__(self):
            for name in _HOST_READS:
                real = getattr(torch.Tensor, name)
                self._patched.append((name, vars(torch.Tensor).get(name)))  # None: inherited

                def read(t, *a, _real=real, **k):
                    self._record()
                    return _real(t, *a, **k)

                setattr(torch.Tensor, name, read)
            return super().__enter__()

        def __exit__(self, *exc):
            for name, own in self._patched:
                if own is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, own)
            self._patched.clear()
            return super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                getattr(i, "dtype", None) == torch.bool for i in (args[1] or ()))
            if name in _SYNC_OPS or bool_index:
                self._record()
            return super().__torch_dispatch__(func, types, args, kwargs)

    return SyncRecorder


def _trainer(tmp_path, *overrides):
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path / 'run'}", *overrides])
    trainer = Trainer(cfg)
    loader = build_train_loader(cfg, 0, 1, 0)
    batches = [next(loader).to(trainer.info.device) for _ in range(trainer.gas)]
    return trainer, batches


@pytest.mark.parametrize("overrides", [
    ["kernels.impl=torch"],
    ["kernels.impl=torch", "dino.centering=softmax", "deepspeed.gradient_accumulation_steps=2"],
    ["kernels.impl=torch", "gram.use=true", "gram.it_load_ema_teacher=0", "gram.img_level=false",
     "gram.tokens_used=unmasked", "koleo.distributed=true", "koleo.group_size=4"],
    ["kernels.impl=triton", "gram.use=true", "gram.ema_teacher=true"],
], ids=["sinkhorn", "softmax-gas2", "gram-unmasked-koleo-dist", "triton-gram"])
def test_training_step_reads_nothing_on_the_host_but_the_clip(tmp_path, overrides,
                                                              count_launches):
    """Between two log steps a step reads no tensor value on the host except the clip's one
    read (teacher targets, student forward, losses, backward, EMA, centers, Gram teacher)."""
    trainer, batches = _trainer(tmp_path, *overrides)
    assert trainer.step(0, batches) is not None  # first step: lazily built caches, plans
    with _sync_recorder(count_launches)() as rec:
        values = trainer.step(1, batches)
    assert values is not None
    assert rec.reads == [], f"host reads in a training step: {rec.reads}"


def test_recorder_sees_a_host_read(count_launches):
    """The check above is not vacuous: each kind of host read is caught."""
    x = torch.arange(4.0)
    for read in (lambda: float(x.sum()), lambda: bool(x[1] > 0), lambda: x[0].item(),
                 lambda: x.tolist(), lambda: x.cpu(), lambda: x[x > 1], lambda: x.nonzero(),
                 lambda: int(x[2])):
        with _sync_recorder(count_launches)() as rec:
            read()
        assert rec.reads, "a host read went unseen"
    assert not set(_HOST_READS) & set(vars(torch.Tensor))  # torch.Tensor restored as it was


def test_a_read_in_the_step_is_caught(tmp_path, monkeypatch, count_launches):
    """...and so is one added to the step (a loss logged with float() at every step)."""
    from fastdino.meta_arch import SSLMetaArch

    trainer, batches = _trainer(tmp_path, "kernels.impl=torch")
    real = SSLMetaArch.compute_losses

    def logged(self, *a):
        loss, terms = real(self, *a)
        float(terms["dino_loss" if "dino_loss" in terms else "total_loss"])
        return loss, terms

    monkeypatch.setattr(SSLMetaArch, "compute_losses", logged)
    with _sync_recorder(count_launches)() as rec:
        trainer.step(0, batches)
    assert len(rec.reads) == 2, rec.reads  # __float__, then its _local_scalar_dense


# ------------------------------------------------------------------------------- masked tokens
def _strided_patches(n=6, prefix=5, n_patches=16, d=8):
    """[n, N, D] patch tokens as the ViT returns them: a slice of [n, prefix + N, D]."""
    torch.manual_seed(0)
    base = torch.randn(n, prefix + n_patches, d, requires_grad=True)
    return base, base[:, prefix:]


def test_masked_tokens_same_values_and_gradient_without_a_copy(count_launches):
    from fastdino.meta_arch import masked_tokens

    base, patches = _strided_patches()
    assert not patches.is_contiguous()
    idx = torch.tensor([0, 3, 17, 40, 63, 64, 95])
    with count_launches() as c:
        got = masked_tokens(patches, idx)
    assert "clone" not in c.ops and "copy_" not in c.ops, c.ops  # no [n, N, D] copy
    want = patches.flatten(0, 1).index_select(0, idx)  # what it replaces
    assert torch.equal(got, want)
    w = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * w).sum(), base)
    (g_want,) = torch.autograd.grad((want * w).sum(), base)
    assert torch.equal(g_got, g_want)
    assert masked_tokens(patches, idx[:0]).shape == (0, 8)  # no masked token
    contiguous = patches.detach().contiguous()
    assert torch.equal(masked_tokens(contiguous, idx), want)


class _Shapes(TorchDispatchMode):
    """Records (op, output shape) of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if torch.is_tensor(out) else None
        self.ops.append((func.overloadpacket.__name__, shape))
        return out


def test_student_and_teacher_forward_copy_no_patch_tokens(tmp_path):
    """Student.forward / teacher_forward pick the masked tokens without a [2B, N, D] clone."""
    trainer, (batch,) = _trainer(tmp_path, "kernels.impl=torch")
    student, teacher = trainer.arch.student, trainer.arch.teacher
    with _Shapes() as c:
        s = student(batch.global_crops, batch.local_crops, batch.masks, batch.mask_indices)
        t = teacher.teacher_forward(batch.global_crops, batch.mask_indices)
    patches = tuple(s["global_patches"].shape)  # [2B, N, D], a strided slice
    assert not s["global_patches"].is_contiguous()
    copies = [op for op in c.ops if op[1] == patches and op[0] in ("clone", "contiguous", "copy_")]
    assert copies == [], copies
    flat = s["global_patches"].flatten(0, 1).index_select(0, batch.mask_indices)
    torch.testing.assert_close(s["ibot_logits"], student.ibot_head(flat), rtol=0, atol=0)
    flat_t = t["patches"].flatten(0, 1).index_select(0, batch.mask_indices)
    torch.testing.assert_close(t["patch_logits"], teacher.ibot_head(flat_t), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ EMA
def _pair(n=50_000):
    torch.manual_seed(0)
    t, s = nn.Linear(n // 100, 100), nn.Linear(n // 100, 100)
    with torch.no_grad():
        for a, b in zip(t.parameters(), s.parameters(), strict=True):
            b.copy_(a + 1e-3 * torch.randn_like(a))  # a student near its teacher, as in training
    return t, s


@pytest.mark.parametrize("m", [0.992, 0.994, 0.999, 0.9999])
def test_ema_within_fp32_rounding_of_the_exact_update(m):
    """One lerp: within half an ulp of the exact m·t + (1-m)·s (fp64), and within one ulp of
    the official mul_ + add_ (which rounds twice: up to ~1.1 ulp off)."""
    from fastdino.ema import ema_update

    t, s = _pair()
    t0 = [p.detach().double().clone() for p in t.parameters()]
    official = [p.detach().clone() for p in t.parameters()]
    torch._foreach_mul_(official, m)
    torch._foreach_add_(official, [p.detach() for p in s.parameters()], alpha=1 - m)
    ema_update(t, s, m)
    eps = torch.finfo(torch.float32).eps
    for p, a, b, o in zip(t.parameters(), t0, s.parameters(), official, strict=True):
        exact = m * a + (1 - m) * b.detach().double()
        ulp = eps * torch.maximum(a.abs(), b.detach().double().abs())
        assert ((p.detach().double() - exact).abs() <= 0.5 * ulp + 1e-30).all()
        assert ((p.detach().double() - o.double()).abs() <= ulp + 1e-30).all()


def test_ema_one_pass_per_chunk(count_launches):
    """One foreach op per chunk (not a mul and an add), no cast of values already in the
    teacher's dtype."""
    from fastdino.ema import EMAPlan, ema_update

    t, s = _pair()
    plan = EMAPlan(t, s, chunk_numel=100)  # weight (50,000) and bias (100): 2 chunks
    assert len(plan.chunks) == 2
    with count_launches() as c:
        ema_update(t, s, 0.99, plan=plan)
    assert c.ops == ["_foreach_lerp_"] * 2, c.ops  # (no per-parameter detach or cast either)


def test_trainer_pairs_teacher_and_student_once(tmp_path, monkeypatch):
    """The EMA's name pairing (two named_parameters walks, ~2-5 ms at ViT-L) is built at the
    first step only, and the later steps still update the teacher by the formula."""
    from fastdino import ema

    trainer, (batch,) = _trainer(tmp_path, "kernels.impl=torch")
    calls = []
    real = ema._paired
    monkeypatch.setattr(ema, "_paired", lambda *a: (calls.append(1), real(*a))[1])
    trainer.step(0, batch)
    assert len(calls) == 1
    teacher = {n: p.detach().double() for n, p in trainer.arch.teacher.named_parameters()}
    trainer.step(1, batch)
    assert len(calls) == 1, "the EMA re-paired teacher and student parameters at a later step"
    m = trainer.sched.at(1).momentum
    student = dict(trainer.engine.module.named_parameters())
    eps = torch.finfo(torch.float32).eps
    for n, p in trainer.arch.teacher.named_parameters():
        t0, s = teacher[n], student[n].detach().double()
        if student[n].requires_grad:  # within half an ulp of the exact EMA (fp64)
            ulp = eps * torch.maximum(t0.abs(), s.abs())
            assert ((p.detach().double() - (m * t0 + (1 - m) * s)).abs() <= 0.5 * ulp).all(), n


def test_a_log_step_averages_the_terms_with_one_read(tmp_path, count_launches):
    """The logged terms of a log step are averaged over the ranks with one stack, one all-reduce
    and one read (`.tolist()`), not a `float()` sync per term (~20 per log step)."""
    trainer, batches = _trainer(tmp_path, "kernels.impl=torch")
    values = trainer.step(0, batches)
    with _sync_recorder(count_launches)() as rec:
        out = trainer._average(values)
    assert len(rec.reads) == 1 and "_average" in rec.reads[0], rec.reads
    tensors = [k for k, x in values.items() if torch.is_tensor(x)]
    assert len(tensors) > 5  # several device terms: one read for all of them
    for k in tensors:
        assert out[k] == pytest.approx(float(values[k]), rel=1e-12), k
