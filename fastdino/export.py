"""`fastdino export --run DIR --out FILE`: the EMA teacher backbone of a training run as a plain
state dict with the official DINOv3 key names (SPEC.md §4: `cls_token`, `storage_tokens`,
`mask_token`, `patch_embed.proj.*`, `rope_embed.periods`, `blocks.{i}.*`, `norm.*`), written as
`.pth` (torch.save) or `.safetensors` (by the suffix of FILE; both when FILE has no suffix).

The teacher is replicated, so rank 0's `trainer_state.pt` holds it whole: no ZeRO consolidation
is needed. Loadable with `fastdino.models.state_dict_io.load_backbone_state_dict` (strict) or the
official `DinoVisionTransformer.load_state_dict`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdino.checkpoint import STATE_FILE, resolve_resume
from fastdino.models.state_dict_io import extract_backbone_state_dict


def teacher_backbone_state_dict(run_or_ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Backbone keys of the teacher in a run dir (its latest checkpoint) or a checkpoint dir."""
    p = Path(run_or_ckpt)
    ckpt = resolve_resume(str(p / "checkpoints"), p) if (p / "checkpoints").is_dir() else \
        resolve_resume(str(p), p)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint found under {p}")
    st = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    sd = extract_backbone_state_dict({"teacher": st["teacher"]})
    return {k: v.contiguous().clone() for k, v in sd.items()}


def export_backbone(run_or_ckpt: str | Path, out: str | Path) -> list[Path]:
    sd = teacher_backbone_state_dict(run_or_ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = [out] if out.suffix in (".pth", ".pt", ".safetensors") else \
        [out.with_suffix(".pth"), out.with_suffix(".safetensors")]
    for t in targets:
        if t.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(t), metadata={"format": "pt", "source": "fastdino teacher backbone"})
        else:
            torch.save(sd, t)
    return targets
