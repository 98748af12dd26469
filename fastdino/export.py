"""`fastdino export --run DIR --out FILE`: the EMA teacher backbone of a training run as a plain
state dict with the official DINOv3 key names (SPEC.md §4: `cls_token`, `storage_tokens`,
`mask_token`, `patch_embed.proj.*`, `rope_embed.periods`, `blocks.{i}.*`, `norm.*`), written as
`.pth` (torch.save) or `.safetensors` (by the suffix of FILE .pth / .pt / .safetensors; both
when FILE has another or no suffix, appended to the whole name: `model.v1` -> `model.v1.pth` +
`model.v1.safetensors`; an existing folder, or `DIR/`: `teacher_backbone.pth` + `.safetensors`
inside it; weight suffixes it does not write, such as `.bin` or `.ckpt`, are an error).
A DINOv2-architecture run (`model.arch: dinov2_*`) is written with DINOv2's names
(`pos_embed`, `register_tokens`, ViT-g's fused `mlp.w12`), which its hub code loads.
`--with-heads` writes the whole teacher ({"teacher": backbone.*, dino_head.*, ibot_head.*}) to
one `.pth`, which `model.pretrained_weights` takes with its heads (continued pretraining).
`--format hf` writes a Hugging Face `DINOv3ViTModel` folder (config.json + model.safetensors;
`Dinov2Model` / `Dinov2WithRegistersModel` for a DINOv2-architecture run: HF resizes the position
table by size, antialiased for the register models, so a teacher with DINOv2's 0.1
interpolate_offset is exported with a warning, its outputs matching HF's at the trained grid
only), the architecture from the run's config.yaml, loaded into transformers' own class strictly
before it is saved (needs the `interop` extra). `--format timm` writes a timm model folder
(config.json + model.safetensors: timm's DINOv3 `Eva`, loaded by
`timm.create_model("local-dir:OUT", pretrained=True)`).

The teacher is replicated, so rank 0's `trainer_state.pt` holds it whole: no ZeRO consolidation
is needed. Loadable with `fastdino.models.state_dict_io.load_backbone_state_dict` (strict) or the
official `DinoVisionTransformer.load_state_dict`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fastdino.models.convnext import ConvNeXt, is_convnext_state_dict, to_official_state_dict
from fastdino.models.state_dict_io import extract_backbone_state_dict, to_dinov2_names

logger = logging.getLogger("fastdino.export")


def teacher_backbone_state_dict(run_or_ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Backbone keys of the teacher in a run dir (its latest checkpoint) or a checkpoint dir."""
    teacher, _ = teacher_state(run_or_ckpt)
    sd = extract_backbone_state_dict({"teacher": teacher})
    return {k: v.contiguous().clone() for k, v in sd.items()}


BACKBONE_SUFFIXES = (".pth", ".pt", ".safetensors")
# suffixes of weight files fastdino does not write: an error, not FILE.bin.pth
OTHER_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".h5", ".hdf5",
                         ".onnx", ".msgpack", ".gguf", ".tar", ".zip")
DIR_STEM = "teacher_backbone"  # the file names inside an --out folder


def backbone_targets(out: str | Path) -> list[Path]:
    """The files `--out` names (official format): FILE.pth / FILE.pt / FILE.safetensors itself;
    an existing folder (or one written with a trailing slash): DIR/teacher_backbone.pth and
    .safetensors inside it; any other name: both suffixes appended to the whole name (`model.v1` ->
    model.v1.pth + model.v1.safetensors). A weights suffix fastdino does not write (.bin, .ckpt,
    ...) is a ValueError listing the allowed ones."""
    text = str(out)
    out = Path(out).expanduser()
    if out.is_dir() or text.endswith(("/", "\\")):
        return [out / f"{DIR_STEM}.pth", out / f"{DIR_STEM}.safetensors"]
    suffix = out.suffix.lower()
    if suffix in BACKBONE_SUFFIXES:
        return [out]
    if suffix in OTHER_WEIGHT_SUFFIXES:
        raise ValueError(f"--out {text!r}: fastdino does not write {out.suffix} files; allowed are "
                         "FILE.pth / FILE.pt (torch), FILE.safetensors, FILE without those (both "
                         "written), or a folder (teacher_backbone.pth + .safetensors inside)")
    return [out.with_name(out.name + ".pth"), out.with_name(out.name + ".safetensors")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_umask(path: Path) -> None:
    """Give `path` the mode a plain `open()` would (0o666 minus the umask). safetensors >= 0.7
    writes through a private temporary file and keeps its 0600 mode (huggingface/safetensors#782),
    so an exported model was readable by its writer only: not by teammates, nor by a container
    running as another user, while the .pth beside it was."""
    path.chmod(0o666 & ~_umask())


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"format": "pt", "source": "fastdino teacher backbone"})
    readable_by_umask(path)


def export_backbone(run_or_ckpt: str | Path, out: str | Path) -> list[Path]:
    sd = teacher_backbone_state_dict(run_or_ckpt)
    if "pos_embed" in sd:  # a DINOv2-architecture run: the official DINOv2 names
        sd = to_dinov2_names(sd)
    if is_convnext_state_dict(sd):  # the official ConvNeXt's duplicate final norm
        sd = to_official_state_dict(sd)
    targets = backbone_targets(out)
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    for t in targets:
        if t.suffix.lower() == ".safetensors":
            save_safetensors(sd, t)
        else:
            torch.save(sd, t)
    return targets


def teacher_state(run_or_ckpt: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The whole EMA teacher (backbone and heads) of a run or checkpoint, and that checkpoint."""
    from fastdino.checkpoint import STATE_FILE, complete_checkpoints
    from fastdino.eval.weights import read_weights

    path = Path(run_or_ckpt).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--run {str(run_or_ckpt)!r} does not exist: give a training "
                                "run's output_dir or one of its checkpoints/iter_N folders")
    if (path / "config.yaml").is_file() and not (path / STATE_FILE).is_file() \
            and not complete_checkpoints(path / "checkpoints"):
        # the config is written first: a run stopped early, or still before its first save
        raise FileNotFoundError(f"--run {str(run_or_ckpt)!r} is a training run without a "
                                f"checkpoint yet (none in {path / 'checkpoints'}): it writes one "
                                "every train.checkpoint_every iterations, at its last iteration "
                                "and when a signal stops it")
    sd, source, _, run_cfg = read_weights(run_or_ckpt)
    if "teacher" not in sd:
        raise ValueError(f"--run {str(run_or_ckpt)!r} is a {source}, not a training run or "
                         "checkpoint folder")
    return sd["teacher"], run_cfg


def export_with_heads(run_or_ckpt: str | Path, out: str | Path) -> list[Path]:
    out = Path(out)
    if out.suffix not in (".pth", ".pt"):
        raise ValueError(f"--out {str(out)!r}: --with-heads writes one torch file; allowed "
                         "suffixes are .pth / .pt")
    teacher, _ = teacher_state(run_or_ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": {k: v.contiguous().clone() for k, v in teacher.items()}}, out)
    return [out]


def _teacher_backbone(run_or_ckpt: str | Path, config: str | None = None):
    """(the run's EMA teacher backbone as a module of the run's own architecture (strict load),
    or of `config`: a preset name or yaml, for sources without a config.yaml, e.g. an official
    DINOv3 checkpoint; that resolved Config)."""
    from fastdino.config import load_unvalidated, resolve_preset
    from fastdino.eval.weights import resolve_model_config
    from fastdino.models.backbones import build_backbone
    from fastdino.models.state_dict_io import load_backbone_state_dict

    teacher, run_cfg = teacher_state(run_or_ckpt)
    if config is not None:
        run_cfg = resolve_preset(config, "--config")
    if run_cfg is None:
        raise FileNotFoundError(f"--run {str(run_or_ckpt)!r}: no config.yaml beside the "
                                "checkpoints, so the architecture is unknown: give --config "
                                "(a preset name or a yaml)")
    backbone = build_backbone(resolve_model_config(config=run_cfg), device="meta")
    backbone = backbone.to_empty(device="cpu")
    load_backbone_state_dict(backbone, {"teacher": teacher})
    # unvalidated: the training rules (a preset's unset distillation.teacher, a rule added
    # since an older run) say nothing about export; its model section was validated above
    return backbone.eval(), load_unvalidated(run_cfg)


def export_hf(run_or_ckpt: str | Path, out: str | Path, config: str | None = None) -> list[Path]:
    """A Hugging Face model folder of the run's teacher backbone (DINOv3ViTModel, Dinov2 for
    learned positions, DINOv3ConvNextModel for a ConvNeXt student)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - optional extra
        raise ImportError("--format hf needs transformers: pip install 'fastdino[interop]'") from e
    from fastdino.models import hf_convert, hf_dinov2

    backbone, _ = _teacher_backbone(run_or_ckpt, config=config)
    if isinstance(backbone, ConvNeXt):  # DINOv3ConvNextModel
        from fastdino.models import hf_convnext

        model = transformers.DINOv3ConvNextModel(
            hf_convnext.hf_convnext_config_from_backbone(backbone))
        hf_sd = hf_convnext.to_hf_convnext_state_dict(backbone.state_dict())
    elif backbone.rope_embed is None:  # DINOv2 architecture: Dinov2(WithRegisters)Model
        note = hf_dinov2.hf_resize_difference(backbone)  # HF has no interpolate_offset
        if note is not None:
            logger.warning(note)
        hf_config = hf_dinov2.hf_dinov2_config_from_backbone(backbone)
        cls = (transformers.Dinov2WithRegistersModel if backbone.n_storage_tokens
               else transformers.Dinov2Model)
        model, hf_sd = cls(hf_config), hf_dinov2.to_hf_dinov2_state_dict(backbone.state_dict())
    else:
        model = transformers.DINOv3ViTModel(hf_convert.hf_config_from_backbone(backbone))
        hf_sd = hf_convert.to_hf_state_dict(backbone.state_dict())
    model.eval()
    missing, unexpected = model.load_state_dict(hf_names_of(model, hf_sd), strict=False)
    if missing or unexpected:
        raise ValueError(f"the Hugging Face model does not take the converted teacher: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    for f in out.glob("*.safetensors"):
        readable_by_umask(f)
    return sorted(out.iterdir())


def hf_names_of(model: torch.nn.Module, hf_sd: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """`hf_sd` (transformers 5 names: `model.layer.i` / `model.stages.i`) in the names of
    `model` itself: transformers 4.x (the interop extra allows >= 4.56) has the encoder's layers
    at the top (`layer.i`, `stages.i`), and the strict load would miss every one of them."""
    own = set(model.state_dict())
    return {k.removeprefix("model.") if k not in own and k.removeprefix("model.") in own else k: v
            for k, v in hf_sd.items()}


def export_timm(run_or_ckpt: str | Path, out: str | Path, config: str | None = None
                ) -> list[Path]:
    """A timm model folder (config.json + model.safetensors, the hub layout) of the run's teacher
    backbone: `timm.create_model("local-dir:OUT", pretrained=True)` builds timm's DINOv3 Eva (or
    its ConvNeXt, for a ConvNeXt student) with these weights. Needs safetensors only (timm is not
    imported)."""
    import json

    from fastdino.models.timm_convert import timm_config_from_backbone, to_timm_state_dict

    backbone, run_cfg = _teacher_backbone(run_or_ckpt, config=config)
    if isinstance(backbone, ConvNeXt):  # timm's ConvNeXt (the hub's DINOv3 ConvNeXt layout)
        from fastdino.models.timm_convnext import timm_convnext_config, to_timm_convnext_state_dict

        config = timm_convnext_config(backbone, mean=run_cfg.crops.mean, std=run_cfg.crops.std)
        sd = to_timm_convnext_state_dict(backbone.state_dict())
    else:
        config = timm_config_from_backbone(backbone, mean=run_cfg.crops.mean,
                                           std=run_cfg.crops.std)
        sd = to_timm_state_dict(backbone.state_dict())
    sd = {k: v.contiguous() for k, v in sd.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [out / "config.json", out / "model.safetensors"]
