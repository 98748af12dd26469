"""The frozen teacher of distillation runs (SPEC.md §1.8, `distillation.*` in the config).

    teacher = build_distillation_teacher(cfg, device)   # a Student (backbone + both heads), frozen
    t = teacher.teacher_forward(global_crops, mask_indices)   # as the EMA teacher's forward

The official MultiDistillationMetaArch takes a frozen 7B teacher with its own DINO / iBOT heads
and trains smaller students on the same DINO + iBOT + KoLeo objective with Sinkhorn-Knopp
targets from that teacher: student unmasked (the iBOT loss still at the sampled positions), no
Gram loss, the student's EMA still kept (it is what is saved and evaluated). This is its
one-student form: the teacher is replicated on every rank, outside the engine, like the EMA
teacher (the official code shards its inference over all ranks and serves several students).

The teacher is a fastdino training run or checkpoint: its EMA teacher (backbone and heads) from
trainer_state.pt, its architecture from the run's config.yaml. Released backbones have no heads
(USERS.md §8); a run with `model.pretrained_weights=<released backbone> optim.frozen_blocks=-1`
fits heads to one and is then a valid teacher. Its prototype counts must equal the student's
(the losses compare the two heads' outputs prototype by prototype), and its patch size too (the
iBOT positions index the same patch grid).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastdino.config import Config, ConfigError, load_unvalidated, resolve_preset
from fastdino.models.state_dict_io import load_backbone_state_dict

logger = logging.getLogger("fastdino")


def build_distillation_teacher(cfg: Config, device: torch.device) -> nn.Module:
    """The frozen teacher of `distillation.teacher`, in eval mode on `device`."""
    from fastdino.eval.weights import read_weights
    from fastdino.meta_arch import build_student, head_state_dicts

    path = cfg.distillation.teacher
    sd, source, _, run_cfg = read_weights(path, key="distillation.teacher")
    if cfg.distillation.teacher_config is not None:
        run_cfg = resolve_preset(cfg.distillation.teacher_config, "distillation.teacher_config")
    if "teacher" not in sd:
        raise ConfigError(
            f"distillation.teacher={path!r} is a {source}: a teacher needs its DINO and iBOT "
            "heads, i.e. a fastdino training run or checkpoint folder, a `fastdino export "
            "--with-heads` file or an official DINOv3 checkpoint (fit heads to a released "
            "backbone first: model.pretrained_weights=<backbone> optim.frozen_blocks=-1)")
    if run_cfg is None:
        raise ConfigError(
            f"distillation.teacher={path!r} ({source}) has no config.yaml beside it: give the "
            "teacher's architecture as distillation.teacher_config (a preset name or a yaml "
            "with its model and head sizes)")
    # only the sections the teacher is built from are validated: the whole-config rules are the
    # teacher run's training rules (a rule added since must not refuse an older run's config)
    tcfg = load_unvalidated(run_cfg)
    try:
        tcfg.model.validate()
        tcfg.dino.head.validate("dino.head")
        tcfg.ibot.head.validate("ibot.head")
    except ConfigError as e:  # the teacher's key, not the student's of the same name
        raise ConfigError(f"distillation.teacher={path!r}: its config {str(run_cfg)!r}: {e}") \
            from None
    _check_compatible(cfg, tcfg, path)
    # the student's kernels; no stochastic depth, checkpointing or compile in a frozen model
    tcfg.kernels = cfg.kernels
    tcfg.model.drop_path_rate = 0.0
    tcfg.model.activation_checkpointing = False
    tcfg.model.compile = False
    teacher = build_student(tcfg)
    state = sd["teacher"]
    try:  # the backbone through the strict loader, which merges a LoRA run's adapters
        load_backbone_state_dict(teacher.backbone, {"teacher": state})
        heads = head_state_dicts(state)
        for name in ("dino_head", "ibot_head"):  # both required: a missing one fails strictly
            getattr(teacher, name).load_state_dict(heads.get(name, {}), strict=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"distillation.teacher={path!r}: the weights of {source} do not fit "
                         f"the architecture of {run_cfg}: {e}") from None
    dtype = teacher_dtype(cfg, device)
    teacher = teacher.to(device, dtype).eval().requires_grad_(False)
    teacher.compute_dtype = dtype  # teacher_forward casts the crops to it
    teacher.config = tcfg  # its architecture, for FLOP counts (fastdino.profile)
    n = sum(p.numel() for p in teacher.backbone.parameters())
    logger.info("distillation: the targets come from the frozen teacher %s (%s, %.1fM backbone "
                "parameters, held in %s); the student's EMA is kept for export and evaluation",
                source, tcfg.model.arch, n / 1e6, str(dtype).removeprefix("torch."))
    return teacher


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    return resolve_teacher_dtype(cfg.distillation.teacher_dtype, cfg, device)


def resolve_teacher_dtype(choice: str, cfg: Config, device: torch.device) -> torch.dtype:
    """A frozen teacher's dtype setting (`distillation.teacher_dtype`, `gram.teacher_dtype`):
    auto = the run's precision (bf16 when training in bf16), else the named one."""
    from fastdino.parallel import resolve_precision

    if choice == "auto":
        return resolve_precision(cfg, device)
    return torch.bfloat16 if choice == "bf16" else torch.float32


def _check_compatible(cfg: Config, tcfg: Config, path: str) -> None:
    pairs = [("model.patch_size", cfg.model.patch_size, tcfg.model.patch_size),
             ("dino.head.n_prototypes", cfg.dino.head.n_prototypes, tcfg.dino.head.n_prototypes),
             ("ibot.head.n_prototypes", cfg.ibot.head.n_prototypes, tcfg.ibot.head.n_prototypes)]
    for key, student, teacher in pairs:
        if student != teacher:
            raise ConfigError(f"{key}={student} but the distillation teacher {path!r} has "
                              f"{teacher}: set {key}={teacher} for the student")
