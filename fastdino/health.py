"""Run-health checks on the logged metrics (USERS.md §3: "users cannot tell healthy from broken
runs"): the trainer warns as soon as a condition appears (and says when it clears), and
`fastdino health RUN` reads a run's metrics.jsonl and config.yaml and reports the same findings
after the fact, for finished runs and runs in progress alike.

    monitor = HealthMonitor.from_config(cfg)
    for line in log_lines: for f in monitor.update(iteration, values): logger.warning(f.message)

Each check reads only values the trainer logs (metrics.jsonl). A condition must hold on
`patience` consecutive log lines before it is reported (3; a gradient spike: 1), so a single
noisy window stays quiet:

- uniform_teacher: the DINO teacher's mean per-row entropy at >= 99 % of ln K after the teacher
  temperature warm-up. The targets carry no signal: Sinkhorn-Knopp over too few rows per step
  (it spreads N rows over K prototypes evenly: N << K gives ~uniform rows), or a teacher that
  stopped discriminating. The DINO loss then teaches nothing.
- teacher_collapse: the same entropy below 1 % of ln K after the warm-up and the global DINO loss
  below 5 % of ln K: every row's target is one prototype and the student matches it (with
  softmax centering, the classic DINO collapse; v2#272: loss 8 -> 0.05). A sharp teacher alone
  is healthy, so the loss must have fallen too.
- koleo_duplicates: the smallest KoLeo nearest-neighbour distance under 1e-4 after the warm-up
  (at init all embeddings are alike): two crops with the same embedding in a group (duplicate
  images, or collapsed features); -log(d + eps) is large.
- grad_spike: a module's gradient norm above 10x the median of its last 20 logged values (a
  loss spike on its way; lower optim.lr or optim.clip_grad if they repeat).
- data_stall: the loop waited on data more than 25 % of the wall time (the loader sets the
  speed; the message names the knobs of the loader in use: data.num_workers, data.loader=dali,
  data.torch_photometric=gpu, data.dali_source_workers).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    key: str  # the check's name (module docstring)
    iteration: int
    message: str
    cleared: bool = False  # True: the condition no longer holds


@dataclass
class HealthMonitor:
    n_prototypes: int  # K of the DINO head
    warmup_iterations: int  # the teacher temperature warm-up (targets sharpen until then)
    patience: int = 3
    # what to try when data_stall holds: the knobs of the loader in use (data.loader)
    data_remedy: str = ("more data.num_workers, data.loader=dali, or "
                        "data.torch_photometric=gpu")
    _streak: dict = field(default_factory=dict)
    _active: dict = field(default_factory=dict)
    _grad_history: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> HealthMonitor:
        warm = int(cfg.schedules.warmup_teacher_temp_epochs * cfg.train.epoch_length)
        d = cfg.data
        if d.loader == "dali":  # decoding and augmentation already off the CPU
            remedy = (f"more data.dali_source_workers (now {d.dali_source_workers}: file reads "
                      "and crop plans), faster storage, or fewer local crops")
        elif d.loader == "torch" and d.torch_photometric == "gpu":
            remedy = f"more data.num_workers (now {d.num_workers}), or data.loader=dali"
        elif d.loader == "torch":
            remedy = (f"more data.num_workers (now {d.num_workers}), data.loader=dali, or "
                      "data.torch_photometric=gpu")
        else:  # auto: DALI where it is installed and a GPU is present
            remedy = cls.data_remedy
        return cls(cfg.dino.head.n_prototypes, warm, data_remedy=remedy)

    def update(self, iteration: int, values: dict) -> list[Finding]:
        """Findings that start or clear at this log line."""
        conditions = self._conditions(iteration, values)
        out = []
        for key, message in conditions.items():
            holds = message is not None
            self._streak[key] = self._streak.get(key, 0) + 1 if holds else 0
            patience = 1 if key == "grad_spike" else self.patience
            if holds and self._streak[key] >= patience and key not in self._active:
                self._active[key] = iteration
                out.append(Finding(key, iteration, message))
            elif not holds and key in self._active:
                since = self._active.pop(key)
                out.append(Finding(key, iteration, f"{key}: cleared at iteration {iteration} "
                                   f"(reported at {since})", cleared=True))
        return out

    @property
    def active(self) -> dict[str, int]:
        """The conditions reported and not cleared, with the iteration they were reported at."""
        return dict(self._active)

    # ------------------------------------------------------------------------------ checks
    def _conditions(self, it: int, v: dict) -> dict[str, str | None]:
        """{check: message if the condition holds at this line, else None}; only the checks
        whose inputs are logged on this line."""
        c: dict[str, str | None] = {}
        ent = _finite(v.get("dino_teacher_entropy"))
        if ent is not None:
            ln_k = math.log(self.n_prototypes)
            warm = it > self.warmup_iterations
            c["uniform_teacher"] = (
                f"uniform_teacher: the DINO targets are uniform (teacher entropy {ent:.3f} of "
                f"ln K = {ln_k:.3f}) at iteration {it}: they carry no signal. With Sinkhorn-"
                "Knopp this is too few images per step for K prototypes (raise "
                "data.batch_size_per_gpu or the GPU count, or try dino.centering=softmax or "
                "fewer prototypes)"
            ) if warm and ent >= 0.99 * ln_k else None
            # a sharp teacher is healthy (low per-row entropy); a collapsed one is sharp AND
            # matched by the student: the DINO loss falls to ~0 (v2#272: 8 -> 0.05)
            loss = _finite(v.get("dino_global_crops_loss"))
            matched = loss is not None and loss < 0.05 * ln_k
            c["teacher_collapse"] = (
                f"teacher_collapse: the DINO targets are one-hot (teacher entropy {ent:.4f}, "
                f"ln K = {ln_k:.3f}) and the student matches them (DINO loss {loss:.4f}) at "
                f"iteration {it}: the teacher has collapsed. Lower schedules.teacher_temp, raise "
                "the teacher momentum, or check the data"
            ) if warm and ent < 0.01 * ln_k and matched else None
        d = _finite(v.get("koleo_nn_dist_min"))
        if d is not None:  # (at init every embedding is alike: checked after the warm-up)
            c["koleo_duplicates"] = (
                f"koleo_duplicates: two crops of a KoLeo group have the same embedding "
                f"(nearest-neighbour distance {d:.2e}) at iteration {it}: duplicate images in "
                "the data, or collapsed features; the KoLeo term is large"
            ) if it > self.warmup_iterations and d < 1e-4 else None
        spikes = []
        for k, x in v.items():
            if not k.endswith("_grad_norm") or _finite(x) is None:
                continue
            hist = self._grad_history.setdefault(k, deque(maxlen=20))
            if len(hist) >= 5 and x > 10 * statistics.median(hist):
                spikes.append(f"{k} {x:.3g} (median {statistics.median(hist):.3g})")
            hist.append(x)
        if any(k.endswith("_grad_norm") for k in v):
            c["grad_spike"] = (
                f"grad_spike: gradient norm above 10x its recent median at iteration {it}: "
                + ", ".join(spikes) + "; if it repeats, lower optim.lr or optim.clip_grad"
            ) if spikes else None
        w = _finite(v.get("data_wait_fraction"))
        if w is not None:
            c["data_stall"] = (
                f"data_stall: {w:.0%} of the wall time waiting for data at iteration {it}: the "
                f"loader sets the speed ({self.data_remedy})"
            ) if w > 0.25 else None
        return c


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# the config keys HealthMonitor.from_config reads
_KEYS = ("dino.head.n_prototypes", "schedules.warmup_teacher_temp_epochs", "train.epoch_length",
         "data.loader", "data.torch_photometric", "data.num_workers", "data.dali_source_workers")


def run_config(path):
    """A run's config.yaml for the health checks. A finished run is read as it was written: no
    whole-config rules (a run is not refused by a check added since), and a file that no longer
    loads at all (a key renamed since) gives the keys the checks need, with a warning."""
    import sys

    import yaml

    from fastdino.config import Config, ConfigError, load_unvalidated, merge_mapping

    try:
        return load_unvalidated(path)
    except ConfigError as e:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:  # not yaml at all: the defaults, said so below
            data = {}
        cfg, missing = Config(), []
        for key in _KEYS:
            node = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                missing.append(key)
                continue
            nested = node
            for part in reversed(key.split(".")):
                nested = {part: nested}
            try:
                merge_mapping(cfg, nested)
            except ConfigError:
                missing.append(key)
        print(f"warning: {path} does not load ({e}); the checks read only "
              + ", ".join(k for k in _KEYS if k not in missing)
              + (f" (defaults for {', '.join(missing)})" if missing else ""), file=sys.stderr)
        return cfg


def report(run_dir) -> tuple[list[Finding], dict[str, int], int]:
    """(every finding in order, the conditions still active at the end, the last iteration) of
    a run folder's metrics.jsonl, with the thresholds from its config.yaml."""
    import json
    from pathlib import Path

    run = Path(run_dir)
    metrics, config = run / "metrics.jsonl", run / "config.yaml"
    for f in (metrics, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} does not exist: give a training run folder "
                                    "(train.output_dir)")
    monitor = HealthMonitor.from_config(run_config(config))
    findings, last = [], 0
    # (errors="replace": bytes a crash left at the end are a line that does not parse, skipped)
    for n, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written by a live run, or cut by a crash
            continue
        last = int(rec.get("iteration", n))
        findings += monitor.update(last, rec)
    return findings, monitor.active, last


def main(argv: list[str] | None = None) -> int:
    """`fastdino health RUN`: exit 0 when no condition is active at the last line (of every
    student of a co-distillation run), 1 otherwise."""
    import argparse

    p = argparse.ArgumentParser(prog="fastdino health", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="training run folder (train.output_dir); a co-distillation "
                   "run's further students (<run>/students/*/) are reported after it")
    a = p.parse_args(argv)
    from pathlib import Path

    if not (Path(a.run) / "metrics.jsonl").is_file():
        p.error(f"{Path(a.run) / 'metrics.jsonl'} does not exist: give a training run folder "
                "(train.output_dir)")
    runs = [Path(a.run), *sorted(d for d in (Path(a.run) / "students").glob("*")
                                 if (d / "metrics.jsonl").is_file())]
    rc = 0
    for run in runs:
        if len(runs) > 1:
            print(f"== {run}")
        try:
            findings, active, last = report(run)
        except (FileNotFoundError, ValueError) as e:  # (a ConfigError is a ValueError)
            p.error(str(e))
        for f in findings:
            print(f"it {f.iteration:>7}  {'cleared ' if f.cleared else 'WARNING '} {f.message}")
        if active:
            print(f"at iteration {last}: {len(active)} condition(s) active: "
                  + ", ".join(f"{k} (since {i})" for k, i in active.items()))
            rc = 1
            continue
        print(f"at iteration {last}: no condition active"
              + (f" ({sum(not f.cleared for f in findings)} reported and cleared earlier)"
                 if findings else ""))
    return rc
