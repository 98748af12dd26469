"""`SSLMetaArch.compute_losses` against a transcription of the official DINOv3 loss code on the same
logits: dinov3/train/ssl_meta_arch.py::compute_losses, dinov3/loss/dino_clstoken_loss.py
(`DINOLoss.forward` einsum with `diagonal_scatter`, `sinkhorn_knopp_teacher`),
dinov3/loss/ibot_patch_loss.py (`SinkhornKnoppTeacher`, `forward_masked`),
dinov3/loss/koleo_loss.py (`KoLeoLoss`), dinov3/loss/gram_loss.py (`GramLoss`).
Single process, so every all-reduce of the official code is the identity."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_dino_losses import _official_sk_fp64

from fastdino.config import load_config
from fastdino.data.masking import sample_masks
from fastdino.meta_arch import SSLMetaArch

K, D, B, N_LOCAL, GRID = 32, 24, 4, 3, 4  # prototypes, width, images, local crops, 4x4 patches
SMALL = ["model.arch=vit_test", "crops.global_crops_size=64", "crops.local_crops_size=32",
         f"crops.local_crops_number={N_LOCAL}", f"dino.head.n_prototypes={K}",
         "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8", f"ibot.head.n_prototypes={K}",
         "ibot.head.hidden_dim=16", "ibot.head.bottleneck_dim=8", "kernels.impl=torch"]


def official_sk(t, temp, n_total=None, n_iterations=3):
    """The official sinkhorn_knopp_teacher (test_dino_losses' literal transcription, in fp64)."""
    b = t.shape[0] if n_total is None else n_total
    return _official_sk_fp64(t, temp, n_iterations, b).float()


def official_dino(student_logits, teacher_probs, ignore_diagonal=False):
    s_crops, b, _ = student_logits.shape
    t_crops = teacher_probs.shape[0]
    s = F.log_softmax(student_logits.float() / 0.1, dim=-1)
    if not ignore_diagonal:
        return -torch.einsum("s b k, t b k -> ", s, teacher_probs) / (b * s_crops * t_crops)
    loss = -torch.einsum("s b k, t b k -> s t", s, teacher_probs)
    m = min(s_crops, t_crops)
    loss = torch.diagonal_scatter(loss, loss.new_zeros(m))
    return loss.sum() / (b * s_crops * t_crops - b * m)


def official_koleo(x, eps=1e-8):
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    idx = dots.max(dim=1).indices
    d = F.pairwise_distance(x, x[idx], p=2, eps=1e-8)
    return -torch.log(d + eps).mean()


def official_gram(s, t):  # img_level=True, apply_norm=True, no remove_neg
    s, t = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
    return F.mse_loss(s @ s.transpose(-1, -2), t @ t.transpose(-1, -2))


@pytest.mark.parametrize("local_weight,gram_weight", [(1.0, 0.0), (0.5, 2.0)])
def test_total_loss_equals_official_compute_losses(local_weight, gram_weight):
    gram = ["gram.use=true", "gram.ema_teacher=true"] if gram_weight else []
    cfg = load_config(None, [*SMALL, f"dino.local_loss_weight={local_weight}", *gram])
    arch = SSLMetaArch(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    m = sample_masks(2 * B, (GRID, GRID), np.random.default_rng(0))
    n_masked = m.mask_indices.numel()
    assert 0 < n_masked and (m.masks.sum(1) == 0).any()  # unmasked images count in the 1/(2B)
    batch = SimpleNamespace(global_crops=torch.zeros(2 * B, 3, 64, 64), masks=m.masks,
                            mask_indices=m.mask_indices, masks_weight=m.masks_weight,
                            n_masked_patches=m.n_masked_patches, n_images=B)
    temp = 0.055
    # the official SK exponentiates t/τ unshifted: logits small enough not to overflow it
    t_cls, t_patch = 0.5 * torch.randn(2 * B, K, generator=g), 0.5 * torch.randn(n_masked, K,
                                                                              generator=g)
    s_logits = 3 * torch.randn((2 + N_LOCAL) * B, K, generator=g)
    s_patch = 3 * torch.randn(n_masked, K, generator=g)
    cls = torch.randn(2 * B, D, generator=g)
    s_patches = torch.randn(2 * B, GRID * GRID, D, generator=g)
    t_patches = torch.randn(2 * B, GRID * GRID, D, generator=g)
    t = {"dino_targets": arch.dino_loss.teacher_targets(t_cls, temp),
         "ibot_targets": arch.ibot_patch_loss.teacher_targets(t_patch, temp,
                                                              m.n_masked_patches)}
    if gram_weight:
        t["gram_patches"] = t_patches
    s = {"dino_logits": s_logits, "ibot_logits": s_patch, "global_cls": cls,
         "global_patches": s_patches}
    v = SimpleNamespace(local_loss_weight=local_weight, gram_weight=gram_weight)
    total, terms = arch.compute_losses(s, t, batch, v)

    # --- the official compute_losses, term by term
    cls_centered = official_sk(t_cls, temp).unflatten(0, (2, B))
    masked_centered = official_sk(t_patch, temp, n_total=float(n_masked))
    s_global = s_logits[:2 * B].unflatten(0, (2, B))
    s_local = s_logits[2 * B:].unflatten(0, (N_LOCAL, B))
    global_terms, local_terms = 2 * (2 - 1), 2 * N_LOCAL
    local_loss = official_dino(s_local, cls_centered)
    global_loss = official_dino(s_global, cls_centered, ignore_diagonal=True)
    koleo = sum(official_koleo(x) for x in cls.unflatten(0, (2, B))) / 2
    ce = torch.sum(masked_centered * F.log_softmax(s_patch / 0.1, dim=-1), dim=-1)
    ibot = -(ce * m.masks_weight).sum() / m.masks.shape[0]
    expected = (1.0 * local_terms / (global_terms + local_terms) * local_weight * local_loss
                + 1.0 * global_terms / (global_terms + local_terms) * global_loss
                + 0.1 * 2 * koleo + 1.0 * ibot)
    if gram_weight:
        expected = expected + gram_weight * official_gram(s_patches, t_patches)

    torch.testing.assert_close(terms["dino_local_crops_loss"], local_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["dino_global_crops_loss"], global_loss, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(terms["koleo_loss"], koleo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["ibot_loss"], ibot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
