"""KoLeoLossDistributed on 2 CPU ranks (gloo) equals the single-process KoLeoLoss on the
concatenated group: same loss, same gradients reaching every rank's rows (including gradients that
flow to a neighbour living on the other rank through the all-gather's backward)."""

import os

import pytest
import torch
import torch.distributed as tdist
from spawn_ranks import mark_done, spawn_ranks
from trainer_helpers import _free_port

WORLD, B, D = 2, 3, 10


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, D, generator=g)  # [W*B, D], rank r owns rows r*B:(r+1)*B


def _worker(rank: int, port: int, out_dir: str, group_size: int, impl: str) -> None:
    if impl == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from fastdino.losses.koleo_loss import KoLeoLossDistributed

        x = _inputs()[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = KoLeoLossDistributed(group_size=group_size, impl=impl)(x)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": x.grad}, os.path.join(out_dir, f"{rank}.pt"))
        # every rank done with the group before any tears it down: a rank destroying gloo
        # while the other still has a pending op aborts it ('terminate called without an
        # active exception')
        tdist.barrier()
        mark_done(out_dir, rank)
    finally:
        tdist.destroy_process_group()


# group_size = B: each rank is its own group; = W*B: neighbours cross ranks. The Triton path runs
# under the interpreter in the workers (each spawn costs seconds, so only the crossing case).
@pytest.mark.parametrize("impl,group_size",
                         [("torch", B), ("torch", WORLD * B), ("triton", WORLD * B)])
def test_distributed_koleo_matches_single_process(tmp_path, group_size, impl):
    spawn_ranks(_worker, (_free_port(), str(tmp_path), group_size, impl), WORLD, str(tmp_path))
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    from fastdino.losses.koleo_loss import KoLeoLoss

    x = _inputs().requires_grad_(True)
    if group_size > B:  # the data must make a rank-0 row choose a neighbour on rank 1
        from fastdino.kernels.koleo import koleo_loss_ref

        assert (koleo_loss_ref(x.detach(), return_details=True)[1][:B] >= B).any()
    ranks_per_group = group_size // B
    total = 0.0
    for grp in range(WORLD // ranks_per_group):
        rows = slice(grp * group_size, (grp + 1) * group_size)
        group_loss = KoLeoLoss(impl="torch")(x[rows])  # mean over the group's rows
        ranks = range(grp * ranks_per_group, (grp + 1) * ranks_per_group)
        per_rank = [res[r]["loss"] for r in ranks]
        torch.testing.assert_close(torch.stack(per_rank).mean(), group_loss.detach(),
                                   rtol=1e-5, atol=1e-6)
        # each rank backpropagates its own mean: the sum over ranks is ranks_per_group x group mean
        total = total + ranks_per_group * group_loss
    total.backward()
    grad_dist = torch.cat([res[r]["grad"] for r in range(WORLD)])
    torch.testing.assert_close(grad_dist, x.grad, rtol=1e-5, atol=1e-6)
