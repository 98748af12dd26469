"""KoLeo (Kozachenko-Leonenko) nearest-neighbour loss for batches of independent groups.

What it fuses: the ~20 small kernels of the reference (normalize, mm, diagonal fill, argmax,
gather, pairwise distance, log, mean and their backwards) into one forward and one backward launch
for small groups (the "small" path, which auto takes up to SMALL_MAX_N = 256 rows per group: the
per-rank groups of DINOv3; the older "fused" path, one program per row block, is kept as the A/B
baseline and for groups above that size when the model picks it), and into 4 + 4 launches with no
n x n matrix, half the FLOPs when every row is a query, and an O(n·D) backward for large ones
(the "split" path).
Derived from: facebookresearch/dinov3 `dinov3/loss/koleo_loss.py` (SPEC.md §1.5, KERNELS.md §4);
the running max/argmax over column tiles follows the tiled nearest-neighbour pattern of
denix56/pytorch_cluster (no code copied).
Shapes: G groups (crops x groups), n rows per group, D features. The loss is taken over the
"query" rows [q0, q0 + nq) of each group (all rows for KoLeoLoss, the local rank's rows for
KoLeoLossDistributed); the neighbour search runs over all n rows of the group.
Supports: fp32 and bf16 inputs, fp32 accumulation, any n >= 2 and D >= 1 (odd sizes masked).
Tested: Triton 3.6 and 3.9 under the CPU interpreter (all three paths,
tests/kernels/test_koleo*.py); every shipped configuration compiled for sm_90 / sm_80 without
spills, with the arguments the JIT specializes at run time declared 16-divisible
(CompileSpec.divisible_by_16, which turns on the cp.async pipelines); the fused path measured on
an H200 (bench/results/nvidia-h200-2026-11-26-logs/koleo_bench.txt), the small path too
(bench/results/nvidia-h200-2026-11-26-check5 and -check6, numbers below; its GPU tests in
test_koleo_split.py, incl. CUDA-graph replay, passed there).
Limits: ties in the argmax resolve to the lowest column index on every path (torch.argmax's rule),
but a near-tie can still flip against torch because the dots are summed in another order (the loss
is then the same, the gradient goes to a different copy). fp32 inputs use IEEE fp32 dots (exact
parity, slow on tensor-core GPUs); bf16 inputs use bf16 tensor cores for the search, TF32 for the
fused and small backwards' chooser product and IEEE fp32 sums in the sorted backward.

Math shared by all paths (per group; s_i = dL_g · (-1/nq) / ((d_i + eps) d_i)):
    x̂ = x · rinv, rinv_j = 1/max(‖x_j‖, eps); nn(i) = argmax_{j≠i} x_i·x_j·rinv_j (the positive
    factor rinv_i does not move the argmax); v_i = x̂_i - x̂_nn + eps (eps on the difference, as
    PairwiseDistance), d_i = ‖v_i‖, t_i = <x̂_i, v_i>, u_i = <x̂_nn, v_i>
    dx̂_j = s_j v_j - Σ_{i: nn(i)=j} s_i v_i
    <x̂_j, dx̂_j> = s_j t_j - Σ_{i: nn(i)=j} s_i u_i              (no reduction over D needed)
    dx_j = (dx̂_j - x̂_j <x̂_j, dx̂_j>) · rinv_j                  (projection off when ‖x_j‖ <= eps)
x̂_i and x̂_nn use the same stored rinv, and x_i·r_i - x_nn·r_nn is computed without FMA, so
duplicate rows give v = eps exactly, as F.normalize + pdist do.

Fused path (one launch each way), per (row block, group) program:
  fwd: for each column tile, tl.dot over D tiles gives x_i·x_j, the tile's column norms are summed
  from the same B tiles, scaled, diagonal/padding masked with -inf, running max/argmax (strict '>':
  the first maximum wins); then one pass over D for d, t, u; the row block's partial loss, summed
  in block order by the last program (atomic counter): deterministic.
  bwd, per (row block j, D tile, group): the chooser sum as a masked [BLOCK_J, BLOCK_I] x
  [BLOCK_I, BLOCK_D] tl.dot over gathered v_i tiles, scanning all nq neighbour indices.
  Cost: fwd 2·G·nq·n·D FLOP on G·nq/BLOCK_M programs (≤ 64 at n = 4096: half the SMs of an H200);
  bwd re-scans nq indices and loads whole 16-row chooser tiles in each of (n/32)(D/128) programs:
  O(n²·D/32) loads, latency-bound at ~0.45 µs per 16-chooser step (H200).

Split path (large groups):
  1. _koleo_rinv_kernel: rinv for all G·n rows. Reads G·n·D·es bytes.
  2a. _koleo_search_sym_kernel, when every row is a query (q0 = 0, nq = n) and the model says
     the tiles fill the GPU: grid (nb, nb, G), nb = n/128, programs with I > J exit at once;
     program (I, J), I <= J, computes one 128x128 tile of x_I·x_Jᵀ over all of D (same GEMM
     loop) and takes both its row maxima (rows of I over the columns of J, scaled by rinv_J) and,
     off the diagonal, its column maxima (rows of J over the columns of I, scaled by rinv_I): the
     candidate of row r from column block c lands in [G, nb, n] at (c, r). FLOPs n²·D per group
     (+ n·128·D for the diagonal tiles), half of 2b; n = 4096: 528 tiles = 4 waves on 132 SMs.
  2b. _koleo_search_kernel (otherwise), grid (nq/BLOCK_M, S, G): program (m, s, g) scans the range
     [s·C, (s+1)·C) (C a multiple of BLOCK_N) with a pure GEMM main loop (bf16 128x128x64 tiles, 8
     warps, 3 stages of 16-byte cp.async; no norm work in it) and a max/argmax epilogue per column
     tile, the column and K loops flattened into one software pipeline (tl.range(flatten=True));
     it writes its (max, argmax) per row to [G, S, nq]. S = min(column tiles, SMs //
     (G·nq/BLOCK_M)): one full wave (n = 4096: 32 row blocks x 4 splits = 128 programs on 132 SMs).
     FLOPs 2·G·nq·n·D; bytes: x re-read per row block and split, from L2 (x is ≤ 32 MB).
  3. _koleo_finish_kernel: merges the S (or nb) candidates in column order with a strict '>' (a
     tie across splits or tiles keeps the lowest index, exactly as one scan would; tl.max breaks
     ties inside a tile to the lowest index too), then d, t, u and the row block's partial
     loss. Reads 2·G·nq·D·es + 8·G·S·nq bytes. 4. torch sum of the partials / nq.
  bwd (_koleo_bwd_sorted_kernel): a stable torch.sort of nn per group gives the chooser lists
  (i ascending within each j), torch.searchsorted the first sorted position of each BLOCK_J=16 row
  block; program (row block, D tile, group) walks its own contiguous run of choosers in steps of
  16, recomputes s_i v_i from x rows and the saved d, u, rinv (the forward's v bit for bit) and
  adds them to its rows with an exact 0/1 segment matrix through an IEEE tl.dot (fp32 sums in
  sorted order: deterministic, no atomics). Bytes ≈ G·(3·nq + 2·n)·D·es (own rows, their
  neighbours, chooser rows; the choosers' neighbours are the program's own rows, cached) plus
  2·16 FMA-FLOP per chooser slot and feature (~1.5·n slots). A hub chosen by k rows costs its
  program k/16 steps (still O(n·D) in total).

Why the fused forward was 6x a GEMM at n = 4096, D = 4096 (H200: 1.66 ms vs 0.26 ms): 4096/64 = 64
programs on 132 SMs (half the GPU idle, each program 2.1 GFLOP in series), and a main loop that is
not a GEMM: every program recomputes all 4096 column norms from its B tiles (bf16 -> fp32, square,
cross-lane row sums on CUDA cores, the B tile pulled from shared memory into registers each step),
with 32-wide K tiles and a 64x128 tile per 8 warps (half the operand reuse of 128x128). Measured:
137 GFLOP / 1.66 ms / 64 programs = 1.3 TFLOP/s per busy SM against ~4 for a GEMM tile loop (x3),
times 2 for the idle SMs. Pipelining was not the cause at D = 4096 (the JIT sees 16-divisible
arguments and pipelines), but the ahead-of-time compile of compile_specs() did not (no
divisibility attributes: masked K loads, 2-byte loads, no cp.async); the split search states the
alignment in the kernel (ALIGNED: pointer hints, no K mask) so the AOT compile is the runtime one.

Small path (n <= SMALL_MAX_N; why the fused path was slow there, H200 bf16, 2 crops x 64 rows,
D = 1024: 23.3 µs fwd and 33 µs fwd+bwd under CUDA graphs, against 11.3 / 15.4 µs for torch.compile
of the reference). The fused forward gives one row block to one program: at B = 64 BLOCK_M = 64,
so the grid is (1, 2) = 2 programs on 132 SMs, each walking D/32 = 32 dependent K steps of its
search (column norms recomputed in each) and then 32 more of the distance pass: 64 serial
latency-bound steps, ~0.36 µs each (B = 16: also 2 programs, 2·D/32 steps, 256 at D = 4096;
B = 256: 32-row blocks, 16 programs, 4 column tiles x D/32 + D/32 steps). Its backward (32 x 128
x 16 tiles, 32 programs at B = 64) walks nq/16 = 4 chooser tiles, each a branch and two
dependent round trips (indices, then gathers), then two more for row j's own term: 7.1 µs. The op
is 8 MFLOP and 256 KB: all of that is latency, not work.
  fwd (_koleo_small_fwd_kernel, one launch, no memset): grid (RB = nq/16, KS, G); program
  (m, k, g) computes the 16 x n dots of its rows over the K split [k·C, (k+1)·C) (C >= 128
  features, KS up to 16, chosen so G·RB·KS ~ 128 programs: B = 64, D = 1024 -> 4 x 8 x 2 = 64
  programs of 2 K steps; B = 16, D = 4096 -> 1 x 16 x 2 of 4 steps; B = 256, D = 1024 -> 16 x 4 x 2
  of 4 x 4) and the columns' partial squared norms, stores them (fp32, [G, RB, KS, 16, n]), and
  takes a ticket on its row block's counter. The last of the KS to arrive (acq_rel atomic) sums
  the KS partials in split order (8 tiles per load step: one round trip), scales by the column
  norms, takes the max/argmax (strict '>', as torch.argmax), and runs the distance pass over D in
  1024-wide steps (one round trip at D <= 1024) for its 16 rows; the last row block of a group sums
  the row blocks' partial losses in block order. Deterministic (fixed-order sums); the counters
  live in a per-device buffer that the consuming programs reset to zero (_small_counters), so a
  CUDA graph holds one kernel node. Critical path: ~2 dependent loads (phase 1) + the ticket +
  1 (partials) + 1 (distance) + the group ticket + 1, against 64 loop steps before.
  bwd (_koleo_small_bwd_kernel): the fused backward's math with every chooser of a group in one
  64-row tile up to B = 64 (a loop of them above), and its loads ordered for latency: the
  non-gather loads of row j and of the chooser tile first, then all gathers together (2 round
  trips); grid (n/32, D/64, G): B = 64, D = 1024 -> 2 x 16 x 2 = 64 programs.
  Modelled fwd ~3-5 µs, fwd+bwd ~6-8 µs at B = 64, D = 1024. Measured (H200, CUDA-graph
  medians, check5 / check6): fwd 9.9 / 9.8 µs, bwd kernel 3.2 µs, fwd+bwd 15.3 / 15.4 µs against
  15.6 / 15.7 µs for torch.compile (1.02x; the issue's target is 2x) and 32.9 µs for the fused
  path. So the forward's critical path costs about twice the model (dependent global round trips
  and the acq_rel tickets, not FLOPs); SMALL_SPLITS = 1 (bench provider `triton_ks1`, no split-K
  ticket) is the prepared A/B. The ~2.3 µs of fwd+bwd beyond the two kernels were mostly two
  memsets: autograd zero-filled the gradients of nn_idx and d before every backward (since
  2026-11-27 KoLeoFn leaves them None: ~13 µs expected, untimed). The D = 4096 cases (never
  timed) are the doubtful ones: the finisher's distance pass is 4 serial 64 KB steps there.

Path choice (path="auto"; "small" / "fused" / "split" force both halves): groups of at most
SMALL_MAX_N rows take the small path both ways (a fixed rule, _pick: at those sizes the op is
latency-bound and the model below, fitted at n = 4096, does not apply). Above it, a model with
H200 constants; each half takes the split/sorted kernel only when predicted 1.25x faster
(_pick_auto):
  fused fwd  = waves · 2·BLOCK_M·n·D / 1.2 TFLOP/s per program      (bf16; measured above)
  split fwd  = 3 launches · 3 µs + (n + 2nq)·D·es / 4 TB/s + search, the faster of
               column splits: waves · 2·BLOCK_M·C·D / 4 TFLOP/s per SM
               symmetric (nq = n): ceil(G·nb(nb+1)/2 / SMs) · 2·128²·D / 4 TFLOP/s per SM
  fused bwd  = ceil(programs / 2·SMs) · (nq/16) · 0.45 µs            (H200 bwd at n = 4096)
  sorted bwd = 3 launches · 3 µs + G·(3nq + 2n)·D·es / 4 TB/s
Result (bf16, 132 SMs; split/sorted chosen where named): per-rank groups (B = 16, 64 x 2 crops)
and the gathered 2 x 256 rows take the small path (the rule above; the model alone would keep
them fused, and at 2 x 256 split the D = 4096 forward); 2 x 512 rows: split fwd at D >= 1024,
sorted bwd at D = 384 and 4096; one group of 1024+ rows:
split + sorted at every width, the symmetric search from 4096 rows (at 1024 rows its 36 tiles
leave SMs idle: column splits); the distributed variant (nq = 64 local rows of a 4096-row group):
column-split fwd (32 splits), fused bwd (4 chooser steps). Expected at n = 4096, G = 1 (model,
H200) against the measured bf16 GEMM peer (x·xᵀ + sum; its bwd is 2 GEMMs):
    D      fwd model (GEMM)       bwd model (GEMM)      fwd+bwd model (GEMM)  (old kernels)
    384    24 µs  (103 µs)        13 µs  (208 µs)       37 µs  (420 µs)       (0.76 ms)
    1024   49 µs  (129 µs)        20 µs  (176 µs)       69 µs  (319 µs)       (0.90 ms)
    4096   168 µs (258 µs)        51 µs  (478 µs)       219 µs (730 µs)       (3.42 ms)
The 4 TFLOP/s per SM of the search is an assumption (~530 TFLOP/s on 132 SMs; the measured cuBLAS
bf16 GEMM is 683 at 8192³); at D = 384 a symmetric tile is only 6 K steps, so its pipeline fill
and the two-sided epilogue may cost ~1.5x the model there. A GPU run of bench/bench_koleo.py
checks all of it (the gathered cases also time the forced fused path: triton_fused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastdino.kernels._rounding import to_stored
from fastdino.kernels._triton import tl, triton
from fastdino.kernels._utils import CompileSpec, cdiv, eager_or_op, is_interpreter, next_pow2


def _check_query(n: int, query_start: int, query_len: int | None) -> int:
    if n < 2:
        raise ValueError(f"KoLeo needs at least 2 rows per group (a neighbour besides itself), "
                         f"got n={n}")
    nq = n - query_start if query_len is None else query_len
    if query_start < 0 or nq < 1 or query_start + nq > n:
        raise ValueError(f"KoLeo query rows [{query_start}, {query_start}+{nq}) must lie inside "
                         f"the group's {n} rows")
    return nq


def koleo_loss_ref(x: torch.Tensor, eps: float = 1e-8, query_start: int = 0,
                   query_len: int | None = None, fp32_log: bool = False,
                   return_details: bool = False):
    """The official KoLeo math, batched over groups, in the input dtype (the single source of
    truth).

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
        raise ValueError(f"koleo_loss_ref: x must be [n, D] or [G, n, D], got shape "
                         f"{tuple(x.shape)}")
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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _nn_distance(x_g, stride_x_row, rows, row_ok, best_j, rinv_i, best_r, D, eps, q_base,
                 Nn_ptr, Dist_ptr, T_ptr, U_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The distance pass every forward path ends with: per query row, v = x̂_i - x̂_nn + eps (eps
    on the difference, as PairwiseDistance), d = ‖v‖, t = x̂_i·v, u = x̂_nn·v (what the backward
    needs), stored at q = q_base + rows (a scalar base: no index vector live across the loop)
    with the neighbour index; returns d. rinv_i / best_r: the fp32 inverse norms of the rows
    and of their neighbours."""
    offs_k = tl.arange(0, BLOCK_K)
    # fresh [BLOCK_M] accumulators (not zeros_like: rinv_i may carry the layout of the search
    # tile it was reduced from, which costs the small forward layout conversions and spills)
    dsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        m = row_ok[:, None] & (kk < D)[None, :]
        xi = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
        xn = tl.load(x_g + best_j[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
        xi = xi.to(tl.float32) * rinv_i[:, None]
        xn = xn.to(tl.float32) * best_r[:, None]
        v = tl.where(m, xi - xn + eps, 0.0)
        dsq += tl.sum(v * v, axis=1)
        t += tl.sum(xi * v, axis=1)
        u += tl.sum(xn * v, axis=1)
    d = tl.sqrt(dsq)
    q = q_base + rows
    tl.store(Nn_ptr + q, best_j.to(tl.int64), mask=row_ok)
    tl.store(Dist_ptr + q, d, mask=row_ok)
    tl.store(T_ptr + q, t, mask=row_ok)
    tl.store(U_ptr + q, u, mask=row_ok)
    return d


@triton.jit
def _koleo_fwd_kernel(
    Loss_ptr,  # [G] fp32 out: mean of -log(d + eps) over the query rows
    Nn_ptr,  # [G, nq] int64 out: group-local index of each query row's neighbour
    Dist_ptr,  # [G, nq] fp32 out: d_i = ‖x̂_i - x̂_nn + eps‖
    T_ptr,  # [G, nq] fp32 out: <x̂_i, v_i>
    U_ptr,  # [G, nq] fp32 out: <x̂_nn(i), v_i>
    Rinv_ptr,  # [G, n] fp32 out: 1 / max(‖x_j‖, eps) of every row
    Partial_ptr,  # [G, num_blocks] fp32 scratch: per-row-block sums (unused when SINGLE)
    Count_ptr,  # [G] int32 scratch, zero on entry (unused when SINGLE)
    X_ptr,  # [G, n, D] in, fp32 or bf16, last dim contiguous
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # candidate columns per tile
    BLOCK_K: tl.constexpr,  # features per tile
    SINGLE: tl.constexpr,  # one row block per group: no counter, the program writes the mean
    UPCAST: tl.constexpr,  # upcast bf16 tiles before tl.dot (interpreter bug, 2026-05)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot (TF32 would flip near-tied argmaxes)
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_blocks = tl.num_programs(0)
    x_g = X_ptr + g * stride_x_g
    rows = q0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # group-local row ids
    row_ok = rows < q0 + nq
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)

    # 2) running max / argmax of x_i·x_j / ‖x_j‖ over column tiles
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        csq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            k_ok = (kk < D)[None, :]
            a = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :],
                        mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(x_g + cols[:, None] * stride_x_row + kk[None, :],
                        mask=col_ok[:, None] & k_ok, other=0.0)
            b32 = b.to(tl.float32)
            csq += tl.sum(b32 * b32, axis=1)
            if UPCAST:
                a = a.to(tl.float32)
                b = b32
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        rinv_j = 1.0 / tl.maximum(tl.sqrt(csq), eps)
        # every program computes the same column norms bit for bit and writes them (identical
        # values: a benign race); step 3 reads them back, so x̂_i and x̂_nn use the same rounding
        # and duplicate rows give x̂_i - x̂_nn = 0 exactly, as F.normalize does
        tl.store(Rinv_ptr + g * n + cols, rinv_j, mask=col_ok)
        s = acc * rinv_j[None, :]
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
        upd = tile_max > best  # strict: the first maximum wins, as torch.argmax on CPU
        best = tl.where(upd, tile_max, best)
        best_j = tl.where(upd, n0 + tile_arg, best_j)
    tl.debug_barrier()  # this program's Rinv stores are visible to all its threads

    # 3) v_i = x̂_i - x̂_nn + eps (eps on the difference, as PairwiseDistance), d_i, t_i, u_i
    rinv_i = tl.load(Rinv_ptr + g * n + rows, mask=row_ok, other=0.0)
    best_r = tl.load(Rinv_ptr + g * n + best_j, mask=row_ok, other=0.0)
    d = _nn_distance(x_g, stride_x_row, rows, row_ok, best_j, rinv_i, best_r, D, eps,
                     g * nq - q0, Nn_ptr, Dist_ptr, T_ptr, U_ptr, BLOCK_M, BLOCK_K)

    # 4) mean over the query rows, summed in a fixed order
    partial = tl.sum(tl.where(row_ok, -tl.log(d + eps), 0.0), axis=0)
    if SINGLE:
        tl.store(Loss_ptr + g, partial / nq)
    else:
        tl.store(Partial_ptr + g * num_blocks + pid_m, partial)
        tl.debug_barrier()  # every thread's store precedes the (acq_rel) counter increment
        done = tl.atomic_add(Count_ptr + g, 1)
        if done == num_blocks - 1:  # last row block of this group: reduce in block order
            acc_p = tl.zeros([BLOCK_M], dtype=tl.float32)
            offs_b = tl.arange(0, BLOCK_M)
            for b0 in range(0, num_blocks, BLOCK_M):
                acc_p += tl.load(Partial_ptr + g * num_blocks + b0 + offs_b,
                                 mask=b0 + offs_b < num_blocks, other=0.0, volatile=True)
            tl.store(Loss_ptr + g, tl.sum(acc_p, axis=0) / nq)


@triton.jit
def _store_dx(DX_ptr, Nn_ptr, Dist_ptr, T_ptr, Rinv_ptr, x_g, stride_x_g, stride_x_row, g, n, q0,
              nq, j, j_ok, kk, k_ok, m_j, xh_j, r_j, acc, pu, gscale, eps):
    """The end both backward kernels share: row j's own term s_j v_j when j is a query row,
    dx̂_j = s_j v_j - Σ_choosers (acc), its projection through the normalisation (choosers'
    part in pu) and the store of dx_j (math in the file header)."""
    is_q = j_ok & (j >= q0) & (j < q0 + nq)
    jq = g * nq + (j - q0)
    nn_j = tl.load(Nn_ptr + jq, mask=is_q, other=0).to(tl.int32)
    d_j = tl.load(Dist_ptr + jq, mask=is_q, other=1.0)
    t_j = tl.load(T_ptr + jq, mask=is_q, other=0.0)
    s_j = tl.where(is_q & (d_j > 0), gscale / ((d_j + eps) * d_j), 0.0)
    r_nj = tl.load(Rinv_ptr + g * n + nn_j, mask=is_q, other=0.0)
    m_q = is_q[:, None] & k_ok[None, :]
    xn_j = tl.load(x_g + nn_j[:, None] * stride_x_row + kk[None, :], mask=m_q, other=0.0)
    v_j = tl.where(m_q, xh_j - xn_j.to(tl.float32) * r_nj[:, None] + eps, 0.0)

    dxh = s_j[:, None] * v_j - acc
    proj = tl.where(r_j * eps < 1.0, s_j * t_j - pu, 0.0)  # ‖x‖ <= eps: normalize is linear
    dx = (dxh - xh_j * proj[:, None]) * r_j[:, None]
    tl.store(DX_ptr + g * stride_x_g + j[:, None] * stride_x_row + kk[None, :],
             to_stored(dx, DX_ptr.dtype.element_ty), mask=m_j)


@triton.jit
def _koleo_bwd_kernel(
    DX_ptr,  # [G, n, D] out, x's dtype
    DLoss_ptr,  # [G] fp32 in: upstream gradient of each group's loss
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    Nn_ptr,  # [G, nq] int64 in
    Dist_ptr,  # [G, nq] fp32 in
    T_ptr,  # [G, nq] fp32 in
    U_ptr,  # [G, nq] fp32 in
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_J: tl.constexpr,  # output rows per program
    BLOCK_I: tl.constexpr,  # query rows (potential choosers) per tile
    BLOCK_D: tl.constexpr,  # features per program
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot for the chooser sum (else TF32)
):
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    x_g = X_ptr + g * stride_x_g
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n
    kk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = kk < D
    m_j = j_ok[:, None] & k_ok[None, :]
    r_j = tl.load(Rinv_ptr + g * n + j, mask=j_ok, other=0.0)
    xh_j = tl.load(x_g + j[:, None] * stride_x_row + kk[None, :], mask=m_j, other=0.0)
    xh_j = xh_j.to(tl.float32) * r_j[:, None]
    gscale = tl.load(DLoss_ptr + g) * (-1.0 / nq)

    # sum over the query rows i that chose j as their neighbour:
    # acc = sum_i s_i v_i, pu = sum_i s_i u_i
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    pu = tl.zeros([BLOCK_J], dtype=tl.float32)
    offs_i = tl.arange(0, BLOCK_I)
    for i0 in range(0, nq, BLOCK_I):
        ii = i0 + offs_i
        i_ok = ii < nq
        nn_i = tl.load(Nn_ptr + g * nq + ii, mask=i_ok, other=-1).to(tl.int32)
        match = (nn_i[None, :] == j[:, None]) & i_ok[None, :]  # [BLOCK_J, BLOCK_I]
        if tl.sum(match.to(tl.int32), axis=None) > 0:  # most tiles have no chooser: skip them
            d_i = tl.load(Dist_ptr + g * nq + ii, mask=i_ok, other=1.0)
            u_i = tl.load(U_ptr + g * nq + ii, mask=i_ok, other=0.0)
            s_i = tl.where(i_ok & (d_i > 0), gscale / ((d_i + eps) * d_i), 0.0)
            w = tl.where(match, s_i[None, :], 0.0)
            nn_c = tl.where(i_ok, nn_i, 0)
            r_i = tl.load(Rinv_ptr + g * n + q0 + ii, mask=i_ok, other=0.0)
            r_n = tl.load(Rinv_ptr + g * n + nn_c, mask=i_ok, other=0.0)
            m_i = i_ok[:, None] & k_ok[None, :]
            xi = tl.load(x_g + (q0 + ii)[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
            xn = tl.load(x_g + nn_c[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
            v = tl.where(m_i, xi.to(tl.float32) * r_i[:, None] - xn.to(tl.float32) * r_n[:, None]
                         + eps, 0.0)  # [BLOCK_I, BLOCK_D]
            if IEEE:
                acc = tl.dot(w, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, v, acc)
            pu += tl.sum(w * u_i[None, :], axis=1)

    # j's own term when j is a query row, then dx
    _store_dx(DX_ptr, Nn_ptr, Dist_ptr, T_ptr, Rinv_ptr, x_g, stride_x_g, stride_x_row, g, n,
              q0, nq, j, j_ok, kk, k_ok, m_j, xh_j, r_j, acc, pu, gscale, eps)


# ---- the small-group path (n <= SMALL_MAX_N: DINOv3's per-rank groups): split-K, one launch ----


@triton.jit
def _koleo_small_fwd_kernel(
    Loss_ptr,  # [G] fp32 out: mean of -log(d + eps) over the query rows
    Nn_ptr,  # [G, nq] int64 out
    Dist_ptr,  # [G, nq] fp32 out
    T_ptr,  # [G, nq] fp32 out
    U_ptr,  # [G, nq] fp32 out
    Rinv_ptr,  # [G, n] fp32 out
    Part_ptr,  # [G, RB, KS, BLOCK_M, NP] fp32 scratch: partial dots of each K split
    Csq_ptr,  # [G, RB, KS, NP] fp32 scratch: partial column sums of squares of each K split
    LossPart_ptr,  # [G, RB] fp32 scratch: per-row-block sums of -log(d + eps)
    Count_ptr,  # [G·RB + G] int32: zero on entry, left zero on exit (the finishers reset them)
    X_ptr,  # [G, n, D] in, fp32 or bf16, last dim contiguous
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    KS,  # K splits (programs along axis 1)
    k_per_split,  # features per split, a multiple of BLOCK_K
    eps,
    BLOCK_M: tl.constexpr,  # query rows per program (16: the smallest tl.dot M)
    BLOCK_N: tl.constexpr,  # candidate columns per tile
    BLOCK_K: tl.constexpr,  # features per dot step
    BLOCK_D: tl.constexpr,  # features per step of the distance pass
    UNROLL: tl.constexpr,  # partial tiles the finisher loads per step
    UPCAST: tl.constexpr,  # upcast bf16 tiles before tl.dot (interpreter bug, 2026-05)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot (TF32 would flip near-tied argmaxes)
):
    # grid (RB, KS, G). Every program computes the dots of its BLOCK_M query rows with all n
    # columns over its K split [k_lo, k_hi) and the columns' partial squared norms, and stores
    # them; the last of the KS programs of a row block to arrive (atomic counter) sums the KS
    # partials in split order (deterministic), takes the max/argmax, runs the distance pass over
    # D for its rows and stores the row block's loss partial; the last row block of a group to
    # arrive sums those in block order. The counters are reset by the program that consumed them.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    RB = tl.num_programs(0)
    G = tl.num_programs(2)
    NP = tl.cdiv(n, BLOCK_N) * BLOCK_N
    x_g = X_ptr + g * stride_x_g
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    qi = pid_m * BLOCK_M + offs_m  # query-local
    rows = q0 + qi  # group-local
    row_ok = qi < nq
    blk = g * RB + pid_m  # this row block's id in [0, G·RB)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, D)

    # 1) partial dots and column norms over this program's K split, one column tile at a time
    part = Part_ptr + (blk * KS + pid_k) * (BLOCK_M * NP)
    csqp = Csq_ptr + (blk * KS + pid_k) * NP
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        csq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + offs_k
            k_ok = (kk < k_hi)[None, :]
            a = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :],
                        mask=row_ok[:, None] & k_ok, other=0.0)
            b = tl.load(x_g + cols[:, None] * stride_x_row + kk[None, :],
                        mask=col_ok[:, None] & k_ok, other=0.0)
            b32 = b.to(tl.float32)
            csq += tl.sum(b32 * b32, axis=1)
            if UPCAST:
                a = a.to(tl.float32)
                b = b32
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        tl.store(part + offs_m[:, None] * NP + cols[None, :], acc)  # padded: no mask
        tl.store(csqp + cols, csq)

    # 2) the last program of the row block finishes it
    tl.debug_barrier()  # every thread's partial stores precede the (acq_rel) counter increment
    ticket = KS - 1
    if KS > 1:
        ticket = tl.atomic_add(Count_ptr + blk, 1)
    if ticket == KS - 1:
        if KS > 1:
            tl.atomic_xchg(Count_ptr + blk, 0)  # all KS arrived: reset for the next call
        best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
        best_r = tl.zeros([BLOCK_M], dtype=tl.float32)  # rinv of the best column
        rinv_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # rinv of the query rows
        part0 = Part_ptr + blk * KS * (BLOCK_M * NP)
        csq0 = Csq_ptr + blk * KS * NP
        for n0 in range(0, n, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < n
            dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            csq = tl.zeros([BLOCK_N], dtype=tl.float32)
            # the splits in order, UNROLL loads issued per step (independent: one round trip,
            # not UNROLL); volatile: written by other SMs, the (incoherent) L1 must not serve them
            for s0 in range(0, KS, UNROLL):
                for s1 in tl.static_range(UNROLL):
                    s = s0 + s1
                    ok = col_ok & (offs_n * 0 + s < KS)  # a vector (the interpreter)
                    dots += tl.load(part0 + s * (BLOCK_M * NP) + offs_m[:, None] * NP
                                    + cols[None, :], mask=ok[None, :], other=0.0, volatile=True)
                    csq += tl.load(csq0 + s * NP + cols, mask=ok, other=0.0, volatile=True)
            rinv_j = 1.0 / tl.maximum(tl.sqrt(csq), eps)
            # every row block's finisher writes the same norms bit for bit (a benign race), for
            # the backward; this program takes its own rows' and neighbours' norms from these
            # registers (exact masked sums), so x̂_i and x̂_nn share one rounding (duplicates)
            tl.store(Rinv_ptr + g * n + cols, rinv_j, mask=col_ok)
            rinv_i += tl.sum(tl.where(cols[None, :] == rows[:, None], rinv_j[None, :], 0.0), axis=1)
            sc = dots * rinv_j[None, :]
            sc = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), sc, float("-inf"))
            tile_max, tile_arg = tl.max(sc, axis=1, return_indices=True)
            tile_r = tl.sum(tl.where(offs_n[None, :] == tile_arg[:, None], rinv_j[None, :], 0.0),
                            axis=1)
            upd = tile_max > best  # strict: the first maximum wins, as torch.argmax
            best = tl.where(upd, tile_max, best)
            best_j = tl.where(upd, n0 + tile_arg, best_j)
            best_r = tl.where(upd, tile_r, best_r)

        # 3) v_i = x̂_i - x̂_nn + eps, d_i, t_i, u_i (as the fused kernel), wide D steps
        # inline, not `_nn_distance`: through the helper triton 3.6 allocates this kernel 255
        # registers on sm_90 and spills 16 B (195 registers inline), whatever the argument order
        offs_d = tl.arange(0, BLOCK_D)
        dsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        t = tl.zeros([BLOCK_M], dtype=tl.float32)
        u = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            kk = k0 + offs_d
            m = row_ok[:, None] & (kk < D)[None, :]
            xi = tl.load(x_g + rows[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
            xn = tl.load(x_g + best_j[:, None] * stride_x_row + kk[None, :], mask=m, other=0.0)
            xi = xi.to(tl.float32) * rinv_i[:, None]
            xn = xn.to(tl.float32) * best_r[:, None]
            v = tl.where(m, xi - xn + eps, 0.0)
            dsq += tl.sum(v * v, axis=1)
            t += tl.sum(xi * v, axis=1)
            u += tl.sum(xn * v, axis=1)
        d = tl.sqrt(dsq)
        q = g * nq + qi
        tl.store(Nn_ptr + q, best_j.to(tl.int64), mask=row_ok)
        tl.store(Dist_ptr + q, d, mask=row_ok)
        tl.store(T_ptr + q, t, mask=row_ok)
        tl.store(U_ptr + q, u, mask=row_ok)

        # 4) the group's mean over its row blocks, summed in block order by the last to arrive
        partial = tl.sum(tl.where(row_ok, -tl.log(d + eps), 0.0), axis=0)
        if RB == 1:
            tl.store(Loss_ptr + g, partial / nq)
        else:
            tl.store(LossPart_ptr + blk, partial)
            tl.debug_barrier()
            cnt = Count_ptr + G * RB + g
            done = tl.atomic_add(cnt, 1)
            if done == RB - 1:
                tl.atomic_xchg(cnt, 0)
                acc_p = tl.zeros([BLOCK_M], dtype=tl.float32)
                for b0 in range(0, RB, BLOCK_M):
                    acc_p += tl.load(LossPart_ptr + g * RB + b0 + offs_m,
                                     mask=b0 + offs_m < RB, other=0.0, volatile=True)
                tl.store(Loss_ptr + g, tl.sum(acc_p, axis=0) / nq)


@triton.jit
def _chooser_tile(x_g, Nn_ptr, Dist_ptr, U_ptr, Rinv_ptr, stride_x_row, g, n, q0, nq, i0, j, kk,
                  k_ok, gscale, eps, acc, pu, BLOCK_I: tl.constexpr, IEEE: tl.constexpr):
    """acc += Σ_{i in tile, nn(i) = j} s_i v_i, pu += Σ s_i u_i over the query rows
    [i0, i0 + BLOCK_I) (the masked chooser product of _koleo_bwd_kernel, no skip branch: one
    basic block, so the compiler can issue its loads together with the caller's)."""
    ii = i0 + tl.arange(0, BLOCK_I)
    i_ok = ii < nq
    nn_i = tl.load(Nn_ptr + g * nq + ii, mask=i_ok, other=-1).to(tl.int32)
    d_i = tl.load(Dist_ptr + g * nq + ii, mask=i_ok, other=1.0)
    u_i = tl.load(U_ptr + g * nq + ii, mask=i_ok, other=0.0)
    r_i = tl.load(Rinv_ptr + g * n + q0 + ii, mask=i_ok, other=0.0)
    m_i = i_ok[:, None] & k_ok[None, :]
    xi = tl.load(x_g + (q0 + ii)[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
    nn_c = tl.where(i_ok, nn_i, 0)
    r_n = tl.load(Rinv_ptr + g * n + nn_c, mask=i_ok, other=0.0)
    xn = tl.load(x_g + nn_c[:, None] * stride_x_row + kk[None, :], mask=m_i, other=0.0)
    s_i = tl.where(i_ok & (d_i > 0), gscale / ((d_i + eps) * d_i), 0.0)
    w = tl.where((nn_i[None, :] == j[:, None]) & i_ok[None, :], s_i[None, :], 0.0)
    v = tl.where(m_i, xi.to(tl.float32) * r_i[:, None] - xn.to(tl.float32) * r_n[:, None] + eps,
                 0.0)  # [BLOCK_I, BLOCK_D], the forward's v_i bit for bit
    if IEEE:
        acc = tl.dot(w, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(w, v, acc)
    pu += tl.sum(w * u_i[None, :], axis=1)
    return acc, pu


@triton.jit
def _koleo_small_bwd_kernel(
    DX_ptr,  # [G, n, D] out, x's dtype
    DLoss_ptr,  # [G] fp32 in: upstream gradient of each group's loss
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    Nn_ptr,  # [G, nq] int64 in
    Dist_ptr,  # [G, nq] fp32 in
    T_ptr,  # [G, nq] fp32 in
    U_ptr,  # [G, nq] fp32 in
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_J: tl.constexpr,  # output rows per program
    BLOCK_I: tl.constexpr,  # query rows (potential choosers) per tile: all of them when <= it
    BLOCK_D: tl.constexpr,  # features per program
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot for the chooser sum (else TF32)
):
    # The math and the result of _koleo_bwd_kernel, laid out for latency: every load that does not
    # depend on a neighbour index (row j's own x, nn_j, d_j, t_j; the first chooser tile's nn_i,
    # d_i, u_i, x_i) is issued first, then the gathers by nn_j and nn_i together: two round trips
    # when the group's nq query rows fit one tile (B <= BLOCK_I), where the large-group kernel
    # takes four (chooser tile, its gathers, then nn_j, its gathers) plus a branch per tile.
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    x_g = X_ptr + g * stride_x_g
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n
    kk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = kk < D
    m_j = j_ok[:, None] & k_ok[None, :]
    gscale = tl.load(DLoss_ptr + g) * (-1.0 / nq)
    # row j's own term: s_j v_j when j is a query row (as _store_dx)
    r_j = tl.load(Rinv_ptr + g * n + j, mask=j_ok, other=0.0)
    xh_j = tl.load(x_g + j[:, None] * stride_x_row + kk[None, :], mask=m_j, other=0.0)
    xh_j = xh_j.to(tl.float32) * r_j[:, None]
    is_q = j_ok & (j >= q0) & (j < q0 + nq)
    jq = g * nq + (j - q0)
    nn_j = tl.load(Nn_ptr + jq, mask=is_q, other=0).to(tl.int32)
    d_j = tl.load(Dist_ptr + jq, mask=is_q, other=1.0)
    t_j = tl.load(T_ptr + jq, mask=is_q, other=0.0)
    r_nj = tl.load(Rinv_ptr + g * n + nn_j, mask=is_q, other=0.0)
    m_q = is_q[:, None] & k_ok[None, :]
    xn_j = tl.load(x_g + nn_j[:, None] * stride_x_row + kk[None, :], mask=m_q, other=0.0)
    # the choosers: the first tile in the same basic block as the loads above, the rest (nq >
    # BLOCK_I) in a loop
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    pu = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc, pu = _chooser_tile(x_g, Nn_ptr, Dist_ptr, U_ptr, Rinv_ptr, stride_x_row, g, n, q0, nq,
                            0, j, kk, k_ok, gscale, eps, acc, pu, BLOCK_I, IEEE)
    for i0 in range(BLOCK_I, nq, BLOCK_I):
        acc, pu = _chooser_tile(x_g, Nn_ptr, Dist_ptr, U_ptr, Rinv_ptr, stride_x_row, g, n, q0,
                                nq, i0, j, kk, k_ok, gscale, eps, acc, pu, BLOCK_I, IEEE)

    s_j = tl.where(is_q & (d_j > 0), gscale / ((d_j + eps) * d_j), 0.0)
    v_j = tl.where(m_q, xh_j - xn_j.to(tl.float32) * r_nj[:, None] + eps, 0.0)
    dxh = s_j[:, None] * v_j - acc
    proj = tl.where(r_j * eps < 1.0, s_j * t_j - pu, 0.0)  # ‖x‖ <= eps: normalize is linear
    dx = (dxh - xh_j * proj[:, None]) * r_j[:, None]
    tl.store(DX_ptr + g * stride_x_g + j[:, None] * stride_x_row + kk[None, :],
             to_stored(dx, DX_ptr.dtype.element_ty), mask=m_j)


# ---- the split path (large groups): norms, column-split search, merge + distances, sorted bwd --


@triton.jit
def _koleo_rinv_kernel(
    Rinv_ptr,  # [G, n] fp32 out: 1 / max(‖x_j‖, eps)
    X_ptr,  # [G, n, D] in
    stride_x_g, stride_x_row,
    n, D,
    eps,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # features per tile
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    offs_k = tl.arange(0, BLOCK_K)
    sq = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        xv = tl.load(X_ptr + g * stride_x_g + rows[:, None] * stride_x_row + kk[None, :],
                     mask=row_ok[:, None] & (kk < D)[None, :], other=0.0).to(tl.float32)
        sq += xv * xv
    rinv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=1)), eps)
    tl.store(Rinv_ptr + g * n + rows, rinv, mask=row_ok)


@triton.jit
def _koleo_search_kernel(
    BestV_ptr,  # [G, S, nq] fp32 out: this split's max of x_i·x_j / ‖x_j‖
    BestJ_ptr,  # [G, S, nq] int32 out: its (first) argmax, group-local
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    cols_per_split,  # a multiple of BLOCK_N
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # candidate columns per tile
    BLOCK_K: tl.constexpr,  # features per tile
    UPCAST: tl.constexpr,  # upcast bf16 tiles before tl.dot (interpreter bug, 2026-05)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot (TF32 would flip near-tied argmaxes)
    ALIGNED: tl.constexpr,  # D % BLOCK_K == 0, x and its row strides 16-byte aligned
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    S = tl.num_programs(1)
    x_g = X_ptr + g * stride_x_g
    qi = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query-local
    rows = q0 + qi  # group-local
    row_ok = qi < nq
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, n)

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_M], dtype=tl.int32)
    # flatten: the compiler fuses the column and K loops into one software pipeline, so the
    # cp.async prologue/drain is paid once per program, not once per column tile (D = 384: 6 K
    # steps per tile)
    for n0 in tl.range(c_lo, c_hi, BLOCK_N, flatten=True):
        cols = n0 + offs_n
        col_ok = cols < c_hi
        # a plain GEMM main loop: no norm work in it (the norms come from _koleo_rinv_kernel)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            pa = x_g + rows[:, None] * stride_x_row + kk[None, :]
            pb = x_g + cols[:, None] * stride_x_row + kk[None, :]
            if ALIGNED:
                # what the JIT would infer from 16-divisible arguments, stated in the kernel so
                # the ahead-of-time compile (compile_specs) builds the same 16-byte cp.async
                # pipeline as the runtime one; no K mask
                pa = tl.max_contiguous(tl.multiple_of(pa, [1, 16]), [1, BLOCK_K])
                pb = tl.max_contiguous(tl.multiple_of(pb, [1, 16]), [1, BLOCK_K])
                a = tl.load(pa, mask=row_ok[:, None], other=0.0)
                b = tl.load(pb, mask=col_ok[:, None], other=0.0)
            else:
                k_ok = (kk < D)[None, :]
                a = tl.load(pa, mask=row_ok[:, None] & k_ok, other=0.0)
                b = tl.load(pb, mask=col_ok[:, None] & k_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        rinv_j = tl.load(Rinv_ptr + g * n + cols, mask=col_ok, other=0.0)
        s = acc * rinv_j[None, :]
        s = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), s, float("-inf"))
        tile_max, tile_arg = tl.max(s, axis=1, return_indices=True)
        upd = tile_max > best  # strict: the first maximum wins
        best = tl.where(upd, tile_max, best)
        best_j = tl.where(upd, n0 + tile_arg, best_j)
    out = (g * S + pid_s) * nq + qi
    tl.store(BestV_ptr + out, best, mask=row_ok)
    tl.store(BestJ_ptr + out, best_j, mask=row_ok)


@triton.jit
def _koleo_search_sym_kernel(
    BestV_ptr,  # [G, nb, n] fp32 out: row r's max over the columns of block c, at [g, c, r]
    BestJ_ptr,  # [G, nb, n] int32 out: its (first) argmax, group-local
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    stride_x_g, stride_x_row,
    n, D,
    BLOCK: tl.constexpr,  # rows = columns per tile
    BLOCK_K: tl.constexpr,  # features per tile
    UPCAST: tl.constexpr,  # upcast bf16 tiles before tl.dot (interpreter bug, 2026-05)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot
    ALIGNED: tl.constexpr,  # D % BLOCK_K == 0, x and its row strides 16-byte aligned
):
    # every row is a query (q0 = 0, nq = n): x·xᵀ is symmetric, so only tiles (I, J) with I <= J
    # are computed; a tile gives the row maxima of block I over the columns of J and, off the
    # diagonal, the row maxima of block J over the columns of I (its column maxima): half the FLOPs
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j >= pid_i:
        g = tl.program_id(2).to(tl.int64)
        nb = tl.num_programs(0)
        x_g = X_ptr + g * stride_x_g
        offs = tl.arange(0, BLOCK)
        ri = pid_i * BLOCK + offs
        rj = pid_j * BLOCK + offs
        ri_ok = ri < n
        rj_ok = rj < n
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            pa = x_g + ri[:, None] * stride_x_row + kk[None, :]
            pb = x_g + rj[:, None] * stride_x_row + kk[None, :]
            if ALIGNED:  # see _koleo_search_kernel
                pa = tl.max_contiguous(tl.multiple_of(pa, [1, 16]), [1, BLOCK_K])
                pb = tl.max_contiguous(tl.multiple_of(pb, [1, 16]), [1, BLOCK_K])
                a = tl.load(pa, mask=ri_ok[:, None], other=0.0)
                b = tl.load(pb, mask=rj_ok[:, None], other=0.0)
            else:
                k_ok = (kk < D)[None, :]
                a = tl.load(pa, mask=ri_ok[:, None] & k_ok, other=0.0)
                b = tl.load(pb, mask=rj_ok[:, None] & k_ok, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        rinv_i = tl.load(Rinv_ptr + g * n + ri, mask=ri_ok, other=0.0)
        rinv_j = tl.load(Rinv_ptr + g * n + rj, mask=rj_ok, other=0.0)
        # rows of I against the columns of J (the diagonal masked on the diagonal tile)
        s = acc * rinv_j[None, :]
        s = tl.where(rj_ok[None, :] & (rj[None, :] != ri[:, None]), s, float("-inf"))
        v, arg = tl.max(s, axis=1, return_indices=True)  # ties: the lowest column
        out = (g * nb + pid_j) * n
        tl.store(BestV_ptr + out + ri, v, mask=ri_ok)
        tl.store(BestJ_ptr + out + ri, pid_j * BLOCK + arg, mask=ri_ok)
        if pid_j != pid_i:
            # rows of J against the columns of I: the same dots, scaled by the candidates' norms
            s = acc * rinv_i[:, None]
            s = tl.where(ri_ok[:, None], s, float("-inf"))
            v, arg = tl.max(s, axis=0, return_indices=True)
            out = (g * nb + pid_i) * n
            tl.store(BestV_ptr + out + rj, v, mask=rj_ok)
            tl.store(BestJ_ptr + out + rj, pid_i * BLOCK + arg, mask=rj_ok)


@triton.jit
def _koleo_finish_kernel(
    Partial_ptr,  # [G, num_blocks] fp32 out: per-row-block sums of -log(d + eps)
    Nn_ptr,  # [G, nq] int64 out
    Dist_ptr,  # [G, nq] fp32 out
    T_ptr,  # [G, nq] fp32 out
    U_ptr,  # [G, nq] fp32 out
    BestV_ptr,  # [G, S, nq] fp32 in
    BestJ_ptr,  # [G, S, nq] int32 in
    Rinv_ptr,  # [G, n] fp32 in
    X_ptr,  # [G, n, D] in
    stride_x_g, stride_x_row,
    n, D, q0, nq, S,
    eps,
    BLOCK_R: tl.constexpr,  # query rows per program
    BLOCK_K: tl.constexpr,  # features per tile
):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_blocks = tl.num_programs(0)
    x_g = X_ptr + g * stride_x_g
    qi = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = qi < nq
    rows = q0 + qi
    # merge the splits in column order with a strict '>': the first maximum wins, as in one scan
    best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_R], dtype=tl.int32)
    for s in range(0, S):
        v = tl.load(BestV_ptr + (g * S + s) * nq + qi, mask=row_ok, other=float("-inf"))
        j = tl.load(BestJ_ptr + (g * S + s) * nq + qi, mask=row_ok, other=0)
        upd = v > best
        best = tl.where(upd, v, best)
        best_j = tl.where(upd, j, best_j)

    # v_i = x̂_i - x̂_nn + eps, d_i, t_i, u_i: the same pass as the fused kernel's step 3
    rinv_i = tl.load(Rinv_ptr + g * n + rows, mask=row_ok, other=0.0)
    best_r = tl.load(Rinv_ptr + g * n + best_j, mask=row_ok, other=0.0)
    d = _nn_distance(x_g, stride_x_row, rows, row_ok, best_j, rinv_i, best_r, D, eps,
                     g * nq - q0, Nn_ptr, Dist_ptr, T_ptr, U_ptr, BLOCK_R, BLOCK_K)
    tl.store(Partial_ptr + g * num_blocks + pid,
             tl.sum(tl.where(row_ok, -tl.log(d + eps), 0.0), axis=0))


@triton.jit
def _koleo_bwd_sorted_kernel(
    DX_ptr,  # [G, n, D] out, x's dtype
    DLoss_ptr,  # [G] fp32 in
    X_ptr,  # [G, n, D] in
    Rinv_ptr,  # [G, n] fp32 in
    Nn_ptr,  # [G, nq] int64 in
    Dist_ptr,  # [G, nq] fp32 in
    T_ptr,  # [G, nq] fp32 in
    U_ptr,  # [G, nq] fp32 in
    Perm_ptr,  # [G, nq] int64 in: query rows sorted by their neighbour (stable: i ascending)
    SortedNn_ptr,  # [G, nq] int64 in: Nn in that order (non-decreasing)
    Seg_ptr,  # [G, num_j_blocks + 1] int32 in: first sorted position of each BLOCK_J row block
    stride_x_g, stride_x_row,
    n, D, q0, nq,
    eps,
    BLOCK_J: tl.constexpr,  # output rows per program
    BLOCK_C: tl.constexpr,  # choosers per step
    BLOCK_D: tl.constexpr,  # features per program
):
    pid_j = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    num_j = tl.num_programs(0)
    x_g = X_ptr + g * stride_x_g
    j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < n
    kk = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = kk < D
    m_j = j_ok[:, None] & k_ok[None, :]
    r_j = tl.load(Rinv_ptr + g * n + j, mask=j_ok, other=0.0)
    xh_j = tl.load(x_g + j[:, None] * stride_x_row + kk[None, :], mask=m_j, other=0.0)
    xh_j = xh_j.to(tl.float32) * r_j[:, None]
    gscale = tl.load(DLoss_ptr + g) * (-1.0 / nq)

    # this row block's choosers are one contiguous run [lo, hi) of the sorted list
    lo = tl.load(Seg_ptr + g * (num_j + 1) + pid_j)
    hi = tl.load(Seg_ptr + g * (num_j + 1) + pid_j + 1)
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    pu = tl.zeros([BLOCK_J], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for p0 in range(lo, hi, BLOCK_C):
        p = p0 + offs_c
        p_ok = p < hi
        i = tl.load(Perm_ptr + g * nq + p, mask=p_ok, other=0).to(tl.int32)  # query-local
        jn = tl.load(SortedNn_ptr + g * nq + p, mask=p_ok, other=-1).to(tl.int32)
        d_i = tl.load(Dist_ptr + g * nq + i, mask=p_ok, other=1.0)
        u_i = tl.load(U_ptr + g * nq + i, mask=p_ok, other=0.0)
        s_i = tl.where(p_ok & (d_i > 0), gscale / ((d_i + eps) * d_i), 0.0)
        r_i = tl.load(Rinv_ptr + g * n + q0 + i, mask=p_ok, other=0.0)
        r_n = tl.load(Rinv_ptr + g * n + jn, mask=p_ok, other=0.0)
        m_c = p_ok[:, None] & k_ok[None, :]
        xi = tl.load(x_g + (q0 + i)[:, None] * stride_x_row + kk[None, :], mask=m_c, other=0.0)
        xn = tl.load(x_g + jn[:, None] * stride_x_row + kk[None, :], mask=m_c, other=0.0)
        v = tl.where(m_c, xi.to(tl.float32) * r_i[:, None] - xn.to(tl.float32) * r_n[:, None]
                     + eps, 0.0)  # [BLOCK_C, BLOCK_D], the forward's v_i bit for bit
        hit = jn[None, :] == j[:, None]  # [BLOCK_J, BLOCK_C]: chooser c chose output row j
        # exact 0/1 segment matrix: the IEEE dot adds each row's s_i v_i in fp32, in sorted order
        acc = tl.dot(hit.to(tl.float32), s_i[:, None] * v, acc, input_precision="ieee")
        pu += tl.sum(tl.where(hit, (s_i * u_i)[None, :], 0.0), axis=1)

    # j's own term when j is a query row, then dx (as the fused backward)
    _store_dx(DX_ptr, Nn_ptr, Dist_ptr, T_ptr, Rinv_ptr, x_g, stride_x_g, stride_x_row, g, n,
              q0, nq, j, j_ok, kk, k_ok, m_j, xh_j, r_j, acc, pu, gscale, eps)


# ----------------------------------------------------------------------------------------------
# Launchers: path choice, tile configs
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16)
PATHS = ("auto", "small", "fused", "split")


def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(v)))


def _gpu_fwd_config(block_m: int, dtype: torch.dtype) -> dict:
    """Fused forward tile sizes checked spill-free for sm_90 and sm_80 (cuobjdump, triton 3.6 and
    3.9): 32-wide K tiles and 8 warps for bf16 (64-wide K or 4 warps spill); the IEEE fp32 dot runs
    on FMA units and needs small tiles (32 x 16) and no software pipelining (triton 3.6 spills)."""
    if dtype == torch.bfloat16:
        return dict(BLOCK_M=block_m, BLOCK_N=128 if block_m == 64 else 64, BLOCK_K=32,
                    num_warps=8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=16, num_warps=4 if block_m == 16 else 8,
                num_stages=1)


# the row-block sizes the fused GPU heuristic can pick, per dtype (fp32 stops at 32: 64 spills)
_GPU_BLOCK_M = {torch.bfloat16: (16, 32, 64), torch.float32: (16, 32)}


def _fwd_config(nq: int, n: int, D: int, dtype: torch.dtype) -> dict:
    """Fused forward, fixed heuristic (autotune cannot run under the interpreter). Small groups:
    one row block per group (no counter). Larger ones: 32-row blocks up to 1024 query rows, 64
    above for bf16."""
    if is_interpreter():  # big tiles: the interpreter pays per op, not per element
        return dict(BLOCK_M=_clamp_pow2(nq, 16, 64), BLOCK_N=_clamp_pow2(n, 16, 64),
                    BLOCK_K=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    return _gpu_fwd_config(_gpu_fused_block_m(nq, dtype), dtype)


def _gpu_fused_block_m(nq: int, dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 16 if nq <= 16 else 32
    return _clamp_pow2(nq, 16, 64) if nq <= 64 else (32 if nq <= 1024 else 64)


# Split search tiles, keyed (dtype, BLOCK_M, aligned). bf16 aligned (D % 64 == 0 and 16-byte rows:
# every DINOv3 width): the usual tensor-core GEMM tiles, 128 x 128 x 64, 8 warps (two warpgroups on
# sm_90), 3 stages of 16-byte cp.async (96 KB of shared memory); 64-row blocks (one warpgroup) when
# there are few query rows (the distributed variant's local rows), so no half-empty 128-row tile.
# Unaligned bf16 (odd D): masked K tiles cannot be vectorised, the operands go through registers;
# 64 x 64 x 32 tiles, unpipelined, are what compiles spill-free. fp32: the IEEE dot's FMA tiles
# of the fused kernel.
_GPU_SEARCH = {
    (torch.bfloat16, 128, True): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8,
                                      num_stages=3),
    (torch.bfloat16, 64, True): dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4,
                                     num_stages=3),
    (torch.bfloat16, 64, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                      num_stages=1),
    (torch.float32, 32, True): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=1),
    (torch.float32, 32, False): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=8,
                                     num_stages=1),
}
# Symmetric search tiles (every row a query), keyed (dtype, aligned): one square tile per program.
_GPU_SEARCH_SYM = {
    (torch.bfloat16, True): dict(BLOCK=128, BLOCK_K=64, num_warps=8, num_stages=3),
    (torch.bfloat16, False): dict(BLOCK=64, BLOCK_K=32, num_warps=4, num_stages=1),
    (torch.float32, True): dict(BLOCK=32, BLOCK_K=16, num_warps=8, num_stages=1),
    (torch.float32, False): dict(BLOCK=32, BLOCK_K=16, num_warps=8, num_stages=1),
}
# rows x features per program of the O(n·D) passes (norms, merge + distances)
_GPU_ROWS = dict(BLOCK_R=16, BLOCK_K=128, num_warps=8, num_stages=2)
# sorted backward: 16 output rows (the smallest tl.dot M: the segment matrix costs 2·BLOCK_J FLOP
# per chooser and feature) x 128 features, 16 choosers per step; 8 warps, 1 stage (4 warps or 2
# stages spill under triton 3.6 or 3.9)
_GPU_BWD_SORTED = dict(BLOCK_J=16, BLOCK_C=16, BLOCK_D=128, num_warps=8, num_stages=1)
# fp32 rows: 64-wide D tiles. With the runtime's 16-divisibility, 128 wide spilled 8 B on sm_90
# under triton 3.6 (64 registers); 64 wide takes 58 registers, no stack, on both tritons.
_GPU_BWD_SORTED_FP32 = {**_GPU_BWD_SORTED, "BLOCK_D": 64}


def _aligned_rows(x: torch.Tensor) -> bool:
    """x's base and row strides are 16-byte aligned (cp.async / vector loads need it)."""
    es = x.element_size()
    return x.data_ptr() % 16 == 0 and all(st * es % 16 == 0 for st in x.stride()[:2])


def _search_config(nq: int, n: int, D: int, dtype: torch.dtype, aligned_rows: bool) -> dict:
    """Split search tiles plus ALIGNED (D a multiple of BLOCK_K and 16-byte aligned rows)."""
    if is_interpreter():  # a few column tiles per group, so the splits and their merge run
        cfg = dict(BLOCK_M=_clamp_pow2(nq, 16, 64), BLOCK_N=_clamp_pow2(cdiv(n, 4), 16, 64),
                   BLOCK_K=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
        return dict(cfg, ALIGNED=aligned_rows and D % cfg["BLOCK_K"] == 0)
    return _gpu_search_config(nq, D, dtype, aligned_rows)


def _gpu_search_config(nq: int, D: int, dtype: torch.dtype, aligned_rows: bool) -> dict:
    if dtype == torch.float32:
        aligned = aligned_rows and D % 16 == 0
        return dict(_GPU_SEARCH[(dtype, 32, aligned)], ALIGNED=aligned)
    aligned = aligned_rows and D % 64 == 0
    bm = 128 if aligned and nq > 1024 else 64
    return dict(_GPU_SEARCH[(dtype, bm, aligned)], ALIGNED=aligned)


def _search_sym_config(n: int, D: int, dtype: torch.dtype, aligned_rows: bool) -> dict:
    if is_interpreter():  # >= 4 blocks per group, so off-diagonal tiles and their merge run
        cfg = dict(BLOCK=_clamp_pow2(cdiv(n, 4), 16, 64), BLOCK_K=_clamp_pow2(D, 16, 128),
                   num_warps=4, num_stages=1)
        return dict(cfg, ALIGNED=aligned_rows and D % cfg["BLOCK_K"] == 0)
    return _gpu_search_sym_config(D, dtype, aligned_rows)


def _gpu_search_sym_config(D: int, dtype: torch.dtype, aligned_rows: bool) -> dict:
    aligned = aligned_rows and D % (16 if dtype == torch.float32 else 64) == 0
    return dict(_GPU_SEARCH_SYM[(dtype, aligned)], ALIGNED=aligned)


def _rows_config(D: int) -> dict:
    if is_interpreter():
        return dict(BLOCK_R=64, BLOCK_K=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    return dict(_GPU_ROWS)


def _bwd_sorted_config(D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    if is_interpreter():
        return dict(BLOCK_J=16, BLOCK_C=16, BLOCK_D=_clamp_pow2(D, 16, 128), num_warps=4,
                    num_stages=1)
    return dict(_GPU_BWD_SORTED_FP32 if dtype == torch.float32 else _GPU_BWD_SORTED)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 64  # interpreter: enough "SMs" that test shapes get one split per column tile
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(G: int, nq: int, n: int, cfg: dict, sms: int) -> tuple[int, int]:
    """(S, cols_per_split): enough column splits that the grid G x row blocks x S fills the SMs
    once (one wave: a second, partial wave would cost as much as a full one), each split a whole
    number of column tiles and none empty."""
    tiles = cdiv(n, cfg["BLOCK_N"])
    s = max(1, min(tiles, sms // (G * cdiv(nq, cfg["BLOCK_M"]))))
    per = cdiv(tiles, s)
    return cdiv(tiles, per), per * cfg["BLOCK_N"]


# The path model (H200 numbers; the header derives them). Times in seconds.
_LAUNCH_S = 3e-6  # one more kernel (or torch op) in the chain, inside a CUDA graph
_FUSED_FLOPS = {torch.bfloat16: 1.2e12, torch.float32: 0.12e12}  # per fused-forward program
_SPLIT_FLOPS = {torch.bfloat16: 4.0e12, torch.float32: 0.12e12}  # per split-search program / SM
_FUSED_BWD_STEP_S = 0.45e-6  # one chooser tile of the fused backward (2 programs per SM)
_HBM_BPS = 4.0e12
_GAIN = 1.25


def _fused_fwd_s(G, nq, n, D, dtype, sms) -> float:
    bm = _gpu_fused_block_m(nq, dtype)
    waves = cdiv(G * cdiv(nq, bm), sms)
    return waves * 2 * bm * n * D / _FUSED_FLOPS[dtype]


def _sym_search_s(G, n, D, dtype, sms) -> float:
    """Symmetric search: one BLOCK x BLOCK tile per program, tiles I <= J only."""
    b = _gpu_search_sym_config(D, dtype, True)["BLOCK"]
    nb = cdiv(n, b)
    return cdiv(G * nb * (nb + 1) // 2, sms) * 2 * b * b * D / _SPLIT_FLOPS[dtype]


def _cols_search_s(G, nq, n, D, dtype, sms) -> float:
    """Column-split search: G x row blocks x S programs, one wave."""
    cfg = _gpu_search_config(nq, D, dtype, True)
    s, cols = _splits(G, nq, n, cfg, sms)
    waves = cdiv(G * cdiv(nq, cfg["BLOCK_M"]) * s, sms)
    return waves * 2 * cfg["BLOCK_M"] * cols * D / _SPLIT_FLOPS[dtype]


def _prefer_sym(G, n, D, dtype, sms) -> bool:
    """Every row a query: the symmetric search unless it has too few tiles to fill the GPU."""
    return _sym_search_s(G, n, D, dtype, sms) <= _cols_search_s(G, n, n, D, dtype, sms)


def _split_fwd_s(G, nq, n, D, dtype, sms) -> float:
    es = torch.finfo(dtype).bits // 8
    passes = 3 * _LAUNCH_S + G * (n + 2 * nq) * D * es / _HBM_BPS  # norms + distances
    search = _cols_search_s(G, nq, n, D, dtype, sms)
    if nq == n:
        search = min(search, _sym_search_s(G, n, D, dtype, sms))
    return passes + search


def _fused_bwd_s(G, nq, n, D, sms) -> float:
    progs = G * cdiv(n, _GPU_BWD["BLOCK_J"]) * cdiv(D, _GPU_BWD["BLOCK_D"])
    return cdiv(progs, 2 * sms) * cdiv(nq, _GPU_BWD["BLOCK_I"]) * _FUSED_BWD_STEP_S


def _sorted_bwd_s(G, nq, n, D, dtype) -> float:
    es = torch.finfo(dtype).bits // 8
    return 3 * _LAUNCH_S + G * (3 * nq + 2 * n) * D * es / _HBM_BPS


def _pick(path: str, G: int, nq: int, n: int, D: int, dtype: torch.dtype,
          device: torch.device) -> tuple[str, str]:
    """(forward kernel, backward kernel) for `path`: forward 'small' | 'fused' | 'split', backward
    'small' | 'fused' | 'sorted'. 'small' / 'fused' / 'split' force both halves. 'auto': groups of
    at most SMALL_MAX_N rows take the small path both ways (split-K forward, one-step chooser
    backward: latency-bound sizes, where spreading the work over programs is what counts); larger
    ones the H200 model of _pick_auto (the interpreter: the fused kernels; tests force 'split')."""
    if path not in PATHS:
        raise ValueError(f"koleo: path={path!r} is invalid: allowed is one of {PATHS}")
    if path == "small" or (path == "auto" and n <= SMALL_MAX_N):
        return "small", "small"
    if path != "auto":
        return path, "sorted" if path == "split" else "fused"
    split, sorted_bwd = (False, False) if is_interpreter() else _pick_auto(
        G, nq, n, D, dtype, _num_sms(device))
    return "split" if split else "fused", "sorted" if sorted_bwd else "fused"


def _pick_auto(G: int, nq: int, n: int, D: int, dtype: torch.dtype, sms: int
               ) -> tuple[bool, bool]:
    """The model's choice: each half leaves its one-launch kernel only for a predicted gain of
    more than _GAIN (the model is rough; near a tie the one-launch kernel is the safer bet)."""
    return (_split_fwd_s(G, nq, n, D, dtype, sms) * _GAIN < _fused_fwd_s(G, nq, n, D, dtype, sms),
            _sorted_bwd_s(G, nq, n, D, dtype) * _GAIN < _fused_bwd_s(G, nq, n, D, sms))


# BLOCK_D 128 (vs 64): 1.7x faster at B=4096 on H200 (fewer programs re-scanning the nn indices);
# BLOCK_I 16: BLOCK_I 32 spills at BLOCK_D 128 under triton 3.6
_GPU_BWD = dict(BLOCK_J=32, BLOCK_I=16, BLOCK_D=128, num_warps=8, num_stages=2)


def _bwd_config(nq: int, n: int, D: int) -> dict:
    if is_interpreter():
        return dict(BLOCK_J=_clamp_pow2(n, 16, 64), BLOCK_I=_clamp_pow2(nq, 16, 64),
                    BLOCK_D=_clamp_pow2(D, 16, 128), num_warps=4, num_stages=1)
    return dict(_GPU_BWD)


# x_i·r_i - x_nn·r_nn must round both products before subtracting, as F.normalize then pdist do:
# with FP fusion the compiler emits fma(x_i, r_i, -(x_nn·r_nn)), which leaves the rounding error of
# one product (~1e-8) where the reference gets exactly 0 for duplicate rows (d = eps·sqrt(D)); seen
# on H200, triton 3.6, 2026-11. The dots run on tensor cores and are unaffected.
def _no_fma() -> dict:
    return {} if is_interpreter() else {"enable_fp_fusion": False}


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in _DTYPES or x.stride(-1) != 1 or x.shape[-1] < 1:
        raise ValueError(f"koleo kernel: x must be a [G, n, D] fp32/bf16 tensor with D >= 1 and "
                         f"a contiguous last dim, got shape {tuple(x.shape)}, dtype {x.dtype}, "
                         f"strides {x.stride()}")


def _fwd_outputs(x: torch.Tensor, nq: int):
    G, n, _ = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    nn_idx = torch.empty(G, nq, device=x.device, dtype=torch.int64)
    d, t, u = (torch.empty(G, nq, **f32) for _ in range(3))
    return nn_idx, d, t, u, torch.empty(G, n, **f32)


def _fwd_fused(x: torch.Tensor, eps: float, q0: int, nq: int):
    """One launch: search, distances and the loss (a counter orders the cross-block sum)."""
    G, n, D = x.shape
    cfg = _fwd_config(nq, n, D, x.dtype)
    num_blocks = cdiv(nq, cfg["BLOCK_M"])
    loss = torch.empty(G, device=x.device, dtype=torch.float32)
    nn_idx, d, t, u, rinv = _fwd_outputs(x, nq)
    single = num_blocks == 1
    partial = loss if single else torch.empty(G, num_blocks, device=x.device, dtype=torch.float32)
    count = loss if single else torch.zeros(G, device=x.device, dtype=torch.int32)
    _koleo_fwd_kernel[(num_blocks, G)](
        loss, nn_idx, d, t, u, rinv, partial, count, x, x.stride(0), x.stride(1),
        n, D, q0, nq, eps,
        SINGLE=single, UPCAST=is_interpreter() and x.dtype == torch.bfloat16,
        IEEE=x.dtype == torch.float32, **_no_fma(), **cfg)
    return loss, nn_idx, d, t, u, rinv


def _fwd_split(x: torch.Tensor, eps: float, q0: int, nq: int, cfg: dict | None = None,
               splits: int | None = None, symmetric: bool | None = None):
    """Norms, search (symmetric tiles when every row is a query, else column splits), merge +
    distances, loss sum (4 launches). `cfg` / `splits` / `symmetric` override the heuristic
    (tests: ties across splits and tiles)."""
    G, n, D = x.shape
    sym = symmetric
    if sym is None:  # the interpreter takes it whenever it can (tests force the column splits)
        sym = q0 == 0 and nq == n and (
            is_interpreter() or _prefer_sym(G, n, D, x.dtype, _num_sms(x.device)))
    if sym and (q0 != 0 or nq != n):
        raise ValueError(f"koleo: the symmetric search needs every row as a query, got "
                         f"query rows [{q0}, {q0 + nq}) of {n}")
    rc = _rows_config(D)
    f32 = dict(device=x.device, dtype=torch.float32)
    nn_idx, d, t, u, rinv = _fwd_outputs(x, nq)
    fma = _no_fma()
    upcast, ieee = is_interpreter() and x.dtype == torch.bfloat16, x.dtype == torch.float32
    _koleo_rinv_kernel[(cdiv(n, rc["BLOCK_R"]), G)](
        rinv, x, x.stride(0), x.stride(1), n, D, eps, **fma, **rc)
    if sym:
        cfg = dict(cfg or _search_sym_config(n, D, x.dtype, _aligned_rows(x)))
        cfg.setdefault("ALIGNED", False)
        s = cdiv(n, cfg["BLOCK"])
        best_v = torch.empty(G, s, n, **f32)
        best_j = torch.empty(G, s, n, device=x.device, dtype=torch.int32)
        _koleo_search_sym_kernel[(s, s, G)](
            best_v, best_j, x, rinv, x.stride(0), x.stride(1), n, D, UPCAST=upcast, IEEE=ieee,
            **fma, **cfg)
    else:
        cfg = dict(cfg or _search_config(nq, n, D, x.dtype, _aligned_rows(x)))
        cfg.setdefault("ALIGNED", False)
        if splits is None:
            s, cols = _splits(G, nq, n, cfg, _num_sms(x.device))
        else:
            tiles = cdiv(n, cfg["BLOCK_N"])
            cols = cdiv(tiles, max(1, min(splits, tiles))) * cfg["BLOCK_N"]
            s = cdiv(n, cols)
        best_v = torch.empty(G, s, nq, **f32)
        best_j = torch.empty(G, s, nq, device=x.device, dtype=torch.int32)
        _koleo_search_kernel[(cdiv(nq, cfg["BLOCK_M"]), s, G)](
            best_v, best_j, x, rinv, x.stride(0), x.stride(1), n, D, q0, nq, cols,
            UPCAST=upcast, IEEE=ieee, **fma, **cfg)  # cfg holds ALIGNED
    num_blocks = cdiv(nq, rc["BLOCK_R"])
    partial = torch.empty(G, num_blocks, **f32)
    _koleo_finish_kernel[(num_blocks, G)](
        partial, nn_idx, d, t, u, best_v, best_j, rinv, x, x.stride(0), x.stride(1),
        n, D, q0, nq, s, eps, **fma, **rc)
    loss = partial.sum(dim=1) / nq  # fixed-order reduction: deterministic
    return loss, nn_idx, d, t, u, rinv


# ---- the small-group path: configs, the K-split heuristic, the self-resetting counters ----

SMALL_MAX_N = 256  # path="auto" takes the small path for groups of at most this many rows
_SMALL_TARGET_PROGRAMS = 128  # K splits until G·RB·KS reaches about one wave (132 SMs on H200)
_SMALL_MIN_K = 128  # no split narrower than this many features (its partial tile costs more)
_SMALL_MAX_KS = 16  # the finisher reads KS partial tiles: bounded
# K splits of the small forward for every launch (None: the heuristic below). For GPU A/B runs
# only (bench/bench_koleo.py's `triton_ks1`: one split, so no split-K ticket and one program
# walks all of D): whether the split-K's extra round trips cost more than its parallelism gives.
SMALL_SPLITS: int | None = None


def _gpu_small_fwd_config(dtype: torch.dtype) -> dict:
    """Small forward tiles checked spill-free for sm_90 / sm_80 under triton 3.6 and 3.9 (bf16:
    118-229 registers, 8 warps): 16 query rows (one mma.sync M tile) x 64 columns x 64 features for
    bf16, the fused kernel's FMA tiles for the IEEE fp32 dot; 1024-wide distance steps for bf16
    (D <= 1024: one round trip; 512 took 98-128 registers but two trips at D = 1024), 256 for
    fp32; 8 partial tiles per load step (KS <= 8: one round trip)."""
    if dtype == torch.bfloat16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_D=1024, UNROLL=8, num_warps=8,
                    num_stages=2)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_D=256, UNROLL=8, num_warps=8,
                num_stages=1)


def _small_fwd_config(G: int, nq: int, n: int, D: int, dtype: torch.dtype,
                      splits: int | None = None) -> dict:
    """Tiles plus the K split (KS, k_per_split). The heuristic: K splits of at least
    _SMALL_MIN_K features until the grid G x RB x KS reaches ~one wave, at most _SMALL_MAX_KS
    (B = 64, D = 1024, G = 2: RB = 4, KS = 8, 64 programs; B = 16: KS = 3 / 8 / 16 at D = 384 /
    1024 / 4096). `splits` overrides KS (tests). The interpreter uses 16-wide K steps and
    32-column tiles so that test shapes exercise several splits, tiles and row blocks."""
    if is_interpreter():
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, BLOCK_D=_clamp_pow2(D, 16, 128),
                   UNROLL=4, num_warps=4, num_stages=1)
        ks = splits if splits is not None else min(4, cdiv(D, 16))
    else:
        cfg = _gpu_small_fwd_config(dtype)
        rb = cdiv(nq, cfg["BLOCK_M"])
        ks = splits if splits is not None else max(1, min(
            cdiv(D, _SMALL_MIN_K), _SMALL_TARGET_PROGRAMS // (G * rb), _SMALL_MAX_KS))
    bk = cfg["BLOCK_K"]
    per = cdiv(cdiv(D, max(1, ks)), bk) * bk  # a whole number of K steps per split
    return dict(cfg, KS=cdiv(D, per), k_per_split=per)  # no empty split


# The small path's backward is _koleo_bwd_kernel with all of a small group's choosers in one or a
# few tiles: BLOCK_I = 64 choosers per step (one step up to B = 64, 4 at 256), 32 output rows and
# 64 features per program (B = 64, D = 1024, G = 2: 2 x 16 x 2 = 64 programs, each one step,
# against the large-group config's 32 programs of 4 steps), no pipelining (one step); 8 warps
# (4 take ~195 registers). fp32: the IEEE dot runs on FMA units from registers, and 64 choosers
# spill (sm_90 and sm_80, both tritons): 16 per step, as the large-group config.
_GPU_SMALL_BWD = {
    torch.bfloat16: dict(BLOCK_J=32, BLOCK_I=64, BLOCK_D=64, num_warps=8, num_stages=1),
    torch.float32: dict(BLOCK_J=32, BLOCK_I=16, BLOCK_D=64, num_warps=8, num_stages=1),
}


def _small_bwd_config(nq: int, n: int, D: int, dtype: torch.dtype) -> dict:
    if is_interpreter():  # several row blocks and chooser tiles at test sizes
        return dict(BLOCK_J=16, BLOCK_I=32, BLOCK_D=_clamp_pow2(D, 16, 64), num_warps=4,
                    num_stages=1)
    return dict(_GPU_SMALL_BWD[dtype])


# Counters of the small forward, one buffer per device: every launch leaves them zero (the program
# that consumes a counter resets it), so no memset runs per call (it would be one more node in a
# CUDA graph, ~1-2 µs against a ~5 µs op). The buffer is created (zeroed) by an eager call and
# then used by every later call on the device, captured CUDA graphs included (a graph's replays
# leave it zero too). A capture that finds no buffer takes a fresh zeroed one (its memset is
# captured and replayed with the graph) and does not keep it: a buffer allocated inside a capture
# is never zeroed outside it. Restriction: two KoLeo forwards must not run at the same time on
# two streams of one device (they would share the counters); stream-ordered calls are safe.
# A buffer outgrown by a larger launch is kept alive (a captured graph may still point at it).
_COUNTERS: dict[str, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _small_counters(device: torch.device, size: int) -> torch.Tensor:
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= size:
        return buf
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    new = torch.zeros(max(size, 4096), device=device, dtype=torch.int32)  # 16 KB
    if not capturing:
        if buf is not None:
            _OUTGROWN.append(buf)
        _COUNTERS[key] = new
    return new


def _fwd_small(x: torch.Tensor, eps: float, q0: int, nq: int, splits: int | None = None):
    """One launch: split-K dots, finish by the last split of each row block (see the kernel)."""
    G, n, D = x.shape
    cfg = _small_fwd_config(G, nq, n, D, x.dtype, SMALL_SPLITS if splits is None else splits)
    ks, per = cfg.pop("KS"), cfg.pop("k_per_split")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rb = cdiv(nq, bm)
    np_ = cdiv(n, bn) * bn
    loss = torch.empty(G, device=x.device, dtype=torch.float32)
    nn_idx, d, t, u, rinv = _fwd_outputs(x, nq)
    n_part, n_csq = G * rb * ks * bm * np_, G * rb * ks * np_
    scratch = torch.empty(n_part + n_csq + G * rb, device=x.device, dtype=torch.float32)
    part, csq, loss_part = scratch.split([n_part, n_csq, G * rb])  # 64-byte aligned views
    count = _small_counters(x.device, G * rb + G)
    _koleo_small_fwd_kernel[(rb, ks, G)](
        loss, nn_idx, d, t, u, rinv, part, csq, loss_part, count, x, x.stride(0), x.stride(1),
        n, D, q0, nq, ks, per, eps,
        UPCAST=is_interpreter() and x.dtype == torch.bfloat16, IEEE=x.dtype == torch.float32,
        **_no_fma(), **cfg)
    return loss, nn_idx, d, t, u, rinv


def koleo_fwd(x: torch.Tensor, eps: float, query_start: int, query_len: int, path: str = "auto"):
    """x [G, n, D] -> (loss [G] fp32, nn [G, nq] int64, d, t, u [G, nq] fp32, rinv [G, n] fp32)."""
    _check_x(x)
    G, n, D = x.shape
    nq = _check_query(n, query_start, query_len)
    kind, _ = _pick(path, G, nq, n, D, x.dtype, x.device)
    fn = {"small": _fwd_small, "fused": _fwd_fused, "split": _fwd_split}[kind]
    return fn(x, eps, query_start, nq)


def _bwd_fused(dloss, x, rinv, nn_idx, d, t, u, eps, q0, nq, small=False):
    """The masked chooser product: _koleo_bwd_kernel, or `small`: _koleo_small_bwd_kernel (the
    same math with its loads issued for latency, at the small path's tiles)."""
    G, n, D = x.shape
    cfg = _small_bwd_config(nq, n, D, x.dtype) if small else _bwd_config(nq, n, D)
    dx = torch.empty_like(x)
    grid = (cdiv(n, cfg["BLOCK_J"]), cdiv(D, cfg["BLOCK_D"]), G)
    (_koleo_small_bwd_kernel if small else _koleo_bwd_kernel)[grid](
        dx, dloss, x, rinv, nn_idx, d, t, u, x.stride(0), x.stride(1),
        n, D, q0, nq, eps, IEEE=x.dtype == torch.float32, **_no_fma(), **cfg)
    return dx


def _bwd_sorted(dloss, x, rinv, nn_idx, d, t, u, eps, q0, nq):
    """Stable sort of the neighbour indices (the chooser lists, i ascending within each j), the
    first sorted position of each BLOCK_J row block, then one O(n·D) kernel."""
    G, n, D = x.shape
    cfg = _bwd_sorted_config(D, x.dtype)
    bj = cfg["BLOCK_J"]
    sorted_nn, perm = torch.sort(nn_idx, dim=1, stable=True)
    starts = torch.arange(0, n + bj, bj, device=x.device).clamp_(max=n)  # [num_j + 1]
    seg = torch.searchsorted(sorted_nn, starts.expand(G, -1).contiguous(), out_int32=True)
    dx = torch.empty_like(x)
    grid = (cdiv(n, bj), cdiv(D, cfg["BLOCK_D"]), G)
    _koleo_bwd_sorted_kernel[grid](
        dx, dloss, x, rinv, nn_idx, d, t, u, perm, sorted_nn, seg, x.stride(0), x.stride(1),
        n, D, q0, nq, eps, **_no_fma(), **cfg)
    return dx


def koleo_bwd(dloss: torch.Tensor, x: torch.Tensor, rinv: torch.Tensor, nn_idx: torch.Tensor,
              d: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: float, query_start: int,
              query_len: int, path: str = "auto") -> torch.Tensor:
    """dloss [G] -> dx [G, n, D] in x's dtype."""
    G, n, D = x.shape
    _, kind = _pick(path, G, query_len, n, D, x.dtype, x.device)
    args = (dloss.float().contiguous(), x, rinv, nn_idx, d, t, u, eps, query_start, query_len)
    if kind == "sorted":
        return _bwd_sorted(*args)
    return _bwd_fused(*args, small=kind == "small")


# ----------------------------------------------------------------------------------------------
# torch.library registration (so torch.compile traces through the kernels)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastdino::koleo_fwd", mutates_args=())
def _koleo_fwd_op(x: torch.Tensor, eps: float, query_start: int, query_len: int, path: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    return koleo_fwd(x, eps, query_start, query_len, path)


@_koleo_fwd_op.register_fake
def _(x, eps, query_start, query_len, path):
    G, n, _ = x.shape
    f32 = dict(device=x.device, dtype=torch.float32)
    return (x.new_empty(G, dtype=torch.float32),
            x.new_empty(G, query_len, dtype=torch.int64),
            *(torch.empty(G, query_len, **f32) for _ in range(3)),
            torch.empty(G, n, **f32))


@torch.library.custom_op("fastdino::koleo_bwd", mutates_args=())
def _koleo_bwd_op(dloss: torch.Tensor, x: torch.Tensor, rinv: torch.Tensor, nn_idx: torch.Tensor,
                  d: torch.Tensor, t: torch.Tensor, u: torch.Tensor, eps: float, query_start: int,
                  query_len: int, path: str) -> torch.Tensor:
    return koleo_bwd(dloss, x, rinv, nn_idx, d, t, u, eps, query_start, query_len, path)


@_koleo_bwd_op.register_fake
def _(dloss, x, rinv, nn_idx, d, t, u, eps, query_start, query_len, path):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------
# autograd and the functional API
# ----------------------------------------------------------------------------------------------


class KoLeoFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, query_start, query_len, path):
        loss, nn_idx, d, t, u, rinv = eager_or_op(_koleo_fwd_op, koleo_fwd)(
            x, eps, query_start, query_len, path)
        ctx.save_for_backward(x, rinv, nn_idx, d, t, u)
        ctx.args = (eps, query_start, query_len, path)
        ctx.mark_non_differentiable(nn_idx, d)
        # no zero-filled gradients for nn_idx and d (never read): two memset kernels per
        # backward otherwise, i.e. two more nodes of a CUDA-graphed step at ~15 µs fwd+bwd
        ctx.set_materialize_grads(False)
        return loss, nn_idx, d

    @staticmethod
    def backward(ctx, dloss, _dnn, _dd):  # dloss is never None: nn_idx, d carry no gradient
        x, rinv, nn_idx, d, t, u = ctx.saved_tensors
        dx = eager_or_op(_koleo_bwd_op, koleo_bwd)(dloss, x, rinv, nn_idx, d, t, u, *ctx.args)
        return dx, None, None, None, None


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, query_start: int = 0,
               query_len: int | None = None, return_details: bool = False, path: str = "auto"):
    """KoLeo with the Triton kernels; same arguments and results as `koleo_loss_ref`, except that
    the loss is fp32 whatever the input dtype, and d (in details) carries no gradient.
    x: [G, n, D] -> loss [G]; [n, D] -> scalar. `path`: 'auto' (small path up to SMALL_MAX_N
    rows per group, above it the cost model in the header), 'small' (split-K one-launch forward,
    one-step chooser backward), 'fused' (one-launch forward with one program per row block,
    masked chooser backward) or 'split' (column-split forward, sorted chooser backward); every
    path gives the same neighbours (up to near-ties) and the same math."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    if x3.dim() != 3:
        raise ValueError(f"koleo_loss: x must be [n, D] or [G, n, D], got shape {tuple(x.shape)}")
    if path not in PATHS:
        raise ValueError(f"koleo_loss: path={path!r} is invalid: allowed is one of {PATHS}")
    nq = _check_query(x3.shape[1], query_start, query_len)
    loss, nn_idx, d = KoLeoFn.apply(x3.contiguous(), eps, query_start, nq, path)
    if squeeze:
        loss, nn_idx, d = loss[0], nn_idx[0], d[0]
    return (loss, nn_idx, d) if return_details else loss


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/kernels/test_compile.py, bench compile-report)
# ----------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _spec(name: str, fn, sig: dict, cfg: dict, **constexprs) -> CompileSpec:
    """A spec with the divisibility real launches get (triton's JIT specialises on it; the
    compile report declares it): pointers are fresh or contiguous tensors (16-byte aligned);
    D (384..4096) and the row / group strides are multiples of 16, except on the `aligned=False`
    configurations, which exist for the other widths. Group sizes and query windows vary (16,
    64, 4096 rows; windows at rank offsets), so n, q0, nq, S are not declared."""
    cfg = dict(cfg)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    wide = "aligned=False" not in name
    # k_per_split: a whole number of 16- or 64-wide K steps
    div16 = tuple(k for k, ty in sig.items()
                  if ty.startswith("*") or k == "k_per_split"
                  or (wide and (k == "D" or k.startswith("stride_"))))
    # every KoLeo launcher launches with _no_fma(): compile what runs
    return CompileSpec(name=name, fn=fn, signature=sig, constexprs=dict(**cfg, **constexprs),
                       num_warps=warps, num_stages=stages, divisible_by_16=div16,
                       enable_fp_fusion=False)


def compile_specs() -> list[CompileSpec]:
    """Every jit kernel at each launch configuration the GPU heuristics above can pick."""
    specs = []
    xs = {"stride_x_g": "i32", "stride_x_row": "i32"}
    for dtype, ty in _TY.items():
        ieee = dtype == torch.float32
        # fused path
        sig = {"Loss_ptr": "*fp32", "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32",
               "U_ptr": "*fp32", "Rinv_ptr": "*fp32", "Partial_ptr": "*fp32", "Count_ptr": "*i32",
               "X_ptr": f"*{ty}", **xs, "n": "i32", "D": "i32", "q0": "i32", "nq": "i32",
               "eps": "fp32"}
        for block_m in _GPU_BLOCK_M[dtype]:
            for single in (True, False):
                specs.append(_spec(f"koleo_fwd[BLOCK_M={block_m},{ty},single={single}]",
                                   _koleo_fwd_kernel, sig, _gpu_fwd_config(block_m, dtype),
                                   SINGLE=single, UPCAST=False, IEEE=ieee))
        sig = {"DX_ptr": f"*{ty}", "DLoss_ptr": "*fp32", "X_ptr": f"*{ty}", "Rinv_ptr": "*fp32",
               "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32", "U_ptr": "*fp32", **xs,
               "n": "i32", "D": "i32", "q0": "i32", "nq": "i32", "eps": "fp32"}
        specs.append(_spec(f"koleo_bwd[{ty}]", _koleo_bwd_kernel, sig, _GPU_BWD, IEEE=ieee))
        # small path: the same backward kernel at the small tiles, and the split-K forward
        specs.append(_spec(f"koleo_small_bwd[{ty}]", _koleo_small_bwd_kernel, sig,
                           _GPU_SMALL_BWD[dtype], IEEE=ieee))
        sig = {"Loss_ptr": "*fp32", "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32",
               "U_ptr": "*fp32", "Rinv_ptr": "*fp32", "Part_ptr": "*fp32", "Csq_ptr": "*fp32",
               "LossPart_ptr": "*fp32", "Count_ptr": "*i32", "X_ptr": f"*{ty}", **xs, "n": "i32",
               "D": "i32", "q0": "i32", "nq": "i32", "KS": "i32", "k_per_split": "i32",
               "eps": "fp32"}
        specs.append(_spec(f"koleo_small_fwd[{ty}]", _koleo_small_fwd_kernel, sig,
                           _gpu_small_fwd_config(dtype), UPCAST=False, IEEE=ieee))
        # split path
        sig = {"Rinv_ptr": "*fp32", "X_ptr": f"*{ty}", **xs, "n": "i32", "D": "i32",
               "eps": "fp32"}
        specs.append(_spec(f"koleo_rinv[{ty}]", _koleo_rinv_kernel, sig, _GPU_ROWS))
        sig = {"BestV_ptr": "*fp32", "BestJ_ptr": "*i32", "X_ptr": f"*{ty}", "Rinv_ptr": "*fp32",
               **xs, "n": "i32", "D": "i32", "q0": "i32", "nq": "i32", "cols_per_split": "i32"}
        for (dt, bm, aligned), cfg in _GPU_SEARCH.items():
            if dt == dtype:
                specs.append(_spec(f"koleo_search[BLOCK_M={bm},{ty},aligned={aligned}]",
                                   _koleo_search_kernel, sig, cfg, UPCAST=False, IEEE=ieee,
                                   ALIGNED=aligned))
        sig = {"BestV_ptr": "*fp32", "BestJ_ptr": "*i32", "X_ptr": f"*{ty}", "Rinv_ptr": "*fp32",
               **xs, "n": "i32", "D": "i32"}
        for (dt, aligned), cfg in _GPU_SEARCH_SYM.items():
            if dt == dtype:
                specs.append(_spec(f"koleo_search_sym[{ty},aligned={aligned}]",
                                   _koleo_search_sym_kernel, sig, cfg, UPCAST=False, IEEE=ieee,
                                   ALIGNED=aligned))
        sig = {"Partial_ptr": "*fp32", "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32",
               "U_ptr": "*fp32", "BestV_ptr": "*fp32", "BestJ_ptr": "*i32", "Rinv_ptr": "*fp32",
               "X_ptr": f"*{ty}", **xs, "n": "i32", "D": "i32", "q0": "i32", "nq": "i32",
               "S": "i32", "eps": "fp32"}
        specs.append(_spec(f"koleo_finish[{ty}]", _koleo_finish_kernel, sig, _GPU_ROWS))
        sig = {"DX_ptr": f"*{ty}", "DLoss_ptr": "*fp32", "X_ptr": f"*{ty}", "Rinv_ptr": "*fp32",
               "Nn_ptr": "*i64", "Dist_ptr": "*fp32", "T_ptr": "*fp32", "U_ptr": "*fp32",
               "Perm_ptr": "*i64", "SortedNn_ptr": "*i64", "Seg_ptr": "*i32", **xs, "n": "i32",
               "D": "i32", "q0": "i32", "nq": "i32", "eps": "fp32"}
        specs.append(_spec(f"koleo_bwd_sorted[{ty}]", _koleo_bwd_sorted_kernel, sig,
                           _GPU_BWD_SORTED_FP32 if ieee else _GPU_BWD_SORTED))
    return specs
