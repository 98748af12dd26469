"""gram.tokens_used on the Triton path: the selected rows are gathered into one [1, N_sel, D]
image before the kernels, so the normaliser is N_sel² (KERNELS.md §5.3). Parity against the fp64
reference of the same selection under the DESIGN.md rule (kernel error <= 2× the error of the
reference run in the input precision + a small atol), forward and student gradient, for every
form; the gradient of unselected rows must be exactly 0."""

import pytest
import torch
from fastdino.kernels.gram import gram_loss, gram_loss_ref

from fastdino.losses.gram_loss import GramLoss

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

VARIANTS = {"pp": ("pp", {}), "pp-remove_neg": ("pp", {"remove_neg": True}), "dd": ("dd", {})}


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g)
    t = s + 1e-2 * torch.randn(*shape, generator=g)  # correlated: the cancellation case
    masks = torch.rand(shape[:2], generator=g) < 0.45
    return s.to(DEV, dtype), t.to(DEV, dtype), masks.to(DEV)  # same numbers on every device


def _loss_and_grad(fn, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    loss = fn(s, t, **kw)
    loss.backward()
    return loss.detach().double(), s.grad.double()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens_used", ["masked", "unmasked"])
def test_parity_selected_rows(tokens_used, dtype, variant):
    # 3 images × 37 patches (odd), D = 64: N_sel ≈ 50 or 61 rows, not a multiple of the tiles
    s, t, masks = _inputs((3, 37, 64), dtype, seed=11)
    sel = masks if tokens_used == "masked" else ~masks
    rows = sel.flatten().nonzero().flatten()
    form, clamp = VARIANTS[variant]
    ref_l, ref_g = _loss_and_grad(gram_loss_ref, s.double(), t.double(), img_level=False,
                                  rows=rows, **clamp)
    low_l, low_g = _loss_and_grad(gram_loss_ref, s, t, img_level=False, rows=rows,
                                  compute_dtype=s.dtype, **clamp)
    k_l, k_g = _loss_and_grad(gram_loss, s, t, img_level=False, rows=rows, form=form, **clamp)
    atol = 1e-5 if dtype == torch.float32 else 1e-6
    err_l, base_l = (k_l - ref_l).abs().item(), (low_l - ref_l).abs().item()
    assert err_l <= 2 * base_l + atol * ref_l.abs().item() + 1e-12, (err_l, base_l, ref_l.item())
    err_g, base_g = (k_g - ref_g).abs().max().item(), (low_g - ref_g).abs().max().item()
    assert err_g <= 2 * base_g + atol * ref_g.abs().max().item(), (err_g, base_g)
    assert torch.all(k_g[~sel] == 0) and torch.all(k_g[sel].abs().sum(-1) > 0)
    # the normaliser is N_sel²: the same selection as an explicit [1, N_sel, D] image agrees
    one = gram_loss_ref(s.double().flatten(0, 1)[rows][None], t.double().flatten(0, 1)[rows][None],
                        **clamp)
    assert ref_l.item() == pytest.approx(one.item(), rel=1e-12)


def test_module_triton_matches_torch_with_masks():
    s, t, masks = _inputs((2, 20, 16), torch.float32, seed=12)
    idx = masks.flatten().nonzero().flatten()
    for tokens_used in ("masked", "unmasked"):
        kw = dict(img_level=False, tokens_used=tokens_used)
        tri = GramLoss(impl="triton", **kw)(s, t, masks=masks, mask_indices=idx)
        ref = GramLoss(impl="torch", **kw)(s.double(), t.double(), masks=masks)
        assert tri.item() == pytest.approx(ref.item(), rel=1e-5), tokens_used


def test_rows_with_img_level_is_an_error_and_empty_rows_give_zero():
    s, t, _ = _inputs((1, 8, 16), torch.float32, seed=13)
    with pytest.raises(ValueError, match="img_level=False"):
        gram_loss(s, t, img_level=True, rows=torch.tensor([0, 1], device=DEV))
    s.requires_grad_()
    loss = gram_loss(s, t, img_level=False, rows=torch.zeros(0, dtype=torch.long, device=DEV))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(s.grad == 0)
