"""EMA teacher update, Gram-teacher copy and refresh rule (SPEC.md §3.1 step 7, §1.6)."""

import contextlib

import pytest
import torch
from torch import nn

from fastdino.ema import copy_params, ema_update, gram_refresh_due


def _pair():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    t = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))
    return t, s


@pytest.mark.parametrize("chunk_numel", [1, 10, 1 << 26])
def test_ema_matches_formula_for_any_chunking(chunk_numel):
    t, s = _pair()
    t0 = {n: p.detach().clone() for n, p in t.named_parameters()}
    gathered = []

    @contextlib.contextmanager
    def full_values(params):  # records the chunks; yields values as a ZeRO engine would
        gathered.append(len(params))
        yield [p.detach().clone() for p in params]

    ema_update(t, s, 0.9, full_values=full_values, chunk_numel=chunk_numel)
    for n, p in t.named_parameters():
        expect = 0.9 * t0[n] + 0.1 * dict(s.named_parameters())[n].detach()
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)
    assert sum(gathered) == len(list(s.parameters()))
    assert (len(gathered) > 1) == (chunk_numel < 100)


def test_ema_momentum_one_keeps_teacher_and_zero_copies_student():
    t, s = _pair()
    before = [p.detach().clone() for p in t.parameters()]
    ema_update(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters(), strict=True))
    ema_update(t, s, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), s.parameters(), strict=True))


def test_copy_params_and_name_mismatch_error():
    t, s = _pair()
    copy_params(t, s)
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), s.parameters(), strict=True))
    with pytest.raises(ValueError, match="parameter names differ"):
        ema_update(nn.Linear(5, 7), s, 0.5)


def test_gram_refresh_official_7b_schedule():
    # 7B Gram config: first update 1,010,000, every 10,000, max 3 -> 1.01M, 1.02M, 1.03M
    its, n = [], 0
    for it in range(1_000_000, 1_060_000):
        if gram_refresh_due(it, True, 1_010_000, 10_000, n, 3):
            its.append(it + 1)
            n += 1
    assert its == [1_010_000, 1_020_000, 1_030_000]
    assert not gram_refresh_due(1_009_999, False, 1_010_000, 10_000, 0, 3)
