"""`fastdino curate embed | cluster | sample | dedup | retrieve | contamination` (SPEC.md §5:
curation by hierarchical k-means and balanced sampling, near-duplicate removal, retrieval around
seed images, an eval-set contamination check). Also runnable as `python -m fastdino.curation.cli`.

    fastdino curate embed   --data /imgs --weights runs/smoke --out E
    fastdino curate cluster E --levels 3 --clusters 100,20,5 --out C
    fastdino curate sample  C --n 5000 --out curated.txt
    fastdino train --config ... data.file_list=curated.txt
    fastdino curate dedup E --threshold 0.95 --out unique.txt
    fastdino curate retrieve E --seeds E_seed --k 4 --out retrieved.txt
    fastdino curate contamination E --eval E_val --out hits.tsv --clean clean.txt

embed: CLS embeddings (L2-normalised, fp16 memory map), resumable (rerun the same command).
cluster: hierarchical k-means with k-means++ init, Lloyd iterations and resampling steps, streamed
  in chunks from the memory map; GPU when present (the fused Triton assignment kernel), CPU
  otherwise; several GPUs with `torchrun --nproc_per_node G -m fastdino.curation.cli cluster ...`.
  Resumable: each finished level, and every few minutes the k-means within a level, is saved in
  --out; the same command continues a killed run (to the uninterrupted result), other arguments
  or embeddings are refused (--overwrite starts over).
sample: balanced hierarchical sampling (water-filling cap per cluster at every level); writes the
  file list and prints the cluster sizes before and after (also <LIST>.summary.json).
dedup / retrieve / contamination: exact cosine nearest neighbours of the embeddings, streamed in
  blocks (fastdino/curation/neighbours.py); the two-set commands refuse embeddings made with
  other weights, image size or white level.
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

from fastdino.devices import parse_device
from fastdino.eval.cli import (
    WHITE_LEVEL_HELP,
    HelpFormatter,
    count,
    error_message,
    positive_int,
    run_white_level,
    white_level,
)

logger = logging.getLogger("fastdino.curation")


def _ints(text: str, least: int | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if not values or (least is not None and min(values) < least):
        at_least = "" if least is None else f" >= {least}"
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is a comma list of "
                                         f"integers{at_least}")
    return values


def _positive_ints(text: str) -> list[int]:  # --clusters (0 divided by zero further on)
    return _ints(text, 1)


def _counts(text: str) -> list[int]:  # --resampling-steps (a negative one was run as 0)
    return _ints(text, 0)


def _cosine(text: str) -> float:
    """A cosine similarity threshold in [-1, 1] (above 1 nothing could ever match)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not -1.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed is a cosine similarity "
                                         "in [-1, 1]")
    return v


def _device(name: str | None) -> torch.device:
    if name:  # a bad or absent device was a RuntimeError / AssertionError traceback
        return parse_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _embed(a: argparse.Namespace) -> int:
    from fastdino.curation.embed import check_image_size, embed_folder
    from fastdino.eval.weights import load_eval_backbone

    device = _device(a.device)
    backbone, info = load_eval_backbone(a.weights, arch=a.arch, config=a.config, device=device,
                                        seed=a.seed)
    try:
        check_image_size(a.image_size, int(backbone.patch_size), what="--image-size")
    except ValueError as e:
        raise ValueError(f"{e} ({info.arch})") from None
    path = embed_folder(a.data, backbone, a.out, key={"weights": info.digest, "arch": info.arch},
                        image_size=a.image_size, batch_size=a.batch_size,
                        num_workers=a.num_workers, progress=not a.quiet, patches=a.patches,
                        white_level=run_white_level(a.white_level, info.run_config, a.config),
                        jpeg_draft=a.jpeg_draft)
    print(f"wrote {path} ({info.source})")
    return 0


def _per_level(values: list[int] | None, n_levels: int, name: str) -> list[int] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name} needs 1 or {n_levels} values (one per level), got {values}")
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
        ClusterStore,
        check_levels,
        default_sample_sizes,
        hierarchical_kmeans,
        leaf_sizes,
        write_meta,
    )
    from fastdino.curation.rows import Rows
    from fastdino.kernels._utils import can_run_triton
    from fastdino.layers.select import why_triton_cannot_run

    if a.levels is not None and a.levels != len(a.clusters):
        raise ValueError(f"--levels {a.levels} but --clusters has {len(a.clusters)} values")
    n_levels = len(a.clusters)
    steps = _per_level(a.resampling_steps, n_levels, "--resampling-steps")
    emb_dir = Path(a.embeddings)
    if not (emb_dir / EMBEDDINGS).is_file():
        raise FileNotFoundError(f"{emb_dir} is not a `fastdino curate embed` folder (no "
                                f"{EMBEDDINGS})")
    state = emb_dir / PROGRESS
    embedded = json.loads(state.read_text()) if state.is_file() else {}
    if not embedded.get("complete", True):
        raise ValueError(f"{emb_dir} is not fully embedded yet: rerun `fastdino curate embed` "
                         "with the same arguments to finish it")
    emb = np.load(emb_dir / EMBEDDINGS, mmap_mode="r")  # [N, D] fp16, streamed in chunks
    device = _device(a.device)
    if a.impl == "triton" and not can_run_triton(torch.empty(0, device=device)):
        raise ValueError(f"--impl triton cannot run here: {why_triton_cannot_run(device)}; "
                         "allowed here is --impl auto | torch")
    distributed = _init_distributed(device)
    store = None
    try:
        rows = Rows(emb, device, chunk_rows=a.chunk_rows)
        sizes = (_per_level(a.sample_size, n_levels, "--sample-size")
                 or default_sample_sizes(rows.n_finite(), a.clusters))
        # every argument checked before --out is touched (a refused --clusters left an empty
        # --out folder behind)
        check_levels(a.clusters, steps, sizes, rows.n_finite(), rows.n)
        # what the progress in --out must have been made with to be continued
        key = {"n": rows.n, "dim": rows.dim, "embedded_with": embedded.get("key"),
               "content": _content_digest(emb_dir), "clusters": a.clusters,
               "resampling_steps": steps, "sample_sizes": sizes, "iters": a.iters,
               "strategy": a.strategy, "seed": a.seed}
        where = str(emb_dir.resolve())
        store = _agreed(ClusterStore.open, a.out, key, a.overwrite, dist.is_main_process(),
                        where)
        said = store.describe()
        if said and dist.is_main_process():
            print(said, flush=True)
        levels = hierarchical_kmeans(rows, a.clusters, steps, sizes, np.random.default_rng(a.seed),
                                     n_iters=a.iters, strategy=a.strategy, impl=a.impl,
                                     store=store)
        if dist.is_main_process():
            meta = {"embeddings": where, "files": _content_digest(emb_dir, ("files.txt",)),
                    "n": rows.n, "dim": rows.dim,
                    "resampling_steps": steps, "sample_sizes": sizes, "iters": a.iters,
                    "strategy": a.strategy, "seed": a.seed, "world_size": dist.get_world_size()}
            write_meta(levels, a.out, meta)
            for i, s in enumerate(leaf_sizes(levels), 1):
                print(f"level {i}: {len(s)} clusters, sizes min {s.min()} median "
                      f"{np.median(s):.0f} max {s.max()}")
            print(f"wrote {a.out}")
        dist.barrier()  # no rank tears the group down while another has a pending op
    finally:
        if store is not None:
            store.close()
        if distributed:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0


def _content_digest(folder: Path, names: tuple[str, ...] = ("embeddings.npy", "files.txt"),
                    block: int = 1 << 20) -> str:
    """What identifies an embeddings folder's content, read in O(1): the size and the first,
    middle and last MiB of embeddings.npy and files.txt (re-embedded with other images or
    weights, they differ; a folder moved elsewhere keeps it)."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        h.update(f"{name} {size}".encode())
        with open(path, "rb") as f:
            for at in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
                f.seek(at)
                h.update(f.read(block))
    return h.hexdigest()[:16]


def _agreed(open_store, *args):
    """open_store(*args) on every rank, and the ranks agree on where they continue (under
    torchrun, a rank that saw another --out, e.g. a folder that is not shared, would wait for
    the others forever); an error on one rank is raised on every rank."""
    from fastdino import dist

    try:
        store, error = open_store(*args), None
        pos = [1.0, *map(float, store.position())]
    except Exception as e:  # (any: raised on one rank alone, the others waited forever)
        store, error, pos = None, e, [0.0, 0.0, 0.0, 0.0]
    if dist.get_world_size() > 1:
        x = torch.tensor(pos, dtype=torch.float64)
        sums = dist.all_reduce_sum(torch.stack([x, x * x]).to(_collective_device()))
        world = dist.get_world_size()
        if error is None and not torch.equal(sums[0].cpu() ** 2, world * sums[1].cpu()):
            error = ValueError(f"--out {args[0]}: the ranks found different progress in it: "
                               "give a folder every rank sees (a shared file system)")
    if error is not None:
        raise error
    return store


def _collective_device() -> torch.device:
    import torch.distributed as tdist

    return torch.device("cuda") if tdist.get_backend() == "nccl" else torch.device("cpu")


def _sample(a: argparse.Namespace) -> int:
    from fastdino.curation.embed import read_files, write_names
    from fastdino.curation.hierarchical import load_levels
    from fastdino.curation.sampling import format_summary, hierarchical_sample, size_summary

    levels, meta = load_levels(a.clusters_dir)
    # the image names come from the embeddings folder the clusters were made of: moved, it
    # gave a bare "No such file" on files.txt; re-embedded with other images, it named the
    # picked rows after the wrong images
    emb = Path(meta["embeddings"])
    if not (emb / "files.txt").is_file():
        raise FileNotFoundError(f"{a.clusters_dir} was clustered from {emb}, which holds no "
                                "files.txt (moved or deleted?): rerun `fastdino curate "
                                "cluster` on the embeddings folder")
    files = read_files(emb)
    if len(files) != meta["n"] or len(files) != len(levels[0].assignment):
        raise ValueError(f"{emb} now lists {len(files)} images but {a.clusters_dir} clustered "
                         f"{meta['n']} (re-embedded since?): rerun `fastdino curate cluster`")
    # as many other images: the picked rows were named after them (no digest: clustered before
    # it was recorded)
    if meta.get("files", None) not in (None, _content_digest(emb, ("files.txt",))):
        raise ValueError(f"{emb} lists other images than when {a.clusters_dir} was clustered "
                         "(re-embedded since?): rerun `fastdino curate cluster`")
    _writable(a.out)
    picked = hierarchical_sample(levels, a.n, np.random.default_rng(a.seed), a.strategy)
    out = Path(a.out)
    write_names(out, (files[i] for i in picked))
    summary = size_summary(levels, picked)
    Path(f"{out}.summary.json").write_text(json.dumps(
        {"n": int(len(picked)), "requested": a.n, "strategy": a.strategy, "seed": a.seed,
         "levels": summary}, indent=2))
    print(format_summary(summary))
    if len(picked) < a.n:  # said, not only visible in the counts
        print(f"--n {a.n} is more than the {len(picked)} clustered images: all of them taken")
    print(f"wrote {out} ({len(picked)} images; train with data.file_list={out})")
    return 0


def _embeddings(folder: str) -> tuple[np.ndarray, list[str], dict]:
    """(memory-mapped [N, D] embeddings, image names, the embedding key) of a complete
    `curate embed` folder."""
    from fastdino.curation.embed import EMBEDDINGS, PROGRESS, read_files

    d = Path(folder)
    state_file = d / PROGRESS
    if not state_file.is_file():
        raise FileNotFoundError(f"{d} is not a `fastdino curate embed` folder (no {PROGRESS})")
    state = json.loads(state_file.read_text())
    if not state.get("complete", False):
        raise ValueError(f"{d} is not fully embedded yet: rerun `fastdino curate embed` with the "
                         "same arguments to finish it")
    emb = np.load(d / EMBEDDINGS, mmap_mode="r")
    if len(emb) == 0:  # (a search over nothing "found" nothing and wrote empty lists)
        raise ValueError(f"{d} holds no embeddings (0 images): embed a folder of images")
    return emb, read_files(d), state["key"]


def _two_sets(first: str, second: str) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Two `curate embed` folders, comparable only from the same weights and image size."""
    x, x_files, a = _embeddings(first)
    y, y_files, b = _embeddings(second)
    fields = ("weights", "arch", "image_size")
    if any(a.get(f) != b.get(f) for f in fields):
        raise ValueError(f"{first} and {second} were embedded with other weights or image "
                         f"size ({ {f: a.get(f) for f in fields} } vs "
                         f"{ {f: b.get(f) for f in fields} }): embed both with the same --weights "
                         "and --image-size")
    # 16-bit images scaled from another white are other pixels (missing: folders embedded before
    # the white level was recorded, which was then the default, none)
    wa, wb = a.get("white_level"), b.get("white_level")
    if wa != wb:
        raise ValueError(f"{first} was embedded with --white-level {_white(wa)} but {second} with "
                         f"--white-level {_white(wb)}: embed both with the same --white-level")
    return x, x_files, y, y_files


def _white(level: int | None) -> str:
    return "none (the default: 16-bit images scaled from 0..65535)" if level is None else str(level)


def _writable(*paths: str | None) -> None:
    """Output files' folders made, and none of them a folder, before a search that may take
    hours (a bad --out failed only when the results were written)."""
    for path in filter(None, paths):
        # (Path drops a trailing slash: `--out lists/` wrote a file named `lists`)
        if str(path).endswith(("/", os.sep)):
            raise IsADirectoryError(f"{path} names a folder: give a file name")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give a file name")


def _write_lines(path: str, lines: list[str]) -> Path:
    from fastdino.curation.embed import write_names

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_names(out, lines)  # (image names: surrogateescape, as files.txt)
    return out


def _write_file_list(path: str, names: list[str], suffix: str, side: list[str],
                     summary: str) -> None:
    """The training file list `path`, a TSV beside it (`<path><suffix>`) and the report."""
    out = _write_lines(path, names)
    _write_lines(f"{out}{suffix}", side)
    print(summary.format(side=f"{out}{suffix}"))
    print(f"wrote {out} (train with data.file_list={out})")


def _dedup(a: argparse.Namespace) -> int:
    from fastdino.curation.neighbours import deduplicate

    emb, files, _ = _embeddings(a.embeddings)
    _writable(a.out)
    keep, dup_of = deduplicate(emb, a.threshold, k=a.k, device=_device(a.device),
                               chunk=a.chunk_rows, progress=not a.quiet)
    removed = np.nonzero(dup_of >= 0)[0]
    broken = int((~keep & (dup_of < 0)).sum())
    _write_file_list(a.out, [files[i] for i in np.nonzero(keep)[0]], ".removed.tsv",
                     [f"{files[i]}\t{files[dup_of[i]]}" for i in removed],
                     f"{len(files)} images: kept {int(keep.sum())}, removed {len(removed)} "
                     f"near-duplicates (cosine >= {a.threshold}; {{side}}), {broken} without "
                     "an embedding")
    return 0


def _retrieve(a: argparse.Namespace) -> int:
    from fastdino.curation.neighbours import retrieve

    pool, files, seeds, _ = _two_sets(a.embeddings, a.seeds)
    _writable(a.out)
    picked, sims = retrieve(pool, seeds, a.k, a.threshold, device=_device(a.device),
                            chunk=a.chunk_rows, progress=not a.quiet)
    if len(picked) == 0:  # (an empty training list was written as if all were well)
        if a.threshold is None:  # (only rows without an embedding find nothing)
            raise ValueError(f"no pool image found near the {len(seeds)} seeds: the seeds' or "
                             "the pool's images are all unreadable (no embeddings); no list "
                             "written")
        raise ValueError(f"--threshold {a.threshold}: none of the {len(seeds)} seeds' {a.k} "
                         "nearest pool images is that similar: no list written (lower "
                         "--threshold)")
    _write_file_list(a.out, [files[i] for i in picked], ".tsv",
                     [f"{files[i]}\t{s:.4f}" for i, s in zip(picked, sims, strict=True)],
                     f"{len(seeds)} seeds x {a.k} neighbours -> {len(picked)} of {len(files)} "
                     "pool images (similarities in {side})")
    return 0


def _contamination(a: argparse.Namespace) -> int:
    from fastdino.curation.neighbours import contamination, finite_rows

    train, files, evaluation, eval_files = _two_sets(a.embeddings, a.eval)
    _writable(a.out, a.clean)
    hits = contamination(train, evaluation, a.threshold, device=_device(a.device),
                         chunk=a.chunk_rows, progress=not a.quiet)
    out = _write_lines(a.out, [f"{files[t]}\t{eval_files[e]}\t{s:.4f}" for t, e, s in hits])
    print(f"{len(hits)} of {len(files)} training images near-duplicate one of {len(eval_files)} "
          f"evaluation images (cosine >= {a.threshold}): {out}")
    if a.clean:
        # an image without an embedding (unreadable) was not checked: it was listed as clean
        # (dedup leaves it out too)
        ok = finite_rows(train, a.chunk_rows)
        unread = int((~ok).sum())
        unread = f" and the {unread} without an embedding (unreadable)" if unread else ""
        ok[[t for t, _, _ in hits]] = False
        if not ok.any():  # an empty training list, written as if all were well
            raise ValueError(f"--clean {a.clean}: no training image is left without the "
                             f"{len(hits)} that near-duplicate an evaluation image{unread}: "
                             f"nothing to train on, no list written (the pairs are in {out}; a "
                             "higher --threshold finds fewer)")
        clean = _write_lines(a.clean, [files[i] for i in np.nonzero(ok)[0]])
        print(f"wrote {clean} without them{unread} (train with data.file_list={clean})")
    return 1 if hits and a.fail_on_hits else 0


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
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
                        "DINOv3ViTModel or timm DINOv3 folder, an official DINOv3 DCP checkpoint "
                        "(with --arch), or 'random'")
    p.add_argument("--arch", default=None, help="factory name, e.g. vit_small (overrides "
                   "--config; default: the run's config.yaml or the folder's config.json)")
    p.add_argument("--config", default=None, help="preset name in configs/ or a yaml file")
    p.add_argument("--out", required=True, help="output folder E")
    p.add_argument("--image-size", type=int, default=224,  # checked against the patch size
                   help="centre crop, a multiple of the backbone's patch size (16; 14 for the "
                        "DINOv2 archs)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per forward of the backbone")
    p.add_argument("--num-workers", type=count, default=4, help="image decoding workers")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="init seed for --weights random")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--patches", action="store_true",
                   help="also E/patches.npy: [N, h, w, D] fp16 patch tokens (after the final "
                        "norm) for your own dense heads or retrieval")
    p.add_argument("--white-level", type=white_level, default=None, metavar="N",
                   help=WHITE_LEVEL_HELP)
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_false",
                   help="decode every JPEG in full (default: a large JPEG is decoded at 1/2, 1/4 "
                        "or 1/8 of its size, down to the resize target, as eval's features: "
                        "several times faster; a folder embedded before this option is "
                        "continued only with it)")

    p = sub.add_parser("cluster", help="hierarchical k-means with resampling steps",
                       formatter_class=fmt)
    p.add_argument("embeddings", help="folder E written by `curate embed`")
    p.add_argument("--clusters", type=_positive_ints, required=True,
                   help="clusters per level, bottom to top, e.g. 100,20,5")
    p.add_argument("--levels", type=positive_int, default=None,
                   help="number of levels (checks --clusters; default: as many as it lists)")
    p.add_argument("--resampling-steps", type=_counts, default=[10],
                   help="resampling steps per level (one value: every level)")
    p.add_argument("--sample-size", type=_ints, default=None,
                   help="points per cluster in a resampling step, per level (default: half the "
                        "average cluster size; <= 1: no resampling)")
    p.add_argument("--iters", type=positive_int, default=50,
                   help="Lloyd iterations per k-means")
    p.add_argument("--strategy", choices=["c", "r"], default="c",
                   help="resampling: c = closest to the centroid, r = random")
    p.add_argument("--impl", choices=["auto", "triton", "torch"], default="auto",
                   help="assignment kernel: auto = Triton on CUDA")
    p.add_argument("--chunk-rows", type=positive_int, default=1 << 16,
                   help="embeddings read per chunk when they do not fit in memory")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="k-means++ init and resampling seed")
    p.add_argument("--out", required=True,
                   help="output folder C; an interrupted run continues from it when rerun with "
                        "the same arguments")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the clustering progress or result in --out")

    p = sub.add_parser("sample", help="balanced hierarchical sampling -> file list",
                       formatter_class=fmt)
    p.add_argument("clusters_dir", metavar="C", help="folder C written by `curate cluster`")
    p.add_argument("--n", type=positive_int, required=True, help="number of images to select")
    p.add_argument("--strategy", choices=["c", "r"], default="r",
                   help="inside a level-1 cluster: c = closest to the centroid, r = random")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", required=True, help="file list to write (data.file_list)")

    def search_options(p, k: int | None) -> None:
        if k is not None:  # (contamination searches each training row's best match: no k)
            p.add_argument("--k", type=positive_int, default=k,
                           help="neighbours searched per row")
        p.add_argument("--chunk-rows", type=positive_int, default=8192,
                       help="rows per similarity block (memory: chunk^2 x 4 bytes)")
        p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("dedup", help="near-duplicate removal by embedding similarity",
                       formatter_class=fmt)
    p.add_argument("embeddings", help="folder E written by `curate embed`")
    p.add_argument("--threshold", type=_cosine, default=0.95,
                   help="cosine similarity at which two images are duplicates (1.0: exact "
                        "copies). Duplicates chain: a~b and b~c remove b and c for a even "
                        "where a and c are less similar (one group, its first image kept)")
    p.add_argument("--out", required=True, help="file list of the kept images (+ .removed.tsv)")
    search_options(p, 16)

    p = sub.add_parser("retrieve", help="the pool images nearest to seed images (LVD-style "
                       "retrieval)", formatter_class=fmt)
    p.add_argument("embeddings", help="pool: folder E written by `curate embed`")
    p.add_argument("--seeds", required=True, help="seed images' folder from `curate embed` "
                   "(same --weights, --image-size and --white-level)")
    p.add_argument("--threshold", type=_cosine, default=None,
                   help="keep only neighbours at least this similar (cosine; default: all "
                        "--k)")
    p.add_argument("--out", required=True, help="file list of the retrieved images (+ .tsv)")
    search_options(p, 4)

    p = sub.add_parser("contamination", help="training images that copy evaluation images",
                       formatter_class=fmt)
    p.add_argument("embeddings", help="training set: folder E written by `curate embed`")
    p.add_argument("--eval", required=True, help="evaluation images' folder from `curate embed` "
                   "(same --weights, --image-size and --white-level)")
    p.add_argument("--threshold", type=_cosine, default=0.9,
                   help="cosine similarity at which a training image copies an eval image")
    p.add_argument("--out", required=True, help="TSV: training image, eval image, similarity")
    p.add_argument("--clean", default=None, help="also write the training list without them "
                   "(refused, exit 2, when none is left)")
    p.add_argument("--fail-on-hits", action="store_true", help="exit 1 when any is found")
    search_options(p, None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """One command; a bad path, file or value (FileNotFoundError, ValueError, KeyError, a refused
    pickle, an output path that is a file or unwritable) is one line on stderr and exit status
    2, as argparse's usage errors."""
    import pickle

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = {"embed": _embed, "cluster": _cluster, "sample": _sample, "dedup": _dedup,
               "retrieve": _retrieve, "contamination": _contamination}[a.cmd]
    try:
        return command(a)
    except (FileNotFoundError, ValueError, KeyError, pickle.UnpicklingError,
            # an --out that is a file, or unwritable: the OSError names the path
            NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as e:
        print(f"fastdino curate {a.cmd}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what happens next, not a traceback
        then = {"embed": "the rows on disk are kept: rerun the same command to continue",
                "cluster": "rerun the same command to continue from what --out holds (the "
                           "finished levels, the k-means saved every 5 minutes)"
                }.get(a.cmd, "its output may be incomplete: rerun it")
        print(f"fastdino curate {a.cmd}: interrupted; {then}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
