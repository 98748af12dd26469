"""Host syncs of a co-distillation step with students on their own ranks (codistill_ranks.py):
the teacher exchange and the student's step read nothing on the host but the clip's one read
(test_qa_perf_step's guarantee for the plain step), once the exchange has seen a batch.

The exchange rebuilds its slice's iBOT mask indices from the received masks. With whole batches
received (student_ranks [4, 2, 2] and the like) the slice holds n x M masked tokens, M being a
rank's constant: `nonzero_static` of that size and gathered weights read nothing (`nonzero` and
a boolean-mask index were two syncs per micro-batch). One process with student_ranks [1] has the
same exchange (a whole batch, copied rather than sent)."""

from __future__ import annotations

import pytest
import torch
from test_qa_perf_step import SMALL, SMOKE, _sync_recorder

from fastdino.config import load_config
from fastdino.data import build_train_loader
from fastdino.data.masking import masks_from_bool


def _exchange_and_trainer(tmp_path, *overrides):
    from fastdino.codistill import SharedTeacher
    from fastdino.codistill_ranks import TeacherExchange
    from fastdino.meta_arch import build_student
    from fastdino.train import Trainer

    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path / 'run'}", "kernels.impl=torch",
                              "distillation.enabled=true", f"distillation.teacher={tmp_path}",
                              *overrides])
    torch.manual_seed(0)
    teacher = build_student(cfg).eval().requires_grad_(False)  # (the trainer never loads it)
    shared = SharedTeacher(teacher, cfg.deepspeed.gradient_accumulation_steps)
    exchange = TeacherExchange(shared, [1], cfg.data.batch_size_per_gpu, amp=False)
    trainer = Trainer(cfg, distillation_teacher=shared)
    loader = build_train_loader(cfg, 0, 1, 0)
    local = [[next(loader).to(trainer.info.device) for _ in range(trainer.gas)] for _ in range(2)]
    return exchange, shared, trainer, local


@pytest.mark.parametrize("overrides", [[], ["deepspeed.gradient_accumulation_steps=2"]],
                         ids=["gas1", "gas2"])
def test_codistill_step_reads_nothing_on_the_host_but_the_clip(tmp_path, overrides,
                                                               count_launches):
    exchange, shared, trainer, local = _exchange_and_trainer(tmp_path, *overrides)
    mine = [exchange(b) for b in local[0]]  # first step: the slice's mask count is verified
    assert trainer.step(0, mine) is not None
    shared.clear()
    with _sync_recorder(count_launches)() as rec:
        mine = [exchange(b) for b in local[1]]
        values = trainer.step(1, mine)
    assert values is not None
    assert rec.reads == [], f"host reads in a co-distillation step: {rec.reads}"
    for got, b in zip(mine, local[1], strict=True):  # the slice is the batch, indices and all
        want = masks_from_bool(b.masks)
        for k in ("masks", "mask_indices", "masks_weight", "n_masked_patches"):
            assert torch.equal(getattr(got, k), getattr(want, k)), k
        assert torch.equal(got.mask_indices, b.mask_indices)  # ... as the collate drew them


def test_masks_from_bool_with_a_known_count_reads_nothing(count_launches):
    torch.manual_seed(0)
    masks = torch.rand(6, 16) < 0.3
    want = (1.0 / masks.sum(-1, keepdim=True).clamp(min=1).float()).expand_as(masks)[masks]
    n = int(masks.sum())
    with _sync_recorder(count_launches)() as rec:
        m = masks_from_bool(masks, n)
    assert rec.reads == [], rec.reads
    assert torch.equal(m.mask_indices, masks.reshape(-1).nonzero().reshape(-1))
    assert torch.equal(m.masks_weight, want)  # the boolean-index weights, gathered
    assert m.n_masked_patches.tolist() == [n]
    with pytest.raises(RuntimeError, match=f"do not hold n_masked={n + 1} "):  # never padded
        masks_from_bool(masks, n + 1)


def test_exchange_counts_when_the_slice_is_not_n_times_m(tmp_path):
    """A slice whose masked count is not n x (this rank's M) (ranks whose M differ: not a
    loader's batches) is counted with `nonzero` from then on, never cut to n x M; a new local M
    (another resolution) is counted once, then known."""
    exchange, shared, trainer, local = _exchange_and_trainer(tmp_path)
    b = local[0][0]
    M = b.mask_indices.numel()
    assert exchange._count(b) is None  # nothing verified yet
    exchange(b)
    assert exchange._count(b) == M  # verified: known from now on
    real = exchange._send_receive

    def other_rank_masks(fields):  # the received masks with one masked image fewer
        got = real(fields)
        masks = got[2][0].clone()
        masks[masks.flatten(0, 1).any(-1).view(masks.shape[:2]).nonzero()[0].tolist()] = 0
        return [*got[:2], [masks], *got[3:]]

    exchange._send_receive = other_rank_masks
    exchange._checked.clear()  # as at a first batch
    got = exchange(b)
    want = masks_from_bool(got.masks)
    assert got.mask_indices.numel() < M and torch.equal(got.mask_indices, want.mask_indices)
    assert exchange.n_whole is None and exchange._count(b) is None  # counted from now on
