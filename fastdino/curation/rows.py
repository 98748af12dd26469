"""Row sources for the curation k-means: an embedding matrix that may not fit in memory.

    rows = Rows(np.load("E/embeddings.npy", mmap_mode="r"), device)   # [N, D] fp16 memmap
    for start, ids, x in rows.chunks():      # this rank's shard, chunk by chunk
        ...                                   # x [n, D] on `device`, ids [n] global row ids

Each rank owns a contiguous shard of ceil(N / world) rows (fastdino.dist); within it, rows are
read `chunk_rows` at a time, so a level-1 k-means streams the memory-mapped embeddings from disk
and only k centroids, their sums and O(N) per-row results stay in memory. A shard smaller than
`resident_bytes` is read once and kept on the device (levels >= 2, resampling samples, and
embeddings that fit). Rows that are not finite (images that could not be decoded, written as
NaN by `curate embed`) are skipped: they get no cluster.

Working precision: on CUDA the rows keep their storage dtype when it is fp16 / bf16 (the kernel
accumulates in fp32), else fp32; on CPU they are fp32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fastdino import dist

RESIDENT_BYTES = 4 << 30  # shards up to 4 GiB are read once and kept on the device
CHUNK_ROWS = 1 << 16  # rows per streamed chunk (128 MiB of fp16 at D = 1024)


def shard_bounds(n: int) -> tuple[int, int, int]:
    """(start, stop, shard) of this rank's rows; shard = ceil(n / world) (the padded size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = -(-n // world)
    start = min(n, rank * shard)
    return start, min(n, start + shard), shard


def work_dtype(storage: torch.dtype | np.dtype, device: torch.device) -> torch.dtype:
    if device.type == "cuda" and storage in (torch.float16, torch.bfloat16, np.float16):
        return torch.float16 if storage in (torch.float16, np.float16) else torch.bfloat16
    return torch.float32


class Rows:
    """This rank's shard of an [N, D] matrix (numpy array / memmap or torch tensor)."""

    def __init__(self, data: np.ndarray | torch.Tensor, device: torch.device,
                 chunk_rows: int = CHUNK_ROWS, resident_bytes: int = RESIDENT_BYTES):
        if data.ndim != 2:
            raise ValueError(f"embeddings must be a [N, D] matrix, got shape {tuple(data.shape)}")
        self.data, self.device = data, torch.device(device)
        self.n, self.dim = int(data.shape[0]), int(data.shape[1])
        self.dtype = work_dtype(data.dtype, self.device)
        self.chunk_rows = max(1, int(chunk_rows))
        self.start, self.stop, self.shard = shard_bounds(self.n)
        nbytes = (self.stop - self.start) * self.dim * torch.empty(0, dtype=self.dtype).itemsize
        self._resident = None
        self._n_finite: int | None = None
        if nbytes <= resident_bytes:
            self._resident = list(self._read_chunks(self.stop - self.start or 1))

    def _load(self, a: int, b: int) -> torch.Tensor:
        x = self.data[a:b]
        if not torch.is_tensor(x):  # a read-only memmap slice: copy it into memory
            x = torch.from_numpy(np.array(x))
        return x.to(self.device, self.dtype, non_blocking=True)

    def _read_chunks(self, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for a in range(self.start, self.stop, rows):
            b = min(self.stop, a + rows)
            x = self._load(a, b)  # [n, D]
            ids = torch.arange(a, b, device=self.device)
            ok = torch.isfinite(x).all(dim=1)
            if not bool(ok.all()):
                x, ids = x[ok], ids[ok]
            yield ids, x

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [n] global row ids, x [n, D]) for this rank's finite rows, chunk by chunk."""
        if self._resident is not None:
            yield from self._resident
        else:
            yield from self._read_chunks(self.chunk_rows)

    def n_finite(self) -> int:
        """Rows that can be clustered (finite), over all ranks (collective: call on every
        rank); counted once."""
        if self._n_finite is None:
            n = torch.zeros(1, dtype=torch.float64, device=self.device)
            for ids, _ in self.chunks():
                n += len(ids)
            self._n_finite = int(dist.all_reduce_sum(n).item())
        return self._n_finite

    def gather(self, ids: np.ndarray) -> torch.Tensor:
        """Rows `ids` (global, any rank's) as fp32 on the device: sorted reads, original order."""
        order = np.argsort(ids, kind="stable")
        x = self.data[ids[order]]
        if not torch.is_tensor(x):
            x = torch.from_numpy(np.ascontiguousarray(x))
        out = torch.empty((len(ids), self.dim), dtype=torch.float32, device=self.device)
        out[torch.from_numpy(order).to(self.device)] = x.to(self.device, torch.float32)
        return out


def gather_rows_result(local: torch.Tensor, start: int, stop: int, shard: int, n: int,
                       fill: float) -> torch.Tensor:
    """Concatenate every rank's per-row result [stop - start] into [n] (padded all-gather)."""
    pad = torch.full((shard,), fill, dtype=local.dtype, device=local.device)
    pad[: stop - start] = local
    return dist.all_gather_nograd(pad)[:n]
