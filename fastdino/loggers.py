"""Optional metric sinks beside `metrics.jsonl` (fastdino/metrics.py): TensorBoard and Weights &
Biases, rank 0 only, fed every logged line (the same values, the same iteration).

    sinks = build_sinks(cfg, output_dir)        # [] unless train.tensorboard / train.wandb_project
    for s in sinks: s.start(start_iteration)   # MetricsLogger, once the run knows where it starts
    for s in sinks: s.log(iteration, record)   # MetricsLogger does this for each line
    for s in sinks: s.close()

TensorBoard (`train.tensorboard: true`, needs the `tensorboard` package: the `log` extra) writes
event files to `<output_dir>/tensorboard/`; a resumed run appends to the same folder, and the
iteration is the step, so the curves continue. A resume redoes the iterations after its
checkpoint, so it purges the events after that iteration (SummaryWriter's purge_step): each step
holds one value, as metrics.jsonl holds one line (metrics.drop_redone_lines). Weights & Biases
(`train.wandb_project`, needs `wandb`) starts a run with the resolved config; its id is kept in
`<output_dir>/wandb_run_id`, so a resumed run continues the same W&B run (`resume="allow"`). W&B
drops steps below a run's current step and cannot purge them (its "rewind" is a private preview),
so the redone iterations below it are said once and left out there. WANDB_MODE=offline works
without a network, as W&B documents. Neither is imported unless asked for; a missing package is
a config error that names the extra.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from fastdino.config import Config, ConfigError

logger = logging.getLogger(__name__)

# bookkeeping fields of a metrics record that are not curves
_SKIP = {"iteration", "time"}


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in _SKIP and isinstance(v, (int, float)) and math.isfinite(float(v))}


class TensorBoardSink:
    def __init__(self, output_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install "
                              "'fastdino[log]' (or pip install tensorboard)") from e
        self.dir, self._writer_class = output_dir / "tensorboard", SummaryWriter
        self.writer = None  # opened by start(), which knows the iteration the run starts at

    def start(self, start_iteration: int) -> None:
        # a resume from iteration N redoes N+1, ...: hide what an earlier start logged there;
        # also from 0 (a run killed before its first checkpoint, train.resume=none in a used
        # folder), whose earlier lines metrics.jsonl drops too (purging nothing is harmless)
        self.writer = self._writer_class(log_dir=str(self.dir), purge_step=start_iteration + 1)

    def log(self, iteration: int, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    ID_FILE = "wandb_run_id"

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("train.wandb_project needs the wandb package: pip install "
                              "'fastdino[log]' (or pip install wandb)") from e
        id_file = output_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:  # (an empty file: a crash while it was first written)
            run_id = wandb.util.generate_id()
            tmp = id_file.with_name(id_file.name + ".tmp")  # whole or absent, never empty
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)
        self.wandb, self.run_id = wandb, run_id
        self.run = wandb.init(project=cfg.train.wandb_project, name=cfg.train.wandb_run_name,
                              id=run_id, resume="allow", dir=str(output_dir),
                              config=cfg.to_dict())

    def start(self, start_iteration: int) -> None:
        step = int(getattr(self.run, "step", 0) or 0)  # the resumed W&B run's next step
        if step > start_iteration + 1:
            logger.warning("W&B run %s is at step %d and drops lower steps: iterations %d to %d, "
                           "which this resume redoes, are only in metrics.jsonl (and "
                           "TensorBoard)", self.run_id, step, start_iteration + 1, step - 1)

    def log(self, iteration: int, record: dict) -> None:
        self.run.log(_scalars(record), step=iteration)

    def close(self) -> None:
        self.run.finish()


def check_sinks_available(cfg: Config) -> None:
    """Every rank, before any collective: the packages the asked-for sinks need import (a
    ConfigError naming the extra otherwise), so a missing one stops all ranks alike."""
    import importlib.util

    for on, package, key in ((cfg.train.tensorboard, "tensorboard", "train.tensorboard=true"),
                             (cfg.train.wandb_project, "wandb", "train.wandb_project")):
        if on and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{key} needs the {package} package: pip install 'fastdino[log]' "
                              f"(or pip install {package})")


def build_sinks(cfg: Config, output_dir: str | Path) -> list:
    """The sinks the config asks for (call on rank 0 only, after check_sinks_available)."""
    output_dir = Path(output_dir)
    sinks: list = []
    if cfg.train.tensorboard:
        sinks.append(TensorBoardSink(output_dir))
    if cfg.train.wandb_project:
        sinks.append(WandbSink(cfg, output_dir))
    return sinks
