"""Nearest neighbours between embedding sets, and the curation steps built on them (USERS.md §12,
SPEC.md §5: DINOv2's LVD-142M dedup and retrieval, DINOv3's "part 2"):

    sims, idx = top_k_cosine(queries, keys, k=8)      # [Q, k] each, best first
    keep, dup_of = deduplicate(emb, threshold=0.95)   # near-duplicate removal inside one set
    picked = retrieve(pool, seeds, k=4)               # the pool images nearest to seed images
    hits = contamination(train, evaluation, 0.9)      # training images that copy eval images

Inputs are the L2-normalised embeddings `curate embed` writes ([N, D] fp16 memory maps), so the
dot product is the cosine similarity. Rows that are not finite (images that could not be
decoded) are never neighbours and find none. The search is exact and streamed: queries and keys
go `chunk` rows at a time through one [q, c] similarity block each, with a running top-k, so
memory stays O((q + c)·D + q·c) whatever N is. Work: 2·Q·N·D FLOP for the similarities (1M x 1M
at D = 1024: 2 PFLOP, seconds of bf16 matmul on one H100; hours on a CPU, where 100k x 100k
takes minutes) plus an O(c) top-k per row and chunk. Ties: equal similarities go to the lower
key id (exact duplicates tie exactly) unless they straddle the k-th place inside one chunk.
Thresholds are met up to SIM_TOL (~0.001, the fp16 resolution of the rows): `1.0` finds exact
copies.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdino.curation.progress import Progress

# A similarity this close below a threshold reaches it: on CUDA the rows stay fp16, whose norms
# are 1 only to fp16's rounding, and the fp16 matmul rounds its result (spacing 2^-11 below 1);
# an exact copy's cosine came out as 0.9999 and `--threshold 1.0` kept every exact copy.
SIM_TOL = 2.0**-10


def reaches(sims: np.ndarray, threshold: float) -> np.ndarray:
    """sims >= threshold, up to the fp16 resolution of the stored embeddings (SIM_TOL)."""
    return sims >= threshold - SIM_TOL


def _rows(x: np.ndarray, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(rows [n, D] in the working dtype with non-finite rows zeroed, finite mask [n])."""
    t = torch.from_numpy(np.array(x[start:stop], copy=True)).to(device)  # (memmaps: read-only)
    dtype = t.dtype if device.type == "cuda" and t.dtype in (torch.float16,
                                                             torch.bfloat16) else torch.float32
    t = t.float()
    ok = torch.isfinite(t).all(dim=1)
    t = torch.where(ok[:, None], t, torch.zeros_like(t))
    # unit rows again, in fp32: stored as fp16 their norms are 1 only to ~1e-4 (an exact copy's
    # cosine read 0.9999); the dot product is then the cosine to fp32 on the CPU
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return t.to(dtype), ok


@torch.no_grad()
def top_k_cosine(queries: np.ndarray, keys: np.ndarray, k: int, *,
                 device: str | torch.device = "cpu", chunk: int = 8192,
                 exclude_self: bool = False, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k key rows of highest cosine similarity: (sims [Q, k] float32,
    ids [Q, k] int64), best first, ties to the lower id; -inf / -1 where fewer than k keys are
    finite, and for non-finite queries. `exclude_self`: queries and keys are the same set and a
    row is not its own neighbour."""
    device = torch.device(device)
    nq, nk = len(queries), len(keys)
    k_eff = min(k, nk)
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    # a bar on a terminal, else a log line every ~10 s
    bar = Progress(nq, "neighbours", "rows", "rows", enabled=progress)
    for q0 in range(0, nq, chunk):
        q, q_ok = _rows(queries, q0, min(nq, q0 + chunk), device)
        best_s = torch.full((len(q), k_eff), -torch.inf, device=device)
        best_i = torch.full((len(q), k_eff), -1, dtype=torch.long, device=device)
        for c0 in range(0, nk, chunk):
            c, c_ok = _rows(keys, c0, min(nk, c0 + chunk), device)
            s = (q @ c.T).float()  # [q, c]
            s[:, ~c_ok] = -torch.inf
            if exclude_self:
                r = torch.arange(q0, q0 + len(q), device=device)[:, None]
                cols = torch.arange(c0, c0 + len(c), device=device)[None, :]
                s[r == cols] = -torch.inf
            # this chunk's best k (O(c) per row), in id order, then merged with the running best
            # by a stable sort on -sim over 2k entries: equal similarities keep their order, the
            # running best (lower ids) first, so ties go to the lower id
            top_s, top_i = torch.topk(s, min(k_eff, len(c)), dim=1)
            top_i, by_id = torch.sort(top_i, dim=1)
            top_s = top_s.gather(1, by_id)
            cand_s = torch.cat([best_s, top_s], dim=1)
            cand_i = torch.cat([best_i, top_i + c0], dim=1)
            order = torch.sort(-cand_s, dim=1, stable=True).indices[:, :k_eff]
            best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
        best_s[~q_ok] = -torch.inf
        best_i[(~q_ok)[:, None].expand_as(best_i) | ~torch.isfinite(best_s)] = -1
        # fp16 rows are unit vectors only to fp16's rounding: a copy's cosine came out as
        # 1.0003; reported as at most 1 (the order above used the values as computed)
        sims[q0:q0 + len(q), :k_eff] = best_s.clamp(max=1.0).cpu().numpy()
        ids[q0:q0 + len(q), :k_eff] = best_i.cpu().numpy()
        bar.update(len(q))
    bar.close()
    return sims, ids


def finite_rows(emb: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """[N] bool: the rows that hold an embedding (not the NaN of an undecodable image). Read in
    chunks, as the search: the whole memory map as fp32 at once was 4 GB per million 1024-d
    rows (out of memory on the pools dedup is for)."""
    n = len(emb)
    return np.concatenate([np.isfinite(np.asarray(emb[i:i + chunk])).all(axis=1)
                           for i in range(0, n, chunk)] or [np.zeros(0, dtype=bool)])


def deduplicate(emb: np.ndarray, threshold: float, k: int = 16, **kw) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Near-duplicate removal: rows joined by a similarity >= threshold (among each row's k
    nearest) form groups (connected components, union-find); each group keeps its lowest row.
    Returns (keep [N] bool, dup_of [N] int64: the kept row a removed row duplicates, -1 for
    kept rows). Non-finite rows are kept out (keep False, dup_of -1)."""
    sims, ids = top_k_cosine(emb, emb, k, exclude_self=True, **kw)
    n = len(emb)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    rows, cols = np.nonzero(reaches(sims, threshold))
    for a, b in zip(rows.tolist(), ids[rows, cols].tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the group's lowest row
    roots = np.array([find(a) for a in range(n)])
    finite = finite_rows(emb, kw.get("chunk", 8192))
    keep = (roots == np.arange(n)) & finite
    dup_of = np.where(keep | ~finite, -1, roots)
    return keep, dup_of


def retrieve(pool: np.ndarray, seeds: np.ndarray, k: int, threshold: float | None = None,
             **kw) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval-based curation: the union of every seed's k nearest pool rows (with similarity
    >= threshold when given). Returns (picked pool rows [M] sorted, their best similarity to any
    seed [M])."""
    sims, ids = top_k_cosine(seeds, pool, k, **kw)
    ok = ids >= 0
    if threshold is not None:
        ok &= reaches(sims, threshold)
    best = np.full(len(pool), -np.inf, dtype=np.float32)
    np.maximum.at(best, ids[ok], sims[ok])
    picked = np.nonzero(np.isfinite(best))[0]
    return picked, best[picked]


def contamination(train: np.ndarray, evaluation: np.ndarray, threshold: float,
                  **kw) -> list[tuple[int, int, float]]:
    """Training rows that near-duplicate an evaluation row: [(train row, its most similar
    evaluation row, similarity)] for every training row whose best match reaches `threshold`,
    by train row. Searched from the training side (each training row's nearest evaluation
    row), so every copy is found: searching the k nearest training rows of each evaluation row
    missed the copies beyond k of an image copied more than k times."""
    sims, ids = top_k_cosine(train, evaluation, 1, **kw)
    hit = np.nonzero(reaches(sims[:, 0], threshold))[0]
    return [(int(t), int(ids[t, 0]), float(sims[t, 0])) for t in hit]
