"""`fastdino train|export|profile|eval|curate|health ...` (the console script of pyproject.toml).

    fastdino train --config configs/smoke.yaml data.root=/imgs     (= python fastdino/train.py)
    fastdino export --run runs/smoke --out teacher.safetensors [--format hf|timm | --with-heads]
    fastdino profile --config configs/vits16.yaml [--steps 20] [k=v ...] (fastdino/profile.py)
    fastdino eval knn|linear|seg|depth|pca --weights W --data DIR ... (fastdino/eval/cli.py)
    fastdino curate embed|cluster|sample|dedup|retrieve|contamination ... (fastdino/curation/cli.py)
    fastdino health runs/smoke            (collapse, uniform targets, stalls: fastdino/health.py)
Multi-GPU training goes through the DeepSpeed launcher: `deepspeed --num_gpus N fastdino/train.py`.
`fastdino <command> --help` describes each command's options.
"""

from __future__ import annotations

import argparse
import sys


def _export(argv: list[str]) -> int:
    from fastdino import export

    p = argparse.ArgumentParser(prog="fastdino export", description=export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir (its latest checkpoint) or checkpoint dir")
    p.add_argument("--out", required=True, help="official: FILE.pth | FILE.pt | "
                   "FILE.safetensors | FILE (both, the suffixes appended: model.v1 -> "
                   "model.v1.pth + model.v1.safetensors) | DIR/ or an existing folder "
                   "(teacher_backbone.pth + .safetensors inside); .bin, .ckpt and other weight "
                   "suffixes are refused; --with-heads: FILE.pth; --format hf / timm: a folder")
    p.add_argument("--format", choices=("official", "hf", "timm"), default="official",
                   help="official DINOv3 backbone keys (the default), a Hugging Face "
                   "DINOv3ViTModel folder, or a timm folder (timm.create_model('local-dir:OUT', "
                   "pretrained=True))")
    p.add_argument("--with-heads", action="store_true",
                   help="the whole teacher (backbone + DINO / iBOT heads) in one .pth")
    p.add_argument("--config", default=None,
                   help="--format hf / timm: the architecture (a preset name or a yaml) when "
                        "--run has no config.yaml beside it (an official DINOv3 checkpoint)")
    a = p.parse_args(argv)
    if a.with_heads and a.format != "official":
        p.error(f"--with-heads writes fastdino's own file; --format {a.format} folders hold the "
                "backbone only")
    converted = {"hf": export.export_hf, "timm": export.export_timm}
    try:
        if a.format in converted:
            paths = converted[a.format](a.run, a.out, config=a.config)
        else:
            paths = (export.export_with_heads if a.with_heads else export.export_backbone)(
                a.run, a.out)
    except (FileNotFoundError, ValueError, KeyError) as e:  # a bad --run / --out: no traceback
        from fastdino.eval.cli import error_message

        p.error(error_message(e))  # a KeyError's message, not the repr of it
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("train", "export", "profile", "eval", "curate", "health")
    usage = f"usage: fastdino {{{'|'.join(commands)}}} ...\n{__doc__}"
    if argv[:1] in (["-h"], ["--help"]):  # asked for: stdout, success
        print(usage, end="")
        return 0
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"fastdino {version('fastdino')}")
        except PackageNotFoundError:  # a source tree that was not installed
            print("fastdino (not installed: no version)")
        return 0
    if not argv or argv[0] not in commands:
        what = f"unknown command {argv[0]!r}; " if argv else ""
        print(f"{usage}fastdino: error: {what}give one of {', '.join(commands)}",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from fastdino.train import main as train_main

        return train_main(rest, prog="fastdino train")  # its usage line names the command
    if cmd == "export":
        return _export(rest)
    if cmd == "profile":
        from fastdino.profile import main as profile_main

        return profile_main(rest)
    if cmd == "health":
        from fastdino.health import main as health_main

        return health_main(rest)
    if cmd == "eval":
        from fastdino.eval.cli import main as eval_main

        return eval_main(rest)
    from fastdino.curation.cli import main as curate_main

    return curate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
