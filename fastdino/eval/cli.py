"""`fastdino eval knn | linear | seg | depth | pca ...` (`fastdino eval` dispatches here).

    fastdino eval knn    --weights runs/smoke --data digits --image-size 64
    fastdino eval linear --weights vits16.pth --arch vit_small --data /imagenet_subset
    fastdino eval seg    --weights hf_dinov3_folder/ --data /ADEChallengeData2016 --crop 512
    fastdino eval depth  --weights runs/vitl16 --data /datasets/NYU    (official split lists)
    fastdino eval pca    --weights runs/smoke IMAGE... --out pca/

`--weights` is a training run / checkpoint folder, an exported .pth / .safetensors backbone, a
Hugging Face DINOv3ViTModel or timm DINOv3 folder, or `random` (fastdino.eval.weights). The
architecture comes from `--arch` or `--config` (preset name or yaml), else from the run's
config.yaml or the folder's config.json. Results print as a table and, with `--json FILE`, are
written as JSON. seg / depth read the standard benchmarks as downloaded (ADE20K, VOC 2012,
Cityscapes, NYU-v2), list files or plain folders, and take the benchmark's protocol (classes,
ADE20K's ignored id 0, NYU's depth scale and Eigen crop) unless a flag says otherwise
(fastdino.eval.dense_layouts).
Also runnable as `python -m fastdino.eval.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from fastdino.devices import parse_device

logger = logging.getLogger("fastdino.eval")


def default_workers() -> int:
    """Image decoding workers: 4, or one per core on smaller machines (more only contend, and
    torch warns that they may freeze the loader)."""
    return min(4, os.cpu_count() or 1)


WORKERS_HELP = "image decoding workers (default: 4, or the CPU cores when fewer)"


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, where there is one to show: not for required
    options, flags that are off, None (the help says what happens then) or a help text that
    already states its default (argparse.ArgumentDefaultsHelpFormatter prints all of those)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or default is None
                or default is False or default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _number(kind: type, least: float, strict: bool):
    """An argparse type: a `kind` > least (strict) or >= least; otherwise argparse's one-line
    usage error names the option and the value."""
    what = (f"{'an integer' if kind is int else 'a number'} {'>' if strict else '>='} "
            f"{least:g}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value >= least or (strict and value == least):  # (NaN fails the first)
            raise argparse.ArgumentTypeError(f"{text} is invalid: allowed is {what}")
        return value

    parse.__name__ = f"{kind.__name__}_{'gt' if strict else 'ge'}_{least:g}"
    return parse


positive_int = _number(int, 0, strict=True)
count = _number(int, 0, strict=False)  # >= 0 (workers)
positive_float = _number(float, 0, strict=True)

WHITE_LEVEL_HELP = ("16-bit images (greyscale PNG / TIFF, RGB TIFF): the value that maps to white, "
                    "e.g. 4095 "
                    "for 12-bit data (10/12/14-bit cameras, CT / X-ray, microscopy), higher "
                    "values white; an integer in 256..65535, as data.white_level. Default: the "
                    "training run's data.white_level when --weights is a run (or its snapshot "
                    "or export) that sets it, else 0..65535 maps to 0..255")


def white_level(text: str) -> int:
    """An argparse type: --white-level's integer in 256..65535 (argparse's one-line usage
    error otherwise)."""
    from fastdino.config import WHITE_LEVEL_ALLOWED, white_level_ok

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not white_level_ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is an integer in "
                                         f"256..65535, {WHITE_LEVEL_ALLOWED.split(': ', 1)[1]}")
    return value


def run_white_level(flag: int | None, run_config: Path | None,
                    config: str | None = None) -> int | None:
    """--white-level, else the data.white_level of the training run the weights came from
    (`run_config`, its saved config.yaml: WeightsInfo.run_config), else that of --config when
    it is a yaml file (an exported backbone evaluated with `--config <run>/config.yaml`: the
    export holds no config), else None."""
    if run_config is None and config is not None and Path(config).is_file():
        run_config = Path(config)
    if flag is not None or run_config is None:
        return flag
    import yaml

    from fastdino.data.datasets import check_white_level

    saved = yaml.safe_load(Path(run_config).read_text()) or {}
    value = (saved.get("data") or {}).get("white_level") if isinstance(saved, dict) else None
    check_white_level(value, f"{run_config}: data.white_level")
    if value is not None:
        logger.info("white level %d (16-bit images): the run's data.white_level, from %s",
                    value, run_config)
    return value


def _add_common(p: argparse.ArgumentParser, *, features: bool = True) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--weights", required=True,
                   help="training run/checkpoint folder, .pth/.safetensors backbone, Hugging Face "
                        "DINOv3ViTModel or timm DINOv3 folder, an official DINOv3 DCP checkpoint "
                        "(with --arch), or 'random'; a glob pattern (quoted) evaluates each match "
                        "with a summary table, e.g. 'runs/L/eval/training_*/"
                        "teacher_checkpoint.pth' (not pca)")
    g.add_argument("--arch", default=None,
                   help="factory name, e.g. vit_small, dinov2_vitb14 or convnext_tiny "
                        "(overrides --config)")
    g.add_argument("--config", default=None, help="preset name in configs/ or a yaml file")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="init seed for --weights random, and "
                   "the probes' seed")
    if features:
        f = p.add_argument_group("features")
        f.add_argument("--data", default=None, help="labelled folder: train/<class>/ + "
                       "val/<class>/, or <class>/ (with --split-file, or every 4th image is val); "
                       "'digits' = the embedded scikit-learn digits set (32 px, 10 classes)")
        f.add_argument("--train-data", default=None,
                       help="instead of --data: the training images as data.root takes them "
                            "(folders of class folders, tar shards with <key>.cls labels, "
                            "glob / brace patterns)")
        f.add_argument("--val-data", default=None, help="the validation images, as --train-data")
        f.add_argument("--split-file", default=None,
                       help="lines 'train <class>/<file>' or 'val <class>/<file>' under --data")
        f.add_argument("--image-size", type=positive_int, default=224,
                       help="centre crop (resize to 256/224 of it first); a multiple of the "
                            "backbone's patch size (16; 14 for the DINOv2 archs)")
        f.add_argument("--batch-size", type=positive_int, default=64,
                       help="images per feature-extraction batch")
        f.add_argument("--num-workers", type=count, default=default_workers(),
                       help=WORKERS_HELP)
        f.add_argument("--cache-dir", default=None,
                       help="feature cache (default $FASTDINO_CACHE/features); 'none' disables")
        f.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                       help="decode every JPEG in full (default: a large JPEG is decoded at 1/2, "
                            "1/4 or 1/8 of its size, down to the resize target: several times "
                            "faster, the features within a resampling's difference; as "
                            "data.jpeg_draft)")
    p.add_argument("--white-level", type=white_level, default=None, metavar="N",
                   help=WHITE_LEVEL_HELP)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_lists(p: argparse.ArgumentParser) -> None:
    """The dense probes' data lists and head checkpoints (seg, depth)."""
    for split in ("train", "val"):
        p.add_argument(f"--{split}-list", default=None, metavar="FILE",
                       help=f"{split} pairs, one 'image target' line each, paths relative to "
                            "--data (give both lists or neither)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="save the head to DIR/head.pt while it trains (and result.json at the "
                        "end); the same command resumes an interrupted fit, and re-evaluates a "
                        "finished one without training. With a --weights pattern: one "
                        "subfolder per match")
    p.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="head checkpoint period in iterations (with --output-dir)")


def _add_head_training(p: argparse.ArgumentParser, *, batch_size: int, lr: float,
                       official: str) -> None:
    """The training options of a dense probe's head (seg, depth)."""
    p.add_argument("--iterations", type=positive_int, default=2000,
                   help=f"training steps of the head (official {official})")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="training crops per step")
    p.add_argument("--lr", type=positive_float, default=lr, help="AdamW lr of the head")
    p.add_argument("--num-workers", type=count, default=default_workers(), help=WORKERS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdino eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fmt = HelpFormatter

    p = sub.add_parser("knn", help="weighted kNN on L2-normalised CLS (SPEC.md §6)",
                       formatter_class=fmt)
    _add_common(p)
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="neighbour counts: one result per k, each query voted on by its k "
                        "nearest training images (the default: the official protocol's)")
    p.add_argument("--temperature", type=float, default=0.07,
                   help="softmax temperature of the neighbours' weighted vote, as in the "
                        "official protocol")

    p = sub.add_parser("linear", help="linear probes (one per lr) on CLS + mean patch",
                       formatter_class=fmt)
    _add_common(p)
    p.add_argument("--lrs", type=positive_float, nargs="+", default=None,
                   help="base lrs (x batch/256); default the official 13, 1e-5 .. 0.1")
    p.add_argument("--iterations", type=positive_int, default=12500,
                   help="training steps of the probes (official: 10 x 1250)")
    p.add_argument("--probe-batch-size", type=positive_int, default=1024,
                   help="feature rows per training step of the probes; the lrs scale with it "
                        "(x batch/256). 1024 is the official global batch, 128 per GPU x the 8 "
                        "GPUs of its launcher (12,500 steps = 10 passes over ImageNet-1k)")
    p.add_argument("--n-last-blocks", type=positive_int, nargs="+", default=[1],
                   help="features: the CLS of the last N blocks concatenated (+ the patch mean, "
                        "--avgpool); several values: one grid point each, the best on val "
                        "reported. DINOv3's probe: 1; DINOv2's: 1 4 with --avgpool both")
    p.add_argument("--avgpool", choices=("on", "off", "both"), default="on",
                   help="append the last block's mean patch token to the features")
    p.add_argument("--augment", action="store_true",
                   help="train the heads on fresh random-resized-crop + flip views of the "
                        "training images in every pass, as the official probe (one feature "
                        "extraction per pass, for the whole --n-last-blocks x --avgpool grid, "
                        "instead of one cached centre crop)")

    p = sub.add_parser("seg", help="dense linear probe (BN + 1x1 conv), mIoU",
                       formatter_class=fmt)
    _add_common(p, features=False)
    p.add_argument("--data", required=True, help="ADE20K, Pascal VOC 2012 or Cityscapes as "
                   "downloaded, or a folder with images/ + masks/ (or train/ and val/ each "
                   "holding them); masks: integer PNGs, 255 = ignore (dense_layouts.py)")
    _add_lists(p)
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="default: the benchmark's (ADE20K 150, VOC 21, Cityscapes 19), else the "
                        "max mask id + 1")
    p.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="ignore mask id 0 and shift the others down by one (default: on for "
                        "ADE20K, off otherwise)")
    p.add_argument("--crop", type=positive_int, default=512,
                   help="training crop = sliding window, a multiple of the patch size")
    p.add_argument("--photometric", action=argparse.BooleanOptionalAction, default=True,
                   help="the official training augmentation's photometric distortion "
                        "(brightness, contrast, saturation, hue) of the training crops")
    _add_head_training(p, batch_size=16, lr=1e-3, official="ADE20k: 40000")

    p = sub.add_parser("depth", help="dense linear depth probe (BN + 1x1 conv to 256 bins), "
                       "RMSE / AbsRel / delta1", formatter_class=fmt)
    _add_common(p, features=False)
    p.add_argument("--data", required=True, help="NYU-v2 in the official DINOv3 / BTS layout "
                   "(nyu_train.txt + nyu_test.txt), or a folder with images/ + depth/ (or train/ "
                   "and val/ each holding them); depth: 16-bit PNGs or float .npy metres, 0 = "
                   "none (dense_layouts.py)")
    _add_lists(p)
    p.add_argument("--depth-scale", type=positive_float, default=None,
                   help="PNG value / scale = metres (NYU-v2 mm: 1000, KITTI: 256; default 1000)")
    p.add_argument("--crop", type=positive_int, nargs=2, default=[416, 544],
                   metavar=("H", "W"), help="training crop = sliding window, multiples of the "
                   "patch size (official NYU: 416 544)")
    _add_head_training(p, batch_size=8, lr=3e-4, official="NYU: 38400")
    p.add_argument("--no-flip-tta", action="store_true",
                   help="do not average with the flipped image's prediction")
    p.add_argument("--eigen-crop", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate inside the Eigen crop (480 x 640 NYU maps; default: on for the "
                        "NYU layout, off otherwise)")

    p = sub.add_parser("pca", help="3-component PCA of patch features -> RGB PNGs (SPEC.md §8)",
                       formatter_class=fmt)
    _add_common(p, features=False)
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resolution", type=positive_int, default=448,
                   help="image height, a multiple of the patch size (the width keeps the aspect "
                        "ratio)")
    p.add_argument("--shared", action="store_true", help="one PCA basis across all images")
    p.add_argument("--fg", choices=("threshold", "none"), default="threshold",
                   help="foreground = first component > --threshold, background black")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="with --fg threshold: a patch whose first component is above this is "
                        "foreground")
    p.add_argument("--color", choices=("sigmoid", "minmax"), default="sigmoid",
                   help="sigmoid(2 x whitened projection) as the official notebook, or min-max")
    p.add_argument("--norms", action="store_true",
                   help="also <stem>_norms.png + norms.json: token norms before the final norm, "
                        "high-norm (artifact) tokens in red")
    p.add_argument("--norm-factor", type=positive_float, default=2.0,
                   help="high-norm = above this x the image's median token norm")
    return parser


def _first_set(*values):
    """The user's flag, else the benchmark layout's protocol, else the default."""
    return next(v for v in values if v is not None)


def _cache_dir(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    if arg is not None:
        return Path(arg)
    from fastdino.data.sample_data import cache_dir
    return cache_dir() / "features"


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def expand_weights(spec: str) -> list[str]:
    """`--weights` with glob characters: every match, ordered by the last number in the path
    (iterations: training_2500 before training_12500); otherwise, or when the path exists as
    written (a folder named 'exp[1]' is not a pattern), [spec]."""
    import glob
    import re

    if spec == "random" or not any(ch in spec for ch in "*?["):
        return [spec]
    if Path(spec).expanduser().exists():  # an existing path is itself, not a pattern
        return [spec]
    matches = glob.glob(os.path.expanduser(spec))
    if not matches:
        raise SystemExit(f"--weights {spec!r} matches nothing")

    def order(path: str):
        numbers = re.findall(r"\d+", path)
        return (int(numbers[-1]) if numbers else -1, path)

    return sorted(matches, key=order)


_HEADLINE = {  # (label, value) of one evaluation, for the sweep's summary table
    "knn": lambda r, a: (f"kNN top1 k={a.k[0]}", f"{100 * r[f'k{a.k[0]}']['top1']:.2f}"),
    "linear": lambda r, a: ("linear top1 (best lr)", f"{100 * r['best']['top1']:.2f}"),
    "seg": lambda r, a: ("mIoU", f"{100 * r['miou']:.2f}"),
    "depth": lambda r, a: ("RMSE (m)", f"{r['rmse']:.4f}"),
}


def error_message(e: BaseException) -> str:
    """The one line of a user-input error: str() of the exception, except KeyError, whose str()
    is the repr of its argument (quotes, escaped newlines)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def main(argv: list[str] | None = None) -> int:
    """One evaluation, or with a --weights pattern (e.g. a run's teacher snapshots
    'runs/L/eval/training_*/teacher_checkpoint.pth') one per match, the same data and settings,
    and a summary table; --json then holds the list of results. A bad path, file or flag value
    (FileNotFoundError, ValueError, KeyError, a refused pickle) is one line on stderr and exit
    status 2, as argparse's usage errors."""
    import pickle

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _main(args)
    except (FileNotFoundError, ValueError, KeyError, pickle.UnpicklingError) as e:
        print(f"fastdino eval {args.cmd}: error: {error_message(e)}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    weights = expand_weights(args.weights)
    if len(weights) == 1:
        args.weights = weights[0]
        result = _evaluate(args)
    else:
        if args.cmd == "pca":
            raise SystemExit("eval pca takes one --weights (its images would overwrite each "
                             "other's): run it per checkpoint with its own --out")
        result, rows, listed = [], [], {}
        for k, w in enumerate(weights):  # a fresh copy each time: _evaluate fills some in
            one = {**vars(args), "weights": w}
            if getattr(args, "output_dir", None) is not None:  # one head per backbone
                one["output_dir"] = str(Path(args.output_dir) / f"{k:03d}_{Path(w).parent.name}")
            r = _evaluate(argparse.Namespace(**one), listed)
            result.append(r)
            label, value = _HEADLINE[args.cmd](r, args)
            rows.append((w, value))
        _print_table(f"{args.cmd} over {len(weights)} weights ({label})", rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _listed(listed: dict | None, fn, *fn_args):
    """fn(*fn_args) (a dataset listing), once per sweep: every weight of a --weights pattern is
    evaluated on the same data, listed (and checked) on the first."""
    if listed is None:
        return fn(*fn_args)
    key = (fn.__qualname__, fn_args)
    if key not in listed:
        listed[key] = fn(*fn_args)
    return listed[key]


class UsageExit(SystemExit):
    """A usage error as argparse's: the one line on stderr, exit status 2; str() is the line
    (a SystemExit carrying its message, as callers of main() catch it)."""

    def __init__(self, message: str):
        print(message, file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _features_label(best: dict) -> str:
    """", CLS of the last 4 blocks + patch mean" for a grid's winner; "" for the default."""
    if best.get("n_last_blocks", 1) == 1 and best.get("avgpool", True):
        return ""
    n = best["n_last_blocks"]
    return (f", CLS of the last {n} block{'s' if n > 1 else ''}"
            f"{' + patch mean' if best['avgpool'] else ''}")


def run_linear_probes(extractor, train, val, classes, args, cache, key, device) -> dict:
    """The linear probes of every feature set of the grid (--n-last-blocks x --avgpool), each
    with every lr; the result of the feature set with the best val top-1 (ties: the first, in
    the official order: fewer blocks first, without the patch mean first), its winner's
    feature set in "best", and with more than one set a "grid" summary."""
    from fastdino.eval.features import cached_features, drop_unreadable
    from fastdino.eval.linear import OFFICIAL_LRS, train_linear_probe_grid

    feats, y, ok = {}, {}, {}
    for name, samples in (("train", train), ("val", val)):
        got = cached_features(extractor, [p for p, _ in samples], cache, key)
        ok[name] = got.get("ok")  # (an image that cannot be decoded: left out)
        feats[name], y[name] = drop_unreadable(got, torch.tensor([lab for _, lab in samples]),
                                               f"the {name} images")
    train_paths = [p for p, _ in train]
    pools = {"on": (True,), "off": (False,), "both": (False, True)}[args.avgpool]
    grid = [(n, pool) for n in sorted(set(args.n_last_blocks)) for pool in pools]
    # --augment: one extraction per pass (not cached) for the whole grid; every feature set
    # is cut from its CLS of the last max(n) blocks + patch mean

    def train_views(q: int) -> dict:
        """Pass q's views, of the training images kept above (the rows of y["train"])."""
        v = dict(extractor.views(train_paths, args.seed, q))
        v.pop("ok", None)
        keep = ok["train"]
        return v if keep is None else {k: t[keep] for k, t in v.items()}

    views = train_views if args.augment else None
    results = train_linear_probe_grid(
        feats["train"], y["train"], feats["val"], y["val"], len(classes), grid,
        lrs=args.lrs or OFFICIAL_LRS, iterations=args.iterations,
        batch_size=args.probe_batch_size, seed=args.seed, device=device, classes=classes,
        train_views=views)
    n, pool = max(grid, key=lambda c: results[c]["best"]["top1"])
    res = dict(results[n, pool])
    res["best"] = {**res["best"], "n_last_blocks": n, "avgpool": pool}
    if len(grid) > 1:
        res["grid"] = {f"blocks {m}, patch mean {'on' if q else 'off'}":
                       {"best": results[m, q]["best"], "per_lr": results[m, q]["per_lr"]}
                       for m, q in grid}
    return res


def check_data_args(args: argparse.Namespace) -> None:
    """ValueError naming the flags when knn / linear get neither --data nor both --train-data
    and --val-data, both forms, or --split-file without --data (it would be ignored)."""
    sources = (args.train_data, args.val_data)
    if args.data is not None and sources != (None, None):
        raise ValueError("--data and --train-data / --val-data are exclusive: give either "
                         "--data, or both --train-data and --val-data")
    if args.data is None and None in sources:
        given = [f for f, v in (("--train-data", args.train_data),
                                ("--val-data", args.val_data)) if v is not None]
        raise ValueError(f"{' and '.join(given) or 'no data flag'} given: give either --data, "
                         "or both --train-data and --val-data")
    if args.split_file is not None and args.data is None:
        raise ValueError("--split-file lists the images of --data: it does not apply to "
                         "--train-data / --val-data")


def _evaluate(args: argparse.Namespace, listed: dict | None = None) -> dict:
    """One evaluation; `listed`: the dataset listings of a sweep's earlier weights (_listed)."""
    from fastdino.eval.weights import load_eval_backbone

    if args.cmd == "knn":  # a bad --k / --temperature before the backbone and the features
        from fastdino.eval.knn_protocol import check_knn_args
        check_knn_args(args.k, args.temperature)
    if args.cmd in ("knn", "linear"):  # the data flags too: one line, exit 2, nothing loaded
        try:
            check_data_args(args)
        except ValueError as e:
            raise UsageExit(f"fastdino eval {args.cmd}: error: {e}") from None
    try:  # a bad or absent device: one line, not a traceback from the first tensor move
        device = (parse_device(args.device) if args.device
                  else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise UsageExit(f"fastdino eval {args.cmd}: error: {e}") from None
    backbone, info = load_eval_backbone(args.weights, args.arch, args.config, device, args.seed)
    result: dict = {"command": args.cmd, "weights": info.source, "weights_digest": info.digest,
                    "arch": info.arch}
    progress = not args.quiet
    wl = run_white_level(args.white_level, info.run_config, args.config)
    if wl is not None:
        result["white_level"] = wl

    if args.cmd in ("knn", "linear"):
        from fastdino.data.datasets import white_level_key
        from fastdino.eval.features import BackboneExtractor
        from fastdino.eval.knn_protocol import labelled_splits

        if args.data == "digits":
            from fastdino.data.sample_data import digits_labelled_dir
            args.data = str(digits_labelled_dir())
        if args.data is not None:
            train, val, classes = _listed(listed, labelled_splits, args.data,
                                          args.split_file)
        else:
            from fastdino.eval.knn_protocol import labelled_sources
            train, val, classes = _listed(listed, labelled_sources, args.train_data,
                                          args.val_data)
            args.data = f"{args.train_data} + {args.val_data}"
        extractor = BackboneExtractor(backbone, args.image_size, args.batch_size,
                                      args.num_workers, progress, white_level=wl,
                                      jpeg_draft=args.jpeg_draft)
        key = {"weights": info.digest, "arch": info.arch, "image_size": args.image_size}
        key.update(white_level_key(wl))  # other pixels, other features
        n_blocks = max(getattr(args, "n_last_blocks", [1]))
        if n_blocks > 1:  # the features then hold more (and a cache of n = 1 stays valid)
            extractor.n_last_blocks = key["n_last_blocks"] = n_blocks
        cache = _cache_dir(args.cache_dir)
        result.update(data=str(args.data), image_size=args.image_size, classes=classes)
        if args.cmd == "knn":
            from fastdino.eval.knn_protocol import knn_eval
            res = knn_eval(extractor, train, val, ks=args.k, temperature=args.temperature,
                           cache_dir=cache, cache_key=key, n_classes=len(classes),
                           device=device)
            result.update(res)
            rows = [(f"k={k} (used {res[f'k{k}']['k_used']})",
                     f"top1 {100 * res[f'k{k}']['top1']:6.2f}  top5 "
                     f"{100 * res[f'k{k}']['top5']:6.2f}") for k in args.k]
            _print_table(f"kNN (T={args.temperature}) on {args.data}: {len(train)} train, "
                         f"{len(val)} val, {len(classes)} classes, chance "
                         f"{100 / len(classes):.1f}%", rows)
        else:
            res = run_linear_probes(extractor, train, val, classes, args, cache, key, device)
            result.update(res)
            rows = [(f"lr {lr:g}", f"top1 {100 * a:6.2f}") for lr, a in res["per_lr"].items()]
            rows += [(f"{name} (its best lr)", f"top1 {100 * g['best']['top1']:6.2f}")
                     for name, g in res.get("grid", {}).items()]
            best = res["best"]
            rows.append(("best", f"lr {best['lr']:g}{_features_label(best)}: top1 "
                                 f"{100 * best['top1']:.2f} (train "
                                 f"{100 * best['train_top1']:.2f})"))
            rows += [(f"confused {c['true']} -> {c['pred']}",
                      f"{c['count']} ({100 * c['frac_of_true']:.1f}% of {c['true']})")
                     for c in res["confused"]]
            views = "random-resized-crop + flip views" if args.augment else "centre crops"
            _print_table(f"linear probe on {args.data}: {len(train)} train ({views}), "
                         f"{len(val)} val", rows)
    elif args.cmd == "seg":
        from fastdino.eval.dense_layouts import seg_data
        from fastdino.eval.seg import seg_eval
        data = _listed(listed, seg_data, args.data, args.train_list, args.val_list)
        train, val = data.train, data.val
        reduce_zero = _first_set(args.reduce_zero_label, data.reduce_zero_label, False)
        res = seg_eval(backbone, train, val, n_classes=args.num_classes or data.n_classes,
                       crop=args.crop, iterations=args.iterations, batch_size=args.batch_size,
                       lr=args.lr, num_workers=args.num_workers, seed=args.seed,
                       reduce_zero_label=reduce_zero, photometric=args.photometric,
                       progress=progress,
                       output_dir=args.output_dir, checkpoint_every=args.checkpoint_every,
                       weights_digest=info.digest, white_level=wl)
        result.update(res, layout=data.layout)
        rows = [("mIoU", f"{100 * res['miou']:.2f}"),
                ("pixel acc", f"{100 * res['pixel_acc']:.2f}")]
        rows += [(f"IoU class {i}", "-" if v is None else f"{100 * v:.2f}")
                 for i, v in enumerate(res["iou"])]
        _print_table(f"linear seg on {args.data} ({data.layout}): {len(train)} train, "
                     f"{len(val)} val, window {res['window']} stride {res['stride']}", rows)
    elif args.cmd == "depth":
        from fastdino.eval.dense_layouts import depth_data
        from fastdino.eval.depth import depth_eval
        data = _listed(listed, depth_data, args.data, args.train_list, args.val_list)
        train, val = data.train, data.val
        res = depth_eval(backbone, train, val, crop=args.crop, iterations=args.iterations,
                         batch_size=args.batch_size, lr=args.lr,
                         depth_scale=_first_set(args.depth_scale, data.depth_scale, 1000.0),
                         num_workers=args.num_workers, seed=args.seed,
                         flip_tta=not args.no_flip_tta,
                         eigen_crop=_first_set(args.eigen_crop, data.eigen_crop, False),
                         progress=progress, output_dir=args.output_dir,
                         checkpoint_every=args.checkpoint_every, weights_digest=info.digest,
                         white_level=wl)
        result.update(res, layout=data.layout)
        rows = [("RMSE (m)", f"{res['rmse']:.4f}"), ("AbsRel", f"{res['abs_rel']:.4f}"),
                ("log10", f"{res['log10']:.4f}")]
        rows += [(f"delta{i}", f"{100 * res[f'delta{i}']:.2f}") for i in (1, 2, 3)]
        _print_table(f"linear depth on {args.data} ({data.layout}): {len(train)} train, "
                     f"{res['n_val']} val, window {res['window']} stride {res['stride']}", rows)
    else:
        from fastdino.eval.pca import write_pca_images
        files = write_pca_images(backbone, args.images, args.out, resolution=args.resolution,
                                 shared=args.shared, fg=args.fg, threshold=args.threshold,
                                 color=args.color, norms=args.norms,
                                 norm_factor=args.norm_factor, white_level=wl)
        result.update(files=[str(f) for f in files], color=args.color, fg=args.fg)
        print("\n".join(str(f) for f in files))
    if getattr(args, "output_dir", None) is not None:  # seg / depth: beside the head
        (Path(args.output_dir) / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
