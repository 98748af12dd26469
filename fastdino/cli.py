"""`fastdino train|export|profile|eval ...` (the console script of pyproject.toml).

    fastdino train --config configs/smoke.yaml data.root=/imgs     (= python fastdino/train.py)
    fastdino export --run runs/smoke --out teacher_backbone.safetensors
    fastdino profile ...                                            (fastdino/profile.py)
    fastdino eval knn --run runs/smoke --data DIR [--config ...]    (kNN probe of the teacher)
Multi-GPU training goes through the DeepSpeed launcher: `deepspeed --num_gpus N fastdino/train.py`.
"""

from __future__ import annotations

import argparse
import json
import sys


def _export(argv: list[str]) -> int:
    from fastdino.export import export_backbone

    p = argparse.ArgumentParser(prog="fastdino export", description=__doc__)
    p.add_argument("--run", required=True, help="run dir (its latest checkpoint) or checkpoint dir")
    p.add_argument("--out", required=True, help="FILE.pth | FILE.safetensors | FILE (both)")
    a = p.parse_args(argv)
    for path in export_backbone(a.run, a.out):
        print(f"wrote {path}")
    return 0


def _eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastdino eval")
    p.add_argument("task", choices=["knn"])
    p.add_argument("--run", default=None, help="run or checkpoint dir (default: random init)")
    p.add_argument("--data", default=None, help="labelled folder (default: sklearn digits)")
    p.add_argument("--config", default=None, help="yaml preset of the run (model and crop size)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    import torch

    from fastdino.config import load_config
    from fastdino.data import digits_labelled_dir
    from fastdino.eval.knn import knn_probe
    from fastdino.export import teacher_backbone_state_dict
    from fastdino.models import build_backbone
    from fastdino.models.state_dict_io import load_backbone_state_dict

    cfg = load_config(a.config, a.overrides)
    torch.manual_seed(cfg.train.seed)  # random init = the trainer's init of the same config
    backbone = build_backbone(cfg.model)
    if a.run is not None:
        load_backbone_state_dict(backbone, teacher_backbone_state_dict(a.run))
    res = knn_probe(backbone, a.data or digits_labelled_dir(), cfg.crops.global_crops_size,
                    ks=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                    batch_size=cfg.eval.batch_size, mean=cfg.crops.mean, std=cfg.crops.std)
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("train", "export", "profile", "eval")
    if not argv or argv[0] not in commands:
        print(f"usage: fastdino {{{'|'.join(commands)}}} ...\n{__doc__}", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from fastdino.train import main as train_main

        return train_main(rest)
    if cmd == "export":
        return _export(rest)
    if cmd == "profile":
        from fastdino.profile import main as profile_main

        return profile_main(rest)
    return _eval(rest)


if __name__ == "__main__":
    sys.exit(main())
