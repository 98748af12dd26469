"""Progress display and JSON-lines metrics (SPEC.md §3.1 names, issue 3 item 5).

Rank 0 prints one line every `log_every` iterations:
    it 120/200 | total_loss 9.812 dino_local 6.01 dino_global 5.87 ibot 4.11 koleo -0.61 |
    lr 1.2e-04 | 43.1 img/s | data 3% | ETA 0:01:52
("lr 1.2e-04 (backbone 0)" during the head warm-up of optim.freeze_backbone_epochs)
where "data" is the share of the wall time since the last line that the training loop spent
waiting for batches (`data_wait_s`, the seconds the caller measured over that window, mean over
ranks): above a few percent the loader, not the GPU, sets the speed (USERS.md §4, §9).
and appends the same values, plus every other term, as one JSON object per line to
`<output_dir>/metrics.jsonl` (`iteration`, `time`, official names: lr, wd, mom, last_layer_lr,
total_loss, dino_local_crops_loss, ..., backbone_grad_norm, ...; `<module>_grad_norm` is the norm
before the per-module clip, `<module>_grad_norm_clipped` what the optimizer stepped with). Values
are averaged over ranks by the caller before they reach here, except `max_mem_gib` (GPU only: the
peak of memory allocated by tensors since the previous line, the largest over ranks; shown as
"mem 61.2 GiB"). The same records go to the optional TensorBoard and W&B sinks
(fastdino/loggers.py).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger("fastdino")

SHORT = (("total_loss", "total_loss"), ("dino_local_crops_loss", "dino_local"),
         ("dino_global_crops_loss", "dino_global"), ("ibot_loss", "ibot"),
         ("koleo_loss", "koleo"), ("gram_loss", "gram"))


# logged terms reduced over ranks by their maximum, not their mean
MAX_OVER_RANKS = ("max_mem_gib",)


def peak_memory_gib(device: torch.device) -> float | None:
    """The peak GPU memory allocated by tensors since the last call (then reset), in GiB; None
    off CUDA. Reads the caching allocator's counters: no device sync."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def drop_redone_lines(path: Path, start_iteration: int) -> int:
    """A run that starts at `start_iteration` (a resume after a crash or kill -9: from the last
    checkpoint; a first start: 0) does again the iterations after it: their lines in metrics.jsonl,
    and a line cut short by the kill, are dropped, so that each iteration has one line and a plot
    of the file shows the run that continues, not two overlapping curves. The file as it was is
    kept whole beside it as metrics.<date-time>.jsonl (said in the log). Returns the lines
    dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    # (errors="replace": a crash can leave any bytes in the last blocks; they are dropped as a
    # line cut short, where a UnicodeDecodeError stopped every resume of the run)
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                keep = line.endswith("\n") and int(rec["iteration"]) <= start_iteration
            except (ValueError, TypeError, KeyError):  # cut short by a kill, or not ours
                keep = not line.strip()
            if keep:
                kept.append(line)
            else:
                dropped += line.strip() != ""
    if not dropped:
        return 0
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    backup = path.with_name(f"metrics.{stamp}.jsonl")
    while backup.exists():
        n += 1
        backup = path.with_name(f"metrics.{stamp}-{n}.jsonl")
    try:
        os.link(path, backup)  # the same data under a second name: no copy, and no moment
    except OSError:            # without a metrics.jsonl
        shutil.copy2(path, backup)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    logger.info("%s: %d line(s) after iteration %d dropped (this run does those iterations again; "
                "the file as it was is kept as %s)", path, dropped, start_iteration, backup.name)
    return dropped


class MetricsLogger:
    def __init__(self, output_dir: str | Path, total_iterations: int, start_iteration: int,
                 images_per_step: int, enabled: bool, printer=print, sinks=()):
        self.path = Path(output_dir) / "metrics.jsonl"
        if enabled:
            drop_redone_lines(self.path, start_iteration)
        self.sinks = list(sinks)  # fastdino/loggers.py: TensorBoard, W&B (rank 0)
        for sink in self.sinks:
            sink.start(start_iteration)
        self.total, self.enabled, self.printer = total_iterations, enabled, printer
        self.images_per_step = images_per_step
        self._t0, self._it0 = time.perf_counter(), start_iteration
        self._last_t, self._last_it = self._t0, start_iteration

    def log(self, iteration: int, values: dict[str, float]) -> dict:
        """`iteration` = the number of completed iterations after this step."""
        now = time.perf_counter()
        steps = max(1, iteration - self._last_it)
        window = max(now - self._last_t, 1e-9)  # wall time since the previous line
        img_s = steps * self.images_per_step / window
        per_it = (now - self._t0) / max(1, iteration - self._it0)
        eta = datetime.timedelta(seconds=int(per_it * max(0, self.total - iteration)))
        self._last_t, self._last_it = now, iteration
        rec = {"iteration": iteration, "time": time.time(), "images_per_second": img_s,
               **{k: float(v) for k, v in values.items()}}
        data = ""
        if "data_wait_s" in values:
            rec["data_wait_fraction"] = min(1.0, float(values["data_wait_s"]) / window)
            data = f" | data {rec['data_wait_fraction']:.0%}"
        if "max_mem_gib" in values:
            data += f" | mem {float(values['max_mem_gib']):.1f} GiB"
        if self.enabled:
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:  # disk full, folder gone: one line, not a traceback
                from fastdino.checkpoint import CheckpointWriteError

                raise CheckpointWriteError(
                    f"{self.path}: the line of iteration {iteration} could not be written "
                    f"({type(e).__name__}: {e}); the run stops, the same command continues from "
                    "its last checkpoint (train.resume=auto)") from e
            terms = " ".join(f"{short} {values[k]:.4g}" for k, short in SHORT if k in values)
            lr = values.get("lr", math.nan)
            # the head warm-up (optim.freeze_backbone_epochs) holds the backbone: say so
            held = " (backbone 0)" if values.get("backbone_lr", lr) == 0 < lr else ""
            self.printer(f"it {iteration}/{self.total} | {terms} | lr {lr:.3g}{held} | "
                         f"{img_s:.1f} img/s{data} | ETA {eta}")
            for sink in self.sinks:
                sink.log(iteration, rec)
        return rec

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
