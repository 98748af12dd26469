"""Backbone loading for evaluation: one `--weights` argument, every file the DINOv3 world produces.

    backbone, info = load_eval_backbone("runs/smoke", arch=None, config=None)
    # info.source = "training checkpoint runs/smoke/checkpoints/iter_0000200", info.digest = "3f…"

`--weights` may be
    a training run / checkpoint directory   <out>/, <out>/checkpoints/ (its `latest`) or
                                            <out>/checkpoints/iter_N/: the EMA teacher's backbone
                                            from trainer_state.pt (SPEC.md §4)
    an exported backbone file               .pth / .pt (plain official keys, or {"teacher": ...}
                                            with `backbone.` / `module.` prefixes) or .safetensors;
                                            a teacher snapshot <run>/eval/training_N/
                                            teacher_checkpoint.pth takes the run's architecture
    a Hugging Face model folder             config.json + *.safetensors: DINOv3ViTModel (converted
                                            by hf_convert), Dinov2Model / Dinov2WithRegistersModel
                                            (hf_dinov2); saved inside a wrapper too (e.g.
                                            Dinov2ForImageClassification: the base model's
                                            prefix stripped, classifier.* dropped and logged)
    a timm model folder                     config.json with `architecture` (vit_*_dinov3*) +
                                            model.safetensors, as on the hub or from
                                            `fastdino export --format timm` (timm_convert)
    an official DINOv3 checkpoint           a DCP folder (<output_dir>/ckpt/<iteration>/, or the
                                            output_dir: its latest) or a sharded eval snapshot:
                                            its teacher (official_dcp; architecture from --arch)
    "random"                                the architecture's own init under `seed` (baselines)

The architecture comes from `arch` (a factory name such as vit_small, or convnext_tiny for the
released ConvNeXt weights), or from `config` (a preset name such as `smoke` or a yaml path: its
`model:` section; a ConvNeXt one need not be a distillation config); for a training run with
neither, from the run's own config.yaml; for a Hugging Face or timm folder with neither, from its
config.json.
Loading is strict (fastdino.models.load_backbone_state_dict): a missing, unexpected or mis-shaped
key raises and names the key, never a partial load. User files are read with
`torch.load(weights_only=True)` or safetensors, so loading never runs code from them.

`info.digest` hashes the loaded backbone tensors (names, shapes, dtypes, bytes), so the feature
cache is keyed by the weights themselves: the same weights exported as .pth or .safetensors hit
the same cache entry, and any changed tensor misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdino.config import (
    PRESET_DIR,
    ModelConfig,
    find_preset,
    load_unvalidated,
    preset_names,
)
from fastdino.models.backbones import ARCH_TABLE, build_backbone
from fastdino.models.convnext import CONVNEXT_ARCHS
from fastdino.models.state_dict_io import load_backbone_state_dict

logger = logging.getLogger("fastdino.eval")

CONFIG_DIR = PRESET_DIR  # configs/
TRAINER_STATE = "trainer_state.pt"  # fastdino.checkpoint.STATE_FILE
HF_MODEL_TYPES = ("dinov3_vit", "dinov2", "dinov2_with_registers", "dinov3_convnext")
# --arch: the ViT factories and the ConvNeXt sizes (the released dinov3_convnext_*.pth)
EVAL_ARCHS = (*ARCH_TABLE, *CONVNEXT_ARCHS)


@dataclass
class WeightsInfo:
    source: str  # human-readable: what was loaded from where
    digest: str  # sha256 of the backbone tensors (cache key)
    arch: str  # description of the architecture (cache key, reports)
    # the training run's config.yaml that came with the weights (a run / checkpoint folder, a
    # teacher snapshot, the final export), else None: eval takes its data.white_level
    run_config: Path | None = None


def resolve_model_config(
    arch: str | None = None, config: str | Path | None = None
) -> ModelConfig | None:
    """ModelConfig from a factory name (`arch`) or a preset (`config`: name in configs/ or a yaml
    path); None when neither is given. `arch` overrides the preset's `model.arch`."""
    if config is None and arch is not None and (CONFIG_DIR / f"{arch}.yaml").is_file():
        config = arch  # an arch with a preset of its name (dinov2_*: patch 14, learned positions)
    if config is not None:
        path = find_preset(config)
        if path is None:
            raise FileNotFoundError(
                f"--config {str(config)!r} is neither a yaml file nor a preset "
                f"name: presets are {preset_names()}"
            )
        model_cfg = _model_section(path)
    elif arch is not None:
        model_cfg = ModelConfig()
        # The arch's own official settings, not ModelConfig's defaults, which build_backbone
        # applies over them: --arch vit_7b is the released layout (no qkv bias, local_cls_norm)
        if arch in ARCH_TABLE:
            for name, value in ARCH_TABLE[arch][5].items():
                if hasattr(model_cfg, name):
                    setattr(model_cfg, name, value)
    else:
        return None
    if arch is not None:
        if arch not in EVAL_ARCHS:
            raise ValueError(
                f"--arch {arch!r} is invalid: allowed is one of " + " | ".join(EVAL_ARCHS)
            )
        model_cfg.arch = arch
    model_cfg.drop_path_rate = 0.0  # eval: no stochastic depth, no checkpointing, no compile
    model_cfg.activation_checkpointing = False
    model_cfg.compile = False
    return model_cfg


def _model_section(path: Path) -> ModelConfig:
    """The validated `model:` section of a config yaml (a preset or a run's config.yaml), read
    without the whole-config rules: those are about training (distillation.teacher set when
    distillation is enabled, a ConvNeXt only as a distillation student, ...), say nothing about
    the backbone an evaluation builds, and a rule added since must not refuse an older run's
    saved config."""
    cfg = load_unvalidated(path)
    cfg.model.validate()  # the model section's own rules still hold
    return cfg.model


def describe_arch(backbone: nn.Module) -> str:
    """Architecture summary from the module itself (every shape-relevant hyperparameter)."""
    shapes = sorted((k, tuple(v.shape)) for k, v in backbone.state_dict().items())
    h = hashlib.sha256(repr(shapes).encode()).hexdigest()[:12]
    from fastdino.models.convnext import ConvNeXt

    if isinstance(backbone, ConvNeXt):
        return f"convnext-D{backbone.embed_dim}-L{backbone.n_blocks}-p{backbone.patch_size}-{h}"
    return (
        f"D{backbone.embed_dim}-L{backbone.n_blocks}-H{backbone.num_heads}-"
        f"p{backbone.patch_size}-reg{backbone.n_storage_tokens}-{h}"
    )


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _find_checkpoint(path: Path) -> Path | None:
    """The checkpoint tag dir holding trainer_state.pt for a run / checkpoints / tag dir: a folder
    of checkpoints gives the one its `latest` names, or its newest complete one when `latest` is
    missing, damaged or names an incomplete checkpoint (checkpoint.latest_checkpoint, which says
    so), as a resume would take."""
    from fastdino.checkpoint import checkpoint_dirs, latest_checkpoint

    for cand in (path, path / "checkpoints"):
        if (cand / TRAINER_STATE).is_file():
            return cand
        if (cand / "latest").is_file() or checkpoint_dirs(cand):
            return latest_checkpoint(cand)
    return None


def _run_config(ckpt: Path) -> Path | None:
    """The config.yaml the trainer saved next to checkpoints/ (`<out>/config.yaml`)."""
    for cand in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand / "config.yaml"
    return None


def _unreadable(path: Path, kind: str, e: BaseException) -> ValueError:
    """One line naming the file, for whatever torch / safetensors raised on it (a truncated file
    gives OSError, KeyError numbers or EOFError; torch's weights-only refusal advises
    weights_only=False, which would run the file's code: never the advice to give)."""
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(e, pickle.UnpicklingError) and refused:
        return ValueError(f"{str(path)!r} holds objects other than tensors and plain containers "
                          f"({refused.group(1)}): refused, weight files are read with "
                          "weights_only=True so that loading never runs code from them; save a "
                          "state dict (tensors only)")
    if "WeightsUnpickler error:" in text:  # not torch's advice, only what it found
        text = text.split("WeightsUnpickler error:", 1)[1]
    detail = (text.strip().splitlines() or [""])[0]
    if len(detail) > 160 and ". " in detail:  # torch's long advice after the first sentence
        detail = detail.split(". ", 1)[0] + "."
    detail = detail[:200]
    name = type(e).__qualname__
    if type(e).__module__ != "builtins":  # struct.error, not a bare "error"
        name = f"{type(e).__module__.split('.')[0].lstrip('_')}.{name}"
    return ValueError(f"{str(path)!r} is not a readable {kind} file (truncated or corrupt?): "
                      f"{name}{': ' + detail if detail else ''}")


def _torch_load(path: Path) -> dict:
    """torch.load(weights_only=True) of a user file; a file it cannot read is a ValueError
    naming it (_unreadable)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:
        raise _unreadable(path, "torch", e) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict (a dict "
                         "of tensors)")
    return obj


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:
        raise _unreadable(path, "safetensors", e) from e


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        return _safetensors_load(path)
    if path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):
        return _torch_load(path)
    raise ValueError(
        f"--weights {str(path)!r}: unknown file type {path.suffix!r}; allowed are "
        ".pth / .pt / .bin / .ckpt (torch) and .safetensors"
    )


# transformers' base_model_prefix of the models a wrapper (…ForImageClassification, a user's
# model holding one) keeps under that attribute: "model" (DINOv3ViT, DINOv3ConvNext), "dinov2",
# "dinov2_with_registers"; and older names of ours
HF_WRAPPER_PREFIXES = ("dinov2_with_registers.", "dinov2.", "dinov3_vit.", "model.", "backbone.")
HF_HEAD_PREFIXES = ("classifier.",)  # an image-classification head: not part of the backbone


def _hf_backbone_keys(hf_sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The base model's keys of a Hugging Face state dict: a wrapper's classification head
    dropped (logged), and the prefix its base model sits under stripped (one a model saved by
    itself lacks: stripped only when every remaining key carries it)."""
    head = sorted(k for k in hf_sd if k.startswith(HF_HEAD_PREFIXES))
    if head:
        logger.info("--weights %s: dropped %d classification-head key(s) (%s): only the backbone "
                    "is loaded", path, len(head), ", ".join(head[:4]))
        hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith(HF_HEAD_PREFIXES)}
    for prefix in HF_WRAPPER_PREFIXES:
        if hf_sd and all(k.startswith(prefix) for k in hf_sd):
            return {k.removeprefix(prefix): v for k, v in hf_sd.items()}
    return hf_sd


def _load_hf_folder(path: Path):
    """(our state dict, transformers config) from a DINOv3ViTModel folder."""
    try:
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError(
            "loading a Hugging Face folder needs transformers: pip install 'fastdino[interop]'"
        ) from e
    from fastdino.models.hf_convert import from_hf_state_dict

    hf_config = AutoConfig.from_pretrained(str(path))  # reads config.json only, runs no code
    if hf_config.model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"--weights {str(path)!r}: config.json has model_type "
            f"{hf_config.model_type!r}; allowed is one of {', '.join(HF_MODEL_TYPES)} "
            "(DINOv3ViTModel, Dinov2Model, Dinov2WithRegistersModel, DINOv3ConvNextModel)"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"--weights {str(path)!r}: config.json but no *.safetensors "
            "(save the model with safe_serialization=True)"
        )
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        hf_sd.update(_safetensors_load(f))
    hf_sd = _hf_backbone_keys(hf_sd, path)
    if hf_config.model_type == "dinov3_convnext":
        from fastdino.models.hf_convnext import from_hf_convnext_state_dict

        return from_hf_convnext_state_dict(hf_sd), hf_config
    if hf_config.model_type != "dinov3_vit":
        from fastdino.models.hf_dinov2 import from_hf_dinov2_state_dict

        return from_hf_dinov2_state_dict(hf_sd), hf_config
    return from_hf_state_dict(hf_sd, hf_config), hf_config


def _load_timm_folder(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The state dict (timm names) of a timm model folder; load_backbone_state_dict converts it."""
    from fastdino.models.timm_convert import TIMM_DINOV3_ARCHS
    from fastdino.models.timm_convnext import TIMM_CONVNEXT_ARCHS

    if cfg["architecture"] not in (*TIMM_DINOV3_ARCHS, *TIMM_CONVNEXT_ARCHS):
        raise ValueError(
            f"--weights {str(path)!r}: a timm folder of {cfg['architecture']!r}; allowed are "
            "timm's DINOv3 models: " + ", ".join((*TIMM_DINOV3_ARCHS, *TIMM_CONVNEXT_ARCHS))
        )
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_file(path / name)
    raise FileNotFoundError(
        f"--weights {str(path)!r}: a timm config.json but neither model.safetensors nor "
        "pytorch_model.bin"
    )


def read_weights(weights: str | Path, key: str | None = None
                 ) -> tuple[dict, str, object, Path | None]:
    """(state dict, description, the folder's model config or None, the run's config.yaml or
    None) of a training run / checkpoint folder (its EMA teacher, as {"teacher": ...} with the
    heads), an exported backbone file, or a Hugging Face (config: a transformers config) or timm
    (config: its config.json as a dict) model folder. Used by evaluation (`--weights`, the `key`
    load_eval_backbone passes) and by training (`model.pretrained_weights`, `gram.ckpt`,
    `distillation.teacher`); `key` names the setting in the error for a missing path."""
    path = Path(weights).expanduser()
    if not path.exists():
        sources = ("a training run or checkpoint folder, a .pth/.safetensors backbone, a "
                   "Hugging Face DINOv3ViTModel or timm DINOv3 folder")
        if key == "--weights":  # eval's own random init
            raise FileNotFoundError(f"--weights {str(weights)!r}: the path does not exist; "
                                    f"give {sources}, or 'random'")
        name = f"{key}={str(weights)!r}" if key else f"weights {str(weights)!r}"
        # 'random' is a --weights of evaluation only: training's random init is no weights
        hint = ("; 'random' is evaluation's --weights only: for a random init leave "
                "model.pretrained_weights unset (null, or `model.pretrained_weights=` on the "
                "command line)") if str(weights).strip().lower() == "random" else ""
        raise FileNotFoundError(f"{name}: the path does not exist; give {sources}{hint}")
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        if "architecture" in cfg and "model_type" not in cfg:
            return _load_timm_folder(path, cfg), f"timm {cfg['architecture']} {path}", cfg, None
        sd, hf_config = _load_hf_folder(path)
        return sd, f"Hugging Face {hf_config.model_type} model {path}", hf_config, None
    if path.is_dir():
        ckpt = _find_checkpoint(path)
        if ckpt is None:
            from fastdino.models.official_dcp import find_official_checkpoint, read_official_teacher

            dcp_dir = find_official_checkpoint(path)
            if dcp_dir is not None:  # the official trainer's DCP
                sd = read_official_teacher(dcp_dir)
                return sd, f"official DINOv3 checkpoint {dcp_dir} (teacher)", None, None
            raise FileNotFoundError(
                f"weights {str(weights)!r}: a folder with neither {TRAINER_STATE} (a checkpoint), "
                "checkpoints/latest (a training run), config.json (Hugging Face, timm) nor "
                "an official DINOv3 DCP checkpoint (.metadata, or ckpt/<iteration>/)"
            )
        state = _torch_load(ckpt / TRAINER_STATE)
        if "teacher" not in state:
            raise KeyError(
                f"{ckpt / TRAINER_STATE} has no 'teacher' entry (keys: {', '.join(sorted(state))})"
            )
        return (
            {"teacher": state["teacher"]},
            f"training checkpoint {ckpt} (teacher)",
            None,
            _run_config(ckpt),
        )
    return _load_file(path), f"backbone file {path}", None, _snapshot_run_config(path)


def _snapshot_run_config(path: Path) -> Path | None:
    """The run's config.yaml for a file the trainer wrote into its run, so that it evaluates
    without --arch: a teacher snapshot `<run>/eval/training_N/teacher_checkpoint.pth`
    (train.teacher_snapshot_every), or the final export `<run>/teacher_backbone.{pth,safetensors}`
    beside `<run>/config.yaml`; None otherwise (a file of another name is not taken to be the
    model a config.yaml beside it describes)."""
    if (path.name == "teacher_checkpoint.pth" and path.parent.name.startswith("training_")
            and path.parent.parent.name == "eval"):
        return _run_config(path.parent)  # training_N/, eval/, <run>/
    if path.name in ("teacher_backbone.pth", "teacher_backbone.safetensors") and (
            path.parent / "config.yaml").is_file():
        return path.parent / "config.yaml"
    return None


def _add_cls_norm_if_untied(backbone: nn.Module, sd: dict) -> None:
    """Weights of an official run with untie_cls_and_patch_norms hold `cls_norm.*`, the final norm
    of the CLS and storage tokens (used in evaluation too): give the backbone that norm, which no
    arch, preset or config.json describes, so that the strict load takes them."""
    flat = sd["teacher"] if isinstance(sd.get("teacher"), dict) else sd
    names = {k.removeprefix("module.").removeprefix("backbone.") for k in flat}
    if "cls_norm.weight" in names and getattr(backbone, "cls_norm", False) is None:
        norm = backbone.norm
        backbone.cls_norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps,
                                         device=norm.weight.device)
        logger.info("the weights hold cls_norm (untie_cls_and_patch_norms): the CLS and storage "
                    "tokens get their own final norm")


def load_eval_backbone(
    weights: str | Path,
    arch: str | None = None,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, WeightsInfo]:
    """(backbone in eval mode on `device`, WeightsInfo). See the module docstring."""
    model_cfg = resolve_model_config(arch, config)
    weights = str(weights)
    folder_config = None  # a Hugging Face config, or a timm config.json dict
    run_cfg = None  # the run's config.yaml that came with the weights, when not used
    run_config = None  # the same, used or not (WeightsInfo.run_config)
    if weights == "random":
        if model_cfg is None:
            raise ValueError("--weights random needs --arch or --config to know what to build")
        torch.manual_seed(seed)
        sd, source = None, f"random init (seed {seed})"
    else:
        sd, source, folder_config, run_cfg = read_weights(weights, key="--weights")
        run_config = run_cfg
        if model_cfg is None and run_cfg is not None:
            model_cfg = resolve_model_config(config=run_cfg)
            source += f", architecture from {run_cfg}"
            run_cfg = None  # used: no hint below
    # With weights to load, build on the meta device (no init cost for a large model): the strict
    # load below writes every parameter and buffer, or raises.
    build_on = None if sd is None else "meta"
    if model_cfg is not None:
        backbone = build_backbone(model_cfg, device=build_on)
    elif isinstance(folder_config, dict) and folder_config["architecture"].startswith("convnext"):
        from fastdino.models.timm_convnext import backbone_from_timm_convnext_config

        backbone = backbone_from_timm_convnext_config(folder_config, device=build_on)
    elif isinstance(folder_config, dict):
        from fastdino.models.timm_convert import backbone_from_timm_config

        backbone = backbone_from_timm_config(folder_config, device=build_on)
    elif folder_config is not None and folder_config.model_type == "dinov3_convnext":
        from fastdino.models.hf_convnext import backbone_from_hf_convnext_config

        backbone = backbone_from_hf_convnext_config(folder_config, device=build_on)
    elif folder_config is not None and folder_config.model_type != "dinov3_vit":
        from fastdino.models.hf_dinov2 import backbone_from_hf_dinov2_config

        backbone = backbone_from_hf_dinov2_config(folder_config, device=build_on)
    elif folder_config is not None:
        from fastdino.models.hf_convert import backbone_from_hf_config

        backbone = backbone_from_hf_config(folder_config, device=build_on)
    else:
        raise ValueError(
            f"--weights {weights!r}: the architecture is unknown; pass --arch "
            f"(one of {' | '.join(EVAL_ARCHS)}) or --config (a preset or yaml)"
        )
    if sd is not None:
        _add_cls_norm_if_untied(backbone, sd)
        backbone = backbone.to_empty(device="cpu")
        try:
            load_backbone_state_dict(backbone, sd)
        except ValueError as e:
            given = " / ".join(f"--{k} {v}" for k, v in (("arch", arch), ("config", config))
                               if v is not None)
            hint = (f" (the run's {run_cfg} describes these weights: leave out {given} to use it)"
                    if run_cfg is not None else "")
            raise ValueError(
                f"--weights {weights!r} does not fit the architecture "
                f"{describe_arch(backbone)} ({source}): {e}{hint}"
            ) from None
    backbone.eval().requires_grad_(False)
    info = WeightsInfo(
        source=source, digest=state_dict_digest(backbone.state_dict()),
        arch=describe_arch(backbone), run_config=run_config,
    )
    logger.info("eval backbone: %s [%s]", source, info.arch)
    return backbone.to(device), info
