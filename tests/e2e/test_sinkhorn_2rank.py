"""Sinkhorn-Knopp across ranks (SPEC.md §1.1): 2 CPU ranks over gloo, each holding half of the
teacher rows, must give exactly the targets of 1 rank holding the concatenated batch, for the DINO
SK (n_total = N_local·world), the iBOT SK (n_total = all-reduced masked counts, unequal per rank)
and the softmax center's batch mean, and the iBOT SK with no masked patch on one rank; through
the references (impl=torch) and through the Triton kernels (under the interpreter on CPU), whose
K-vector sums and max go through fastdino.dist."""

from __future__ import annotations

import os

import pytest
import torch
from spawn_ranks import mark_done, spawn_ranks
from trainer_helpers import _free_port

K, TAU_T = 300, 0.04
N_DINO = 4  # teacher CLS rows per rank (2B, B = 2)
M_IBOT = (5, 7)  # masked tokens on rank 0 and rank 1: unequal on purpose


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dino = torch.randn(2 * N_DINO, K, generator=g)
    dino_next = torch.randn(2 * N_DINO, K, generator=g)
    ibot = 3.0 * torch.randn(sum(M_IBOT), K, generator=g)  # |t/τ| > 100: the shift matters
    return dino, dino_next, ibot


def _run(dino, dino_next, ibot, ibot_one_sided, rank, impl, ibot_rows):
    """The quantities compared: DINO SK targets, iBOT SK targets (also with rank 0 holding no
    rows: it still joins every all-reduce), softmax center after 2 calls."""
    from fastdino.losses.dino_clstoken_loss import DINOLoss
    from fastdino.losses.ibot_patch_loss import iBOTPatchLoss

    dino_sk = DINOLoss(K, impl=impl).teacher_targets(dino, TAU_T).materialize()
    ibot_sk = iBOTPatchLoss(K, impl=impl).teacher_targets(ibot, TAU_T, ibot_rows).materialize()
    one_sided = iBOTPatchLoss(K, impl=impl).teacher_targets(
        ibot_one_sided, TAU_T, ibot_one_sided.shape[0]).materialize()
    centered = DINOLoss(K, centering="softmax", impl=impl)
    centered.teacher_targets(dino, TAU_T)
    p_next = centered.teacher_targets(dino_next, TAU_T).materialize()
    return {"dino": dino_sk, "ibot": ibot_sk, "one_sided": one_sided,
            "center": centered.center.clone(), "p_next": p_next}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported in this process
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    try:
        dino, dino_next, ibot = _inputs()
        lo = sum(M_IBOT[:rank])
        mine = dict(dino=dino.chunk(world)[rank], dino_next=dino_next.chunk(world)[rank],
                    ibot=ibot[lo:lo + M_IBOT[rank]],
                    ibot_one_sided=ibot[M_IBOT[0]:] if rank else ibot[:0])
        res = {impl: _run(**mine, rank=rank, impl=impl, ibot_rows=M_IBOT[rank])
               for impl in ("torch", "triton")}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done with the group before any tears it down: a rank destroying gloo
        # while the other still has a pending op aborts it ('terminate called without an
        # active exception')
        tdist.barrier()
        mark_done(out_dir, rank)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sk2")
    spawn_ranks(_worker, (2, _free_port(), str(out)), 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(two_rank_results, impl):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from fastdino.kernels import sinkhorn as sk

    dino, dino_next, ibot = _inputs()
    r0, r1 = (res[impl] for res in two_rank_results)
    # the torch path is the same arithmetic split in two; the kernels use exp2 and another
    # summation order: the kernel-parity tolerance (rtol 1e-5, atol 1e-5 of the largest entry)
    tol = dict(rtol=1e-5, atol=1e-8 if impl == "torch" else 1e-5)
    # the truth: the 1-rank reference on everything
    torch.testing.assert_close(torch.cat([r0["dino"], r1["dino"]]),
                               sk.sinkhorn_knopp_ref(dino, TAU_T), **tol)
    torch.testing.assert_close(torch.cat([r0["ibot"], r1["ibot"]]),
                               sk.sinkhorn_knopp_ref(ibot, TAU_T, n_total=sum(M_IBOT)), **tol)
    assert r0["one_sided"].shape == (0, K)
    torch.testing.assert_close(r1["one_sided"], sk.sinkhorn_knopp_ref(
        ibot[M_IBOT[0]:], TAU_T, n_total=M_IBOT[1]), **tol)
    center = 0.1 * dino.mean(dim=0, keepdim=True)  # 0.9·0 + 0.1·(mean over both ranks' rows)
    for r in (r0, r1):
        torch.testing.assert_close(r["center"], center, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["p_next"], r1["p_next"]]),
                               sk.softmax_center_ref(dino_next, center, TAU_T), **tol)
    # and it is not the per-rank answer: the all-reduces did something
    assert not torch.allclose(r0["ibot"], sk.sinkhorn_knopp_ref(ibot[:M_IBOT[0]], TAU_T),
                              rtol=1e-3, atol=1e-6)
