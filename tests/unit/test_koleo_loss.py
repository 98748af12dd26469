"""KoLeo reference loss (fastdino/losses/koleo_loss.py, kernels/koleo.py::koleo_loss_ref) against
hand-computed values, the official eps semantics and the distributed variant's contract."""

import math

import pytest
import torch
from fastdino.kernels.koleo import koleo_loss_ref

from fastdino.losses.koleo_loss import KoLeoLoss, KoLeoLossDistributed

EPS = 1e-8


def _circle(angles_deg, radii):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    r = torch.tensor(radii, dtype=torch.float64)
    return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=1)  # [n, 2]


def test_points_on_circle_give_chord_lengths():
    # Angles 0, 30, 100, 200 deg (radii differ: normalisation removes them). Nearest angular
    # neighbours: 0<->30 (30 deg), 100->30 (70 deg), 200->100 (100 deg; 0 is 160 deg away).
    # Chord between unit vectors at angle t: 2 sin(t/2); the eps terms are below 1e-7 here.
    x = _circle([0, 30, 100, 200], [3.0, 0.5, 2.0, 7.0])
    loss, nn_idx, d = koleo_loss_ref(x, return_details=True)
    gaps = [30, 30, 70, 100]
    chords = [2 * math.sin(math.radians(t) / 2) for t in gaps]
    assert nn_idx.tolist() == [1, 0, 1, 2]
    torch.testing.assert_close(d, torch.tensor(chords, dtype=torch.float64), rtol=0, atol=1e-7)
    expected = -sum(math.log(c) for c in chords) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_eps_is_added_to_the_difference_not_the_norm():
    # Rows 0 and 1 coincide: d = ‖0 + eps·1‖ = eps·sqrt(D) (PairwiseDistance semantics), so the
    # loss term is -log(eps·sqrt(D) + eps) = -log(3 eps) for D = 4, not -log(2 eps).
    x = torch.tensor([[2.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64)
    loss, nn_idx, d = koleo_loss_ref(x, return_details=True)
    assert nn_idx[:2].tolist() == [1, 0]
    torch.testing.assert_close(d[:2], torch.full((2,), 2 * EPS, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # row 2 has a tie (cos 0 with rows 0 and 1): the distance is the same either way
    d2 = math.sqrt((-1 + EPS) ** 2 + 2 * EPS**2 + (1 + EPS) ** 2)
    expected = -(2 * math.log(3 * EPS) + math.log(d2 + EPS)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_zero_row_uses_the_normalize_clamp():
    # ‖x‖ < eps: F.normalize divides by eps, not by the norm; loss stays finite.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    loss = koleo_loss_ref(x)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicate_rows_keep_loss_and_grads_finite(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 32, generator=g)
    x = torch.cat([base, base, base[:1]]).to(dtype).requires_grad_(True)  # every row duplicated
    loss = KoLeoLoss(impl="torch")(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_groups_batch_equals_separate_calls():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 16, generator=g, dtype=torch.float64)
    batched = koleo_loss_ref(x)
    for i in range(3):
        torch.testing.assert_close(batched[i], koleo_loss_ref(x[i]))


def test_query_rows_only_count_their_own_loss_but_search_the_whole_group():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64)
    _, nn_all, d_all = koleo_loss_ref(x, return_details=True)
    loss, nn_q, d_q = koleo_loss_ref(x, query_start=4, query_len=3, return_details=True)
    assert nn_q.tolist() == nn_all[4:7].tolist()
    torch.testing.assert_close(loss, -torch.log(d_all[4:7] + EPS).mean())


def test_last_stats_are_nn_distances():
    x = _circle([0, 30, 100, 200], [1.0, 1.0, 1.0, 1.0])
    koleo = KoLeoLoss(impl="torch")
    assert koleo.last_stats is None
    koleo(x)
    stats = koleo.last_stats
    chord = 2 * math.sin(math.radians(15))  # the 30-degree gap
    assert stats["koleo_nn_dist_min"].item() == pytest.approx(chord, abs=1e-6)
    assert not stats["koleo_nn_dist_mean"].requires_grad


def test_distributed_group_size_must_be_a_multiple_of_local_batch():
    with pytest.raises(ValueError, match=r"group_size=6.*B=4"):
        KoLeoLossDistributed(group_size=6, impl="torch")(torch.randn(4, 8))


def test_distributed_global_batch_must_divide_into_groups():
    # one process: W*B = 4 rows cannot make a group of 8
    with pytest.raises(ValueError, match=r"W\*B=1\*4=4.*group_size=8"):
        KoLeoLossDistributed(group_size=8, impl="torch")(torch.randn(4, 8))


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss_ref(torch.randn(1, 8))


def test_distributed_on_one_process_equals_koleo_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, generator=g)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss1 = KoLeoLoss(impl="torch")(x1)
    loss2 = KoLeoLossDistributed(group_size=8, impl="torch")(x2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss2, loss1)
    torch.testing.assert_close(x2.grad, x1.grad)
