"""The per-iteration schedules of SPEC.md §3.2 (v1 `CosineScheduler`, the ImageNet recipes).

    sched = build_schedules(cfg, global_batch_size=B * world_size)
    v = sched.at(it)   # v.lr, v.wd, v.momentum, v.teacher_temp, v.last_layer_lr, v.gram_weight

Closed-form per iteration (no 1M-entry arrays), value-for-value equal to the official
`CosineScheduler(base, final, total_iters, warmup_iters, start_warmup_value, freeze_iters)`:

    schedule = zeros(freeze) ++ linspace(start_warmup, base, warmup)   # endpoint included
               ++ final + ½(base − final)(1 + cos(π·i/n)),  i = 0..n−1, n = total − warmup − freeze
    schedule[it] = final for it >= total

lr scaling (`optim.scaling_rule: sqrt_wrt_1024`): lr ← lr·4·√(global_batch/1024). min_lr: a decaying
schedule (min_lr < lr, the v1 ImageNet recipe) keeps min_lr as written, as v1 scales only
`optim.lr`; a constant or rising one (min_lr >= lr: the 7B, Gram, high-res and distillation
recipes, official v2 `schedules:` whose peak and end are both scaled, `build_schedulers_v2`) scales
min_lr by the same factor, so "lr = min_lr" is a constant lr after the warm-up at every batch.
"epoch" = `train.epoch_length` iterations, not a pass over the data.
EMA scaling (`schedules.momentum_reference_batch: B_ref`, off by default): both momenta
m ← m^(global_batch/B_ref) before the cosine (Busbridge et al. 2023): an EMA over the same number
of images, not of steps, when the global batch differs from the recipe's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastdino.config import Config

logger = logging.getLogger(__name__)


class CosineScheduler:
    """Official `dinov3/train/cosine_lr_scheduler.py::CosineScheduler`, evaluated lazily."""

    def __init__(self, base_value: float, final_value: float, total_iters: int,
                 warmup_iters: int = 0, start_warmup_value: float = 0.0, freeze_iters: int = 0):
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"warmup_iters={warmup_iters} + freeze_iters={freeze_iters} exceed "
                             f"total_iters={total_iters}")
        self.base, self.final, self.total = base_value, final_value, total_iters
        self.warmup, self.start_warmup, self.freeze = warmup_iters, start_warmup_value, freeze_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.total:
            return self.final
        if it < self.freeze:
            return 0.0
        it -= self.freeze
        if it < self.warmup:
            # np.linspace(start, base, warmup) includes both ends
            if self.warmup == 1:
                return self.start_warmup
            return self.start_warmup + (self.base - self.start_warmup) * it / (self.warmup - 1)
        i, n = it - self.warmup, self.total - self.warmup - self.freeze
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * i / n))


def cosine_ramp(it: int, start: int, length: int, peak: float) -> float:
    """0 before `start`, cosine 0 -> peak over `length` iterations, then `peak` (Gram weight).

    The official v2 `linear_warmup_cosine_decay(start=0, peak=0, end=w, warmup=start,
    cosine_iterations=length)` (dinov3/train/cosine_lr_scheduler.py): its cosine part is
    cos(np.linspace(0, π, length)), endpoint included, so the ramp's last iteration
    (start + length - 1) already holds `peak` (7B Gram stage: w_gram = 2.0 at 1,000,999)."""
    if it < start:
        return 0.0
    if length <= 0 or it >= start + length:
        return peak
    if length == 1:  # np.linspace(0, π, 1) = [0]: one iteration at the start value
        return 0.0
    return peak * 0.5 * (1 - math.cos(math.pi * (it - start) / (length - 1)))


def lr_scale(cfg: Config, global_batch_size: int) -> float:
    """The factor of `optim.scaling_rule` (SPEC.md §3.2): 4·√(global_batch/1024), or 1."""
    if cfg.optim.scaling_rule == "sqrt_wrt_1024":
        return 4.0 * math.sqrt(global_batch_size / 1024.0)
    return 1.0


def scaled_lr(cfg: Config, global_batch_size: int) -> float:
    """Peak lr after `optim.scaling_rule` (SPEC.md §3.2)."""
    return cfg.optim.lr * lr_scale(cfg, global_batch_size)


def scaled_min_lr(cfg: Config, global_batch_size: int) -> float:
    """End lr: `optim.min_lr` as written below `optim.lr` (v1 scales only the peak: the ImageNet
    recipe ends at 1e-6), scaled like the peak at or above it (v2 scales peak and end:
    `build_schedulers_v2`; 7B pretrain lr = min_lr = 5e-5 -> 4e-4 constant at 4,096 images)."""
    o = cfg.optim
    return o.min_lr * lr_scale(cfg, global_batch_size) if o.min_lr >= o.lr else o.min_lr


def scaled_momenta(cfg: Config, global_batch_size: int) -> tuple[float, float]:
    """(start, final) teacher momentum after `schedules.momentum_reference_batch`."""
    s = cfg.schedules
    if s.momentum_reference_batch is None:
        return s.momentum_teacher, s.final_momentum_teacher
    kappa = global_batch_size / s.momentum_reference_batch
    return s.momentum_teacher ** kappa, s.final_momentum_teacher ** kappa


@dataclass(frozen=True)
class ScheduleValues:
    lr: float
    wd: float
    momentum: float  # EMA momentum m of the teacher: θ_t ← m·θ_t + (1−m)·θ_s
    teacher_temp: float  # τ_t for DINO and iBOT
    last_layer_lr: float  # lr of the `last_layer` groups (0 during the freeze)
    backbone_lr: float  # lr of the backbone groups (0 during the head warm-up)
    gram_weight: float  # w_gram (0 when gram.use is off)
    local_loss_weight: float  # w_local of the DINO local term


class Schedules:
    def __init__(self, cfg: Config, global_batch_size: int):
        ep = cfg.train.epoch_length
        total = cfg.train.total_iterations
        warmup = int(cfg.optim.warmup_epochs * ep)
        lr, lr_end = scaled_lr(cfg, global_batch_size), scaled_min_lr(cfg, global_batch_size)
        self.lr = CosineScheduler(lr, lr_end, total, warmup_iters=min(warmup, total))
        self.wd = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
        m0, m1 = scaled_momenta(cfg, global_batch_size)
        self.momentum = CosineScheduler(m0, m1, total)
        tt_warm = int(cfg.schedules.warmup_teacher_temp_epochs * ep)
        self.teacher_temp = CosineScheduler(cfg.schedules.teacher_temp, cfg.schedules.teacher_temp,
                                            tt_warm, warmup_iters=tt_warm,
                                            start_warmup_value=cfg.schedules.warmup_teacher_temp)
        self.freeze_last_layer = int(cfg.optim.freeze_last_layer_epochs * ep)
        self.freeze_backbone = int(cfg.optim.freeze_backbone_epochs * ep)
        self.cfg = cfg

    def at(self, it: int) -> ScheduleValues:
        g = self.cfg.gram
        gram_w = (cosine_ramp(it, g.start_iteration, g.loss_weight_warmup_iterations, g.loss_weight)
                  if g.use else 0.0)
        lr = self.lr[it]
        return ScheduleValues(
            lr=lr, wd=self.wd[it], momentum=self.momentum[it], teacher_temp=self.teacher_temp[it],
            last_layer_lr=0.0 if it < self.freeze_last_layer else lr,
            backbone_lr=0.0 if it < self.freeze_backbone else lr, gram_weight=gram_w,
            local_loss_weight=local_loss_weight_at(self.cfg.dino, it))


def local_loss_weight_at(dino, it: int) -> float:
    """w_local: 1 before `local_loss_weight_start_iteration`, a cosine 1 -> `local_loss_weight`
    over `local_loss_weight_ramp_iterations`, then `local_loss_weight`. The official 7B Gram stage
    `linear_warmup_cosine_decay(start=1, peak=1, end=0.5, warmup=1M, cosine_iterations=1000)`: a
    constant 1 for 1M iterations, then end + ½(peak - end)(1 + cos(np.linspace(0, π, 1000)))
    (endpoint included: 0.5 at 1,000,999), i.e. 1 minus cosine_ramp's 0 -> 0.5."""
    w = dino.local_loss_weight
    r = cosine_ramp(it, dino.local_loss_weight_start_iteration,
                    dino.local_loss_weight_ramp_iterations, 1.0 - w)
    return w if r == 1.0 - w else 1.0 - r  # w itself at the end: 1 - (1 - w) may not be w


def build_schedules(cfg: Config, global_batch_size: int) -> Schedules:
    """The run's schedules; logs the lr the scaling rule gives at this global batch (the number
    users compare with the paper's, and the one that changes with the GPU count)."""
    o = cfg.optim
    peak, end = scaled_lr(cfg, global_batch_size), scaled_min_lr(cfg, global_batch_size)
    how = (f"optim.lr {o.lr:g} x {lr_scale(cfg, global_batch_size):.4g} "
           f"({o.scaling_rule} at global batch {global_batch_size})"
           if o.scaling_rule != "none" else "optim.lr, unscaled")
    logger.info("lr: %.4g after %g warm-up epochs (%s), %.4g at the end%s", peak, o.warmup_epochs,
                how, end, " (constant)" if end == peak else "")
    return Schedules(cfg, global_batch_size)


def apply_to_param_groups(param_groups: list[dict], v: ScheduleValues) -> None:
    """Write lr·lr_multiplier and wd·wd_multiplier into every optimizer group (SPEC.md §3.1 step 1).
    Groups are matched by their own keys (never by index: ZeRO may reorder or drop groups)."""
    for g in param_groups:
        if g["is_last_layer"]:
            base_lr = v.last_layer_lr
        elif g["is_backbone"]:
            base_lr = v.backbone_lr
        else:
            base_lr = v.lr
        g["lr"] = base_lr * g["lr_multiplier"]
        g["weight_decay"] = v.wd * g["wd_multiplier"]
