"""KoLeo (Kozachenko-Leonenko) nearest-neighbour loss for batches of independent groups.

Reference: facebookresearch/dinov3 `dinov3/loss/koleo_loss.py` (SPEC.md §1.5, KERNELS.md §4).
Shapes: G groups (crops x groups), n rows per group, D features; the loss is taken over the
"query" rows [q0, q0 + nq) of each group (all rows for KoLeoLoss, the local rank's rows for
KoLeoLossDistributed), the neighbour search over all n rows of the group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_query(n: int, query_start: int, query_len: int | None) -> int:
    if n < 2:
        raise ValueError(f"KoLeo needs at least 2 rows per group (a neighbour besides itself), got n={n}")
    nq = n - query_start if query_len is None else query_len
    if query_start < 0 or nq < 1 or query_start + nq > n:
        raise ValueError(f"KoLeo query rows [{query_start}, {query_start}+{nq}) must lie inside the "
                         f"group's {n} rows")
    return nq


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8, query_start: int = 0,
                   query_len: int | None = None, fp32_log: bool = False,
                   return_details: bool = False):
    """The official KoLeo math, batched over groups, in the input dtype (the single source of truth).

    Naive math, per group and query row i:
        x̂ = x / max(‖x‖, eps)                      (F.normalize)
        nn(i) = argmax_{j != i} <x̂_i, x̂_j>         (no gradient through the index)
        d_i = ‖x̂_i - x̂_nn(i) + eps‖               (PairwiseDistance adds eps to the difference)
        L = -mean_i log(d_i + eps)
    x: [G, n, D] -> loss [G]; or [n, D] -> scalar. `fp32_log` casts d to fp32 before the log
    (KoLeoLossDistributed does). The diagonal is masked with -inf (the official code fills -1 or
    -inf depending on the version: identical unless every other cosine is exactly -1).
    return_details: also return (nn [G, nq] int64 group-local indices, d [G, nq]).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"koleo_loss_ref: x must be [n, D] or [G, n, D], got shape {tuple(x.shape)}")
    G, n, D = x.shape
    nq = _check_query(n, query_start, query_len)
    xh = F.normalize(x, p=2, dim=-1, eps=eps)  # [G, n, D]
    xq = xh[:, query_start:query_start + nq]  # [G, nq, D]
    with torch.no_grad():
        dots = torch.bmm(xq, xh.transpose(1, 2))  # [G, nq, n]
        rows = torch.arange(nq, device=x.device)
        dots[:, rows, query_start + rows] = -torch.inf
        nn_idx = dots.argmax(dim=-1)  # [G, nq]
    nbr = torch.gather(xh, 1, nn_idx.unsqueeze(-1).expand(G, nq, D))  # [G, nq, D]
    d = F.pairwise_distance(xq, nbr, p=2, eps=eps)  # [G, nq]
    if fp32_log:
        d = d.float()
    loss = -torch.log(d + eps).mean(dim=-1)  # [G]
    if squeeze:
        loss, nn_idx, d = loss[0], nn_idx[0], d[0]
    return (loss, nn_idx, d) if return_details else loss
