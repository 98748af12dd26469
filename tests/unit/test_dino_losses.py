"""The DINO and iBOT loss references (SPEC.md §1.1-§1.4): Sinkhorn-Knopp marginals and overflow
guard, the DINO crop pairing and 2/18 - 16/18 weights against a hand-written loop over crop
pairs, the iBOT per-image weights and 2B normaliser, softmax centering's lagged EMA center.
Everything here runs the torch references (impl="torch"), on CPU, in well under a second."""

from __future__ import annotations

import math

import pytest
import torch
from fastdino.kernels.sinkhorn import TeacherTargets, sinkhorn_knopp_ref, softmax_center_ref

from fastdino.losses.dino_clstoken_loss import DINOLoss
from fastdino.losses.ibot_patch_loss import iBOTPatchLoss

TAU_S = 0.1


def _official_sk_fp64(t: torch.Tensor, temp: float, iters: int, n_total: float) -> torch.Tensor:
    """The official DINOv3 algorithm, literally (no max shift), in float64 so that t/τ up to
    ~700 does not overflow: the independent truth for the shifted fp32 reference."""
    Q = torch.exp(t.double() / temp).t()
    K = Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= n_total
    Q *= n_total
    return Q.t()


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sk_marginals():
    torch.manual_seed(0)
    n, k = 24, 40
    t = torch.randn(n, k)
    # converged: every sample sums to 1, every prototype carries N/K
    p = sinkhorn_knopp_ref(t, 0.5, n_iterations=300)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(dim=0), torch.full((k,), n / k), atol=1e-4, rtol=0)
    # 3 iterations (the recipe): samples exact, prototypes close to N/K and much closer than
    # the plain softmax the iterations start from
    p3 = sinkhorn_knopp_ref(t, 0.5, n_iterations=3)
    torch.testing.assert_close(p3.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    err3 = (p3.sum(dim=0) / (n / k) - 1).abs().max()
    err0 = (torch.softmax(t / 0.5, -1).sum(dim=0) / (n / k) - 1).abs().max()
    assert err3 < 0.1 and err3 < err0 / 5


@pytest.mark.parametrize("temp", [0.04, 0.1])
def test_sk_matches_official_unshifted(temp):
    torch.manual_seed(1)
    t = torch.randn(16, 50)
    p = sinkhorn_knopp_ref(t, temp)
    ref = _official_sk_fp64(t, temp, 3, 16.0)
    torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-7)


def test_sk_huge_logits_finite_and_exact():
    torch.manual_seed(2)
    temp = 0.04
    t = 6.0 * torch.randn(12, 64)  # |t/τ| up to ~500: the unshifted fp32 exp overflows to inf
    assert (t / temp).abs().max() > 150
    assert not torch.isfinite(torch.exp(t / temp)).all()
    p = sinkhorn_knopp_ref(t, temp)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.double(), _official_sk_fp64(t, temp, 3, 12.0), rtol=1e-4,
                               atol=1e-6)
    # adding a per-prototype constant changes nothing (the shift is exact)
    torch.testing.assert_close(sinkhorn_knopp_ref(t + 3.0 * torch.randn(1, 64), temp), p,
                               rtol=1e-4, atol=1e-6)


def test_sk_explicit_n_total():
    torch.manual_seed(3)
    t = torch.randn(10, 30)
    p = sinkhorn_knopp_ref(t, 0.07, n_total=25.0)
    torch.testing.assert_close(p.double(), _official_sk_fp64(t, 0.07, 3, 25.0), rtol=1e-5,
                               atol=1e-7)


def test_sk_rarely_used_prototype_is_normalised_exactly():
    """A prototype that only one sample reaches has a tiny row sum after the division by the
    global sum (~1/(N·K)). The official algorithm divides by it whatever its size; a guard that
    clamps row sums at fp32 eps (1.2e-7) skips most of that first normalisation once
    N·K > 1/eps (iBOT: N ~ 4k masked tokens × K = 65k), and the targets drift by ~1e-3."""
    n, k, temp = 1024, 16384, 0.1  # N·K = 1.7e7 > 1/eps: the smallest shape that shows it
    t = torch.zeros(n, k)
    t[1:, 0] = -5.0  # prototype 0: only sample 0 is at its max; every other prototype is flat
    p = sinkhorn_knopp_ref(t, temp)
    ref = _official_sk_fp64(t, temp, 3, float(n))
    torch.testing.assert_close(p[:, :2].double(), ref[:, :2], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(p[0].sum(), torch.tensor(1.0), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- DINO loss


def _ce(student_logits: torch.Tensor, probs: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean over rows of -Σ_k q log softmax(s/temp)."""
    return -(probs * torch.log_softmax(student_logits.float() / temp, -1)).sum(-1).mean()


def test_dino_identical_distributions_give_entropy():
    torch.manual_seed(4)
    b, k, tau_t = 3, 37, 0.05
    t_img = 0.1 * torch.randn(b, k)  # t/τ_t ~ 2·randn: a soft, high-entropy teacher
    teacher = torch.cat([t_img, t_img])  # both crops of an image agree
    loss = DINOLoss(k, student_temp=TAU_S, centering="softmax", impl="torch")
    targets = loss.teacher_targets(teacher, tau_t)  # first call: center 0, plain softmax
    p = torch.softmax(t_img / tau_t, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(targets.entropy(), entropy, rtol=1e-5, atol=1e-6)
    # student logits s with s/τ_s = t/τ_t: log softmax(s/τ_s) = log p, so CE = H(p)
    s_img = t_img * (TAU_S / tau_t)
    out = loss(torch.cat([s_img, s_img]), s_img.repeat(4, 1), targets)
    for key in ("dino_global_crops_loss", "dino_local_crops_loss", "dino_loss"):
        torch.testing.assert_close(out[key], entropy, rtol=1e-5, atol=1e-6)
    # the check has teeth: a student built for the wrong temperature is off by a lot
    wrong = DINOLoss(k, student_temp=2 * TAU_S, centering="softmax", impl="torch")
    out_w = wrong(torch.cat([s_img, s_img]), s_img.repeat(4, 1), targets)
    assert out_w["dino_loss"] - entropy > 0.05


@pytest.mark.parametrize("local_weight", [1.0, 0.5])
def test_dino_pairing_and_weights_against_a_loop(local_weight):
    torch.manual_seed(5)
    b, n_l, k, tau_t = 4, 8, 29, 0.06
    teacher = torch.randn(2 * b, k)
    sg = torch.randn(2 * b, k, requires_grad=True)
    sl = torch.randn(n_l * b, k, requires_grad=True)
    loss = DINOLoss(k, student_temp=TAU_S, impl="torch")
    targets = loss.teacher_targets(teacher, tau_t)
    out = loss(sg, sl, targets, local_loss_weight=local_weight)

    # the loop of the official docstring: every (student crop, teacher crop) pair of an image,
    # the same-view global pairs skipped; crops are crop-major blocks of B rows
    q = sinkhorn_knopp_ref(teacher, tau_t).reshape(2, b, k)
    s_crops = list(sg.reshape(2, b, k)) + list(sl.reshape(n_l, b, k))
    global_pairs, local_pairs = [], []
    for si, s in enumerate(s_crops):
        for ti in range(2):
            if si < 2 and si == ti:
                continue
            (global_pairs if si < 2 else local_pairs).append(_ce(s, q[ti], TAU_S))
    assert len(global_pairs) == 2 and len(local_pairs) == 16
    g = torch.stack(global_pairs).mean()
    lo = torch.stack(local_pairs).mean()
    total = (2 * g + 16 * local_weight * lo) / 18
    torch.testing.assert_close(out["dino_global_crops_loss"], g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dino_local_crops_loss"], lo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["dino_loss"], total, rtol=1e-5, atol=1e-6)
    if local_weight == 1.0:  # DINOv2's form: the plain mean of the 18 pair losses
        torch.testing.assert_close(out["dino_loss"],
                                   torch.stack(global_pairs + local_pairs).mean(), rtol=1e-5,
                                   atol=1e-6)
    grads = torch.autograd.grad(out["dino_loss"], (sg, sl))
    grads_loop = torch.autograd.grad(total, (sg, sl))
    for a, e in zip(grads, grads_loop, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_dino_rejects_bad_shapes_and_options():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(8, centering="sinkhorn")
    loss = DINOLoss(8, impl="torch")
    targets = loss.teacher_targets(torch.randn(4, 8), 0.04)
    with pytest.raises(ValueError, match="student_global_logits"):
        loss(torch.randn(6, 8), torch.randn(16, 8), targets)
    with pytest.raises(ValueError, match="kernels.impl"):
        DINOLoss(8, impl="cuda").teacher_targets(torch.randn(4, 8), 0.04)


# ---------------------------------------------------------------- iBOT loss


def test_ibot_weights_and_normaliser_by_hand():
    torch.manual_seed(6)
    n_img, n_patch, k, tau_t = 4, 6, 23, 0.05
    masks = torch.zeros(n_img, n_patch, dtype=torch.bool)
    masks[0, [0, 2, 5]] = True  # image 0: 3 masked
    masks[2, [1, 4]] = True  # image 2: 2 masked; images 1 and 3: none
    m = int(masks.sum())
    weights = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    teacher = torch.randn(m, k)
    student = torch.randn(m, k, requires_grad=True)
    loss = iBOTPatchLoss(k, student_temp=TAU_S, impl="torch")
    targets = loss.teacher_targets(teacher, tau_t, n_masked_patches=m)
    out = loss(student, targets, weights, n_images=n_img)

    q = sinkhorn_knopp_ref(teacher, tau_t, n_total=m)
    img_of_row = masks.nonzero()[:, 0]
    per_image = []
    for i in range(n_img):
        rows = img_of_row == i
        per_image.append(_ce(student[rows], q[rows], TAU_S) if rows.any() else torch.zeros(()))
    expected = torch.stack(per_image).sum() / n_img  # mean over ALL 2B images, masked or not
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out, student)[0],
                               torch.autograd.grad(expected, student)[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- softmax centering


@pytest.mark.parametrize("cls", [DINOLoss, iBOTPatchLoss])
def test_softmax_centering_uses_previous_center(cls):
    torch.manual_seed(7)
    k, tau_t = 19, 0.04
    loss = cls(k, centering="softmax", center_momentum=0.9, impl="torch")
    args = (lambda t: (t, tau_t)) if cls is DINOLoss else (lambda t: (t, tau_t, t.shape[0]))
    t1, t2, t3 = torch.randn(6, k) + 1.0, torch.randn(6, k) - 2.0, torch.randn(6, k)
    p1 = loss.teacher_targets(*args(t1)).materialize()
    torch.testing.assert_close(p1, torch.softmax(t1 / tau_t, -1))  # center still 0
    assert loss.center.abs().max() == 0  # the update is lazy: applied at the next call
    p2 = loss.teacher_targets(*args(t2)).materialize()
    c1 = 0.1 * t1.mean(0, keepdim=True)  # 0.9·0 + 0.1·mean(t1)
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(p2, softmax_center_ref(t2, c1, tau_t))
    loss.teacher_targets(*args(t3))
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * t2.mean(0, keepdim=True))


def test_sk_leaves_center_zero_and_entropy_is_mean_row_entropy():
    torch.manual_seed(8)
    loss = DINOLoss(31, impl="torch")
    targets = loss.teacher_targets(torch.randn(6, 31), 0.07)
    loss.teacher_targets(torch.randn(6, 31), 0.07)
    assert loss.center.shape == (1, 31) and loss.center.abs().max() == 0
    p = targets.materialize()
    h = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(targets.entropy(), h)
    assert 0 < float(h) < math.log(31)
    # the factorised form the fused kernels consume gives back the same probabilities
    torch.testing.assert_close(TeacherTargets(probs=p).factorised().materialize(), p)


def test_pair_indices_are_the_official_pairing_and_built_once():
    from fastdino.losses.dino_clstoken_loss import global_pair_index, local_pair_index

    cpu = torch.device("cpu")
    g = global_pair_index(3, cpu)
    assert g.flatten().tolist() == [3, 4, 5, 0, 1, 2]  # global crop g of image b -> crop 1-g
    loc = local_pair_index(3, 2, cpu)
    assert loc.tolist() == [[0, 3], [1, 4], [2, 5]] * 2  # each local crop -> both teacher crops
    assert global_pair_index(3, cpu) is g and local_pair_index(3, 2, cpu) is loc  # cached


# -------------------------------------------------------- bf16 logits (meta_arch.loss_logits)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_logits_need_no_fp32_copy(impl):
    """meta_arch.loss_logits hands bf16 student logits to the losses as they are: same loss as the
    .float() copy the losses used to get (both paths upcast on load), and the same gradient up to
    the one bf16 rounding of dS (exact for the reference; the Triton store rounds under the
    interpreter without round-to-nearest-even, so one bf16 ulp there)."""
    from fastdino.meta_arch import loss_logits

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)
    g = torch.Generator().manual_seed(7)
    B, n_l, K, M = 2, 2, 300, 5
    t_cls = torch.randn(2 * B, K, generator=g).to(dev)
    s_all = torch.randn((2 + n_l) * B, K, generator=g).bfloat16().to(dev)
    t_patch = torch.randn(M, K, generator=g).to(dev)
    s_patch = torch.randn(M, K, generator=g).bfloat16().to(dev)
    weights = torch.full((M,), 1.0 / M, device=dev)
    assert loss_logits(s_all).dtype == torch.bfloat16
    assert loss_logits(s_all.half()).dtype == torch.float32  # what the kernels do not take

    def run(prepare):
        s = s_all.clone().requires_grad_()
        p = s_patch.clone().requires_grad_()
        dino, ibot = DINOLoss(K, impl=impl), iBOTPatchLoss(K, impl=impl)
        d = dino(prepare(s[:2 * B]), prepare(s[2 * B:]), dino.teacher_targets(t_cls, 0.05))
        i = ibot(prepare(p), ibot.teacher_targets(t_patch, 0.05, M), weights, n_images=2 * B)
        (d["dino_loss"] + i).backward()
        return d["dino_loss"].detach(), i.detach(), s.grad, p.grad

    new, old = run(loss_logits), run(lambda x: x.float())
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    for a, b in zip(new[2:], old[2:], strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        if impl == "torch":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
