"""`dino.head.weight_norm_last_layer` / `ibot.head.weight_norm_last_layer` (DINOv2 heads): the
SSL arch builds (the teacher is a deep copy of the student), the EMA moves both `weight_g` and
`weight_v`, and the head is DINOv2's `weight_norm(Linear)` under its key names."""

import warnings

import torch

from fastdino.config import load_config
from fastdino.ema import ema_update
from fastdino.meta_arch import SSLMetaArch
from fastdino.models import DINOHead

SMALL = ["model.arch=vit_test", "crops.global_crops_size=32", "crops.local_crops_size=16",
         "dino.head.n_prototypes=32", "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8",
         "ibot.head.n_prototypes=32", "ibot.head.hidden_dim=16", "ibot.head.bottleneck_dim=8",
         "dino.head.weight_norm_last_layer=true", "ibot.head.weight_norm_last_layer=true",
         "gram.use=true", "gram.it_load_ema_teacher=0"]  # the Gram teacher: a second deep copy


def test_weight_norm_heads_build_and_ema_both_g_and_v():
    arch = SSLMetaArch(load_config(None, SMALL), torch.device("cpu"))
    for head in ("dino_head", "ibot_head"):
        s, t = getattr(arch.student, head).last_layer, getattr(arch.teacher, head).last_layer
        assert torch.equal(s.weight_v, t.weight_v) and torch.equal(t.weight_g, torch.ones(32, 1))
        with torch.no_grad():
            s.weight_g.mul_(3.0)
            s.weight_v.add_(1.0)
    before = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    ema_update(arch.teacher, arch.student, 0.5)
    after, student = arch.teacher.state_dict(), arch.student.state_dict()
    for head in ("dino_head", "ibot_head"):
        for k in (f"{head}.last_layer.weight_g", f"{head}.last_layer.weight_v"):
            torch.testing.assert_close(after[k], (before[k] + student[k]) / 2, msg=k)
            assert not torch.equal(after[k], before[k]), k


def test_weight_norm_head_is_dinov2s_weight_norm_linear():
    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=32, bottleneck_dim=8, nlayers=2,
                    weight_norm_last_layer=True)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    with warnings.catch_warnings():  # torch's deprecated hook: the official DINOv2 head
        warnings.simplefilter("ignore", FutureWarning)
        ref = torch.nn.utils.weight_norm(torch.nn.Linear(8, 40, bias=False))
    ref.load_state_dict(head.last_layer.state_dict(), strict=True)  # weight_g / weight_v
    z = torch.randn(5, 8)
    torch.testing.assert_close(head(z, only_last_layer=True), ref(z))
    head(torch.randn(5, 16)).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_v.grad is not None
