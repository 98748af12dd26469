"""`fastdino curate embed | cluster | sample` (SPEC.md §5: curation by hierarchical k-means and
balanced sampling). Also runnable as `python -m fastdino.curation.cli ...`.

    fastdino curate embed   --data /imgs --weights runs/smoke --out E
    fastdino curate cluster E --levels 3 --clusters 100,20,5 --out C
    fastdino curate sample  C --n 5000 --out curated.txt
    fastdino train --config ... data.file_list=curated.txt

embed: CLS embeddings (L2-normalised, fp16 memory map), resumable (rerun the same command).
cluster: hierarchical k-means with k-means++ init, Lloyd iterations and resampling steps, streamed
  in chunks from the memory map; GPU when present (the fused Triton assignment kernel), CPU
  otherwise; several GPUs with `torchrun --nproc_per_node G -m fastdino.curation.cli cluster ...`.
sample: balanced hierarchical sampling (water-filling cap per cluster at every level); writes the
  file list and prints the cluster sizes before and after (also <LIST>.summary.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("fastdino.curation")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _embed(a: argparse.Namespace) -> int:
    from fastdino.curation.embed import embed_folder
    from fastdino.eval.weights import load_eval_backbone

    device = _device(a.device)
    backbone, info = load_eval_backbone(a.weights, arch=a.arch, config=a.config, device=device,
                                        seed=a.seed)
    path = embed_folder(a.data, backbone, a.out, key={"weights": info.digest, "arch": info.arch},
                        image_size=a.image_size, batch_size=a.batch_size,
                        num_workers=a.num_workers, progress=not a.quiet)
    print(f"wrote {path} ({info.source})")
    return 0


def _per_level(values: list[int] | None, n_levels: int, name: str) -> list[int] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * n_levels
    if len(values) != n_levels:
        raise SystemExit(f"{name} needs 1 or {n_levels} values (one per level), got {values}")
    return values


def _init_distributed(device: torch.device) -> bool:
    """torch.distributed from torchrun's environment (WORLD_SIZE > 1); False on one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as tdist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _cluster(a: argparse.Namespace) -> int:
    from fastdino import dist
    from fastdino.curation.embed import EMBEDDINGS, PROGRESS
    from fastdino.curation.hierarchical import (
        default_sample_sizes,
        hierarchical_kmeans,
        leaf_sizes,
        save_levels,
    )
    from fastdino.curation.rows import Rows

    if a.levels is not None and a.levels != len(a.clusters):
        raise SystemExit(f"--levels {a.levels} but --clusters has {len(a.clusters)} values")
    n_levels = len(a.clusters)
    emb_dir = Path(a.embeddings)
    state = emb_dir / PROGRESS
    if state.is_file() and not json.loads(state.read_text()).get("complete", False):
        raise SystemExit(f"{emb_dir} is not fully embedded yet: rerun `fastdino curate embed` "
                         "with the same arguments to finish it")
    emb = np.load(emb_dir / EMBEDDINGS, mmap_mode="r")  # [N, D] fp16, streamed in chunks
    device = _device(a.device)
    distributed = _init_distributed(device)
    try:
        rows = Rows(emb, device, chunk_rows=a.chunk_rows)
        steps = _per_level(a.resampling_steps, n_levels, "--resampling-steps")
        sizes = (_per_level(a.sample_size, n_levels, "--sample-size")
                 or default_sample_sizes(rows.n, a.clusters))
        levels = hierarchical_kmeans(rows, a.clusters, steps, sizes, np.random.default_rng(a.seed),
                                     n_iters=a.iters, strategy=a.strategy, impl=a.impl)
        if dist.is_main_process():
            meta = {"embeddings": str(emb_dir.resolve()), "n": rows.n, "dim": rows.dim,
                    "resampling_steps": steps, "sample_sizes": sizes, "iters": a.iters,
                    "strategy": a.strategy, "seed": a.seed, "world_size": dist.get_world_size()}
            save_levels(levels, a.out, meta)
            for i, s in enumerate(leaf_sizes(levels), 1):
                print(f"level {i}: {len(s)} clusters, sizes min {s.min()} median "
                      f"{np.median(s):.0f} max {s.max()}")
            print(f"wrote {a.out}")
        dist.barrier()  # no rank tears the group down while another has a pending op
    finally:
        if distributed:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0


def _sample(a: argparse.Namespace) -> int:
    from fastdino.curation.embed import read_files
    from fastdino.curation.hierarchical import load_levels
    from fastdino.curation.sampling import format_summary, hierarchical_sample, size_summary

    levels, meta = load_levels(a.clusters_dir)
    files = read_files(meta["embeddings"])
    picked = hierarchical_sample(levels, a.n, np.random.default_rng(a.seed), a.strategy)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(files[i] + "\n" for i in picked))
    summary = size_summary(levels, picked)
    Path(f"{out}.summary.json").write_text(json.dumps(
        {"n": int(len(picked)), "requested": a.n, "strategy": a.strategy, "seed": a.seed,
         "levels": summary}, indent=2))
    print(format_summary(summary))
    print(f"wrote {out} ({len(picked)} images; train with data.file_list={out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="fastdino curate", description=__doc__.split("\n\n")[0],
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("embed", help="CLS embeddings of every image (resumable)",
                       formatter_class=fmt)
    p.add_argument("--data", required=True,
                   help="image folder (recursive, with the images in its .tar shards), a tar "
                        "shard, or a glob / brace pattern of them (as data.root)")
    p.add_argument("--weights", required=True,
                   help="training run/checkpoint folder, .pth/.safetensors backbone, Hugging Face "
                        "DINOv3ViTModel folder, or 'random'")
    p.add_argument("--arch", default=None, help="factory name, e.g. vit_small")
    p.add_argument("--config", default=None, help="preset name in configs/ or a yaml file")
    p.add_argument("--out", required=True, help="output folder E")
    p.add_argument("--image-size", type=int, default=224, help="centre crop, a multiple of 16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="init seed for --weights random")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("cluster", help="hierarchical k-means with resampling steps",
                       formatter_class=fmt)
    p.add_argument("embeddings", help="folder E written by `curate embed`")
    p.add_argument("--clusters", type=_ints, required=True,
                   help="clusters per level, bottom to top, e.g. 100,20,5")
    p.add_argument("--levels", type=int, default=None, help="number of levels (checks --clusters)")
    p.add_argument("--resampling-steps", type=_ints, default=[10],
                   help="resampling steps per level (one value: every level)")
    p.add_argument("--sample-size", type=_ints, default=None,
                   help="points per cluster in a resampling step, per level (default: half the "
                        "average cluster size; <= 1: no resampling)")
    p.add_argument("--iters", type=int, default=50, help="Lloyd iterations per k-means")
    p.add_argument("--strategy", choices=["c", "r"], default="c",
                   help="resampling: c = closest to the centroid, r = random")
    p.add_argument("--impl", choices=["auto", "triton", "torch"], default="auto",
                   help="assignment kernel: auto = Triton on CUDA")
    p.add_argument("--chunk-rows", type=int, default=1 << 16,
                   help="embeddings read per chunk when they do not fit in memory")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder C")

    p = sub.add_parser("sample", help="balanced hierarchical sampling -> file list",
                       formatter_class=fmt)
    p.add_argument("clusters_dir", metavar="C", help="folder C written by `curate cluster`")
    p.add_argument("--n", type=int, required=True, help="number of images to select")
    p.add_argument("--strategy", choices=["c", "r"], default="r",
                   help="inside a level-1 cluster: c = closest to the centroid, r = random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="file list to write (data.file_list)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return {"embed": _embed, "cluster": _cluster, "sample": _sample}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
