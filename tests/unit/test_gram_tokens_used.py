"""gram.tokens_used (masked | unmasked, img_level false only) on the reference path: the
flattened Gram of the selected patches only, MSE mean over N_sel² entries (official
`get_gram_teacher_output`: `student_patches[masks]`, `teacher_patches[masks]`). Expected values
are worked out by hand or by an explicit fp64 double loop, never by the code under test."""

import itertools
from pathlib import Path

import pytest
import torch
from fastdino.kernels.gram import gram_loss_ref

from fastdino.losses.gram_loss import GramLoss

# 2 images × 2 patches, D = 2. Flat rows: 0 = (0,0), 1 = (0,1), 2 = (1,0), 3 = (1,1).
STUDENT = [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]]
TEACHER = [[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 0.0]]]
MASKS = [[True, False], [False, True]]  # masked rows 0 and 3, unmasked rows 1 and 2


def _inputs():
    s = torch.tensor(STUDENT, dtype=torch.float64)
    t = torch.tensor(TEACHER, dtype=torch.float64)
    return s, t, torch.tensor(MASKS)


@pytest.mark.parametrize("tokens_used,expected", [
    # masked rows 0, 3: ŝ = (1,0), (0,1) -> Ĝs = I; t̂ = (1,0), (1,0) -> Ĝt = all ones.
    # Ĝs - Ĝt is -1 on the 2 off-diagonal entries: 2 / N_sel² = 2 / 4 (not 2 / (B·P)² = 2/16).
    ("masked", 0.5),
    # unmasked rows 1, 2: ŝ = (0,1), (1,0) -> Ĝs = I; t̂ = (0,1), (0,1) -> Ĝt = all ones: 2 / 4.
    ("unmasked", 0.5),
    # all 4 rows flattened: ŝ = e0, e1, e0, e1; t̂ = e0, e1, e1, e0. Ĝs[p,q] = [ŝp == ŝq],
    # Ĝt[p,q] = [t̂p == t̂q]; they differ where exactly one of rows p, q is in {2, 3} and the
    # row pair is (0,2),(0,3),(1,2),(1,3) in either order: 8 entries of ±1 -> 8 / 16.
    ("all", 0.5),
])
def test_hand_values(tokens_used, expected):
    s, t, m = _inputs()
    loss = GramLoss(img_level=False, impl="torch", tokens_used=tokens_used)(s, t, masks=m)
    assert loss.item() == pytest.approx(expected, abs=1e-15)


def _explicit_fp64(s, t, mask):
    """The definition, one entry at a time: mean over selected (p, q) of (ŝp·ŝq - t̂p·t̂q)², with
    x̂ = x / max(‖x‖, 1e-12) as F.normalize (a zero row, e.g. a masked patch that drop path
    skipped in every block of a one-block model at init, normalises to 0, not nan)."""
    rows = [(b, p) for b in range(s.shape[0]) for p in range(s.shape[1]) if mask[b][p]]
    s_hat = [[(x / x.norm().clamp_min(1e-12)).tolist() for x in img] for img in s.double()]
    t_hat = [[(x / x.norm().clamp_min(1e-12)).tolist() for x in img] for img in t.double()]
    total = 0.0
    for (b1, p1), (b2, p2) in itertools.product(rows, rows):
        gs = sum(a * c for a, c in zip(s_hat[b1][p1], s_hat[b2][p2], strict=True))
        gt = sum(a * c for a, c in zip(t_hat[b1][p1], t_hat[b2][p2], strict=True))
        total += (gs - gt) ** 2
    return total / len(rows) ** 2


@pytest.mark.parametrize("tokens_used", ["masked", "unmasked"])
def test_random_case_against_explicit_double_loop(tokens_used):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    t = s + 0.3 * torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    m = torch.rand(3, 5, generator=g) < 0.4
    sel = m if tokens_used == "masked" else ~m
    expected = _explicit_fp64(s, t, sel.tolist())
    loss_fn = GramLoss(img_level=False, impl="torch", tokens_used=tokens_used)
    assert loss_fn(s, t, masks=m).item() == pytest.approx(expected, rel=1e-12)
    # the Batch's mask_indices (= masks.flatten().nonzero()) give the same rows without a host read
    idx = m.flatten().nonzero().flatten()
    assert loss_fn(s, t, masks=m, mask_indices=idx).item() == pytest.approx(expected, rel=1e-12)


def test_gradient_only_on_selected_rows():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    m = torch.rand(2, 6, generator=g) < 0.5
    GramLoss(img_level=False, impl="torch", tokens_used="masked")(s, t, masks=m).backward()
    assert torch.all(s.grad[~m] == 0) and torch.all(s.grad[m].abs().sum(-1) > 0)


def test_empty_selection_is_zero_not_nan():
    s = torch.randn(1, 4, 3, requires_grad=True)
    loss = gram_loss_ref(s, torch.randn(1, 4, 3), img_level=False,
                         rows=torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)


def test_errors_name_the_bad_input():
    s, t, m = _inputs()
    with pytest.raises(ValueError, match="img_level"):
        GramLoss(img_level=True, tokens_used="masked")
    with pytest.raises(ValueError, match="tokens_used"):
        GramLoss(img_level=False, tokens_used="some")
    with pytest.raises(ValueError, match="img_level=False"):  # the function guards too
        gram_loss_ref(s, t, img_level=True, rows=torch.tensor([0, 3]))
    loss_fn = GramLoss(img_level=False, impl="torch", tokens_used="unmasked")
    with pytest.raises(ValueError, match="needs masks"):
        loss_fn(s, t)
    with pytest.raises(ValueError, match=r"bool \[B, P\]"):
        loss_fn(s, t, masks=m.flatten())


@pytest.mark.parametrize("tokens_used", ["masked", "unmasked"])
def test_trainer_step_selects_by_the_batch_masks(tmp_path, monkeypatch, tokens_used):
    """meta_arch wiring: one Trainer.step with gram.tokens_used; the logged gram_loss equals the
    explicit fp64 loss of exactly the patches the batch's iBOT masks select (or leave)."""
    from fastdino.config import load_config
    from fastdino.data import build_train_loader
    from fastdino.train import Trainer

    seen = {}
    real = GramLoss.forward

    def spy(self, student, teacher, *args, **kwargs):
        seen.update(student=student.detach().clone(), teacher=teacher.detach().clone(),
                    masks=kwargs.get("masks"), loss_fn=self)
        return real(self, student, teacher, *args, **kwargs)

    monkeypatch.setattr(GramLoss, "forward", spy)
    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    cfg = load_config(smoke, ["data.num_workers=0", "data.batch_size_per_gpu=2", "model.depth=1",
                              "data.loader=torch", "dino.head.n_prototypes=64",
                              "ibot.head.n_prototypes=64", "kernels.impl=torch",
                              f"train.output_dir={tmp_path / 'run'}", "train.resume=none",
                              "gram.use=true", "gram.ema_teacher=true", "gram.img_level=false",
                              f"gram.tokens_used={tokens_used}"])
    trainer = Trainer(cfg)
    batch = next(build_train_loader(cfg, 0, 1, 0)).to(trainer.info.device)
    logged = trainer.step(0, batch)
    assert seen["loss_fn"].tokens_used == tokens_used
    assert torch.equal(seen["masks"], batch.masks) and batch.masks.any() and (~batch.masks).any()
    sel = batch.masks if tokens_used == "masked" else ~batch.masks
    expected = _explicit_fp64(seen["student"], seen["teacher"], sel.tolist())
    assert float(logged["gram_loss"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("compute_dtype,dtype", [("fp32", torch.float32),
                                                 ("bf16", torch.bfloat16)])
def test_gram_compute_dtype_sets_the_patches_dtype(tmp_path, monkeypatch, compute_dtype, dtype):
    """gram.compute_dtype: the student and teacher patches enter the Gram loss in that dtype
    (fp32, the official cast, by default; bf16 for the tensor-core kernels) and the step's loss
    is finite either way; other values are rejected by name."""
    from fastdino.config import load_config
    from fastdino.data import build_train_loader
    from fastdino.losses.gram_loss import GramLoss
    from fastdino.train import Trainer

    seen = {}
    real = GramLoss.forward

    def spy(self, student, teacher, *args, **kwargs):
        seen.update(student=student.dtype, teacher=teacher.dtype)
        return real(self, student, teacher, *args, **kwargs)

    monkeypatch.setattr(GramLoss, "forward", spy)
    smoke = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
    overrides = ["data.num_workers=0", "data.batch_size_per_gpu=2", "model.depth=1",
                 "data.loader=torch", "dino.head.n_prototypes=64", "ibot.head.n_prototypes=64",
                 "kernels.impl=torch", f"train.output_dir={tmp_path / 'run'}",
                 "train.resume=none", "gram.use=true", "gram.ema_teacher=true"]
    cfg = load_config(smoke, overrides + [f"gram.compute_dtype={compute_dtype}"])
    trainer = Trainer(cfg)
    batch = next(build_train_loader(cfg, 0, 1, 0)).to(trainer.info.device)
    logged = trainer.step(0, batch)
    assert seen == {"student": dtype, "teacher": dtype}
    assert torch.isfinite(torch.as_tensor(float(logged["gram_loss"])))
    with pytest.raises(ValueError, match="gram.compute_dtype"):
        load_config(smoke, overrides + ["gram.compute_dtype=fp16"])
