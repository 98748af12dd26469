"""The DALI training loader: decode and augment 2 global + N local (+ 2 Gram) crops per image on the
GPU (CPU-only DALI without CUDA), yielding the same `Batch` stream as the torch loader.

    loader = build_dali_loader(cfg, rank, world_size, start_iteration)   # iterator of Batch

Data flow, per rank:
  file order   `ShardedInfiniteOrder` (loader.py): the same sorted file list, per-epoch
               permutation and rank striding as the torch loader, so shards are disjoint, cover
               each epoch, and resume at `start_iteration` arithmetically.
  source       `fn.external_source` calls `_Source` per sample: it reads the file's bytes, probes
               them cheaply (header + truncation, `dali_plan.probe_image`), replaces an unreadable
               file by the next readable one (the torch loader's rule), and draws the image's crop
               plan from the torch loader's per-image Generator (`dali_plan.py`). ~0.1-0.2 ms of
               Python per image, so by default (`data.dali_source_workers: 2`) it runs in DALI's
               spawned worker processes (parallel external source), off the training process's
               main thread; every value is a function of (seed, step, slot), so the batches are
               the same either way (tested), and skips come back through the sample's meta.
               `fn.readers.file` is not used: its shuffling cannot follow our epoch permutation or
               seed, and it cannot skip a bad file.
  decode       once per image, `fn.decoders.image` on "mixed" (nvJPEG / hardware JPEG decoder) or
               "cpu"; every crop is then resized from the decoded image. Decoding per crop with
               `fn.decoders.image_random_crop` would run the CPU Huffman stage 2+N times per image
               (DALI#5274: Huffman decoding is what keeps CPU cores busy in "mixed" mode).
               A TIFF DALI would not decode as PIL does (16-bit, float, bilevel, CMYK, grey +
               alpha, planar, ...: `dali_plan._dali_reads_tiff`) is decoded by the source with
               the torch loader's decode and reaches the decoder as PPM: same pixels, no stop.
               So is a 16-bit colour PNG (PIL's high byte), a TIFF PIL cannot open (tifffile
               may), and, with data.white_level set, a 16-bit greyscale image of any format (a
               16-bit PNG: DALI's decoder would scale 0..65535, not 0..white_level, to 0..255).
  crops        `dali_ops.CropGraph` executes each plan row; outputs stay on the GPU.
  photometric  data.dali_jitter picks where the photometric ops run.
               triton (default): the graph ends at crop + resize (120 operators at 2 x 224 +
               8 x 96) and outputs uint8 HWC crops, the plan and the kernel's per-crop
               parameters (`dali_plan.photometric_params`, made by the source); the loader runs
               kernels/photometric.py once per crop size (`gpu_photometric.finish_crops`):
               ColorJitter, greyscale, blur, solarize, flip, normalisation, bit for bit the torch
               loader's ops on the same resized crop (its blur and normalisation included).
               Gram crops distorted at the large size are distorted first, then resized to both
               sizes (torch's antialiased bicubic), then flipped and normalised. Tests:
               test_dali.py checks the batches against the torch loader's own ops on the
               pipeline's crops, exactly.
               exact / fast: every op in the DALI graph (below).
  CPU vs GPU   (exact / fast) The two graphs differ in one place, ColorJitter. GPU graph: DALI
               ops, PIL's bit for bit (`dali_ops`: the exact graph; `exact_hue=False` takes DALI's
               own ops, within a level or two, the hue ~17 off), one conditional per (slot, op);
               cheap as GPU kernels but many operators: 4,995 in the whole graph at 2 x 224 + 8 x 96
               (6,885 before the exact graph held the hue once per crop; the fast graph 1,795),
               and DALI's executor pays a host cost per operator and step. CPU graph (CPU-only
               DALI, i.e. CI and machines without CUDA; `host_jitter`): one `fn.python_function`
               per crop running the torch loader's own PIL ops in the plan's slot order.
               Measured on 2 cores (B=8, sample images): the GPU graph's ops run on the CPU at
               0.82 s per step exact (1.27 s before), 0.21 s fast; earlier (pipe.run()): host
               jitter ~65-70 images/s, no jitter at all ~90-110. Same plan, same coins and same
               output contract either way; the GPU graph's jitter ops are checked against PIL on
               the CPU (tests run them with host_jitter=False).
  batch        crops concatenated crop-major on the device; iBOT masks drawn by the source per
               step with the torch loader's `masking_rng(seed, step, rank)` (identical masks;
               ~5-10 ms of Python at B = 64, in the worker processes, once per step each), each
               image bringing its two rows, assembled and moved here.

Corrupt files. The probe catches non-images and truncated files before DALI sees them, and files of
a format DALI's decoder cannot read (GIF, ICO, TGA, ... under an image extension): those are
skipped here though the torch loader trains on them, so there the two loaders' image sets
differ. A file that passes it but still fails to decode stops the DALI pipeline; the loader then
fully decodes (PIL) the files of the steps in flight, adds the bad ones to the skip set, and
rebuilds the pipeline at the current step (the first step of a run or a resume included).
Because every choice is a function of (seed, epoch, index, step), the rebuilt pipeline yields
exactly the batches the broken one would have (with the bad file replaced).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fastdino.config import Config
from fastdino.data import dali_plan as P
from fastdino.data.collate import Batch
from fastdino.data.datasets import (
    ImageFolderUnlabeled,
    say_bit_depth,
    silence_shallow_16bit_warning,
)
from fastdino.data.gpu_photometric import RawCrops, finish_crops
from fastdino.data.loader import (
    ShardedInfiniteOrder,
    StepsOfResolution,
    augmentation_rng,
    build_dataset,
    build_order,
    masking_rng,
    resolution_of,
)
from fastdino.data.masking import (
    MaskingGenerator,
    draw_mask_rows,
    masks_from_rows,
    max_num_patches_for,
)
from fastdino.rank_logging import EVERY_RANK
from fastdino.stop import ignore_in_worker

logger = logging.getLogger("fastdino.data")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_loader(requested: str) -> str:
    """`data.loader` -> "dali" | "torch". auto = DALI when importable and CUDA is present."""
    if requested in ("dali", "torch"):
        return requested
    if requested != "auto":
        raise ValueError(f"data.loader={requested!r}: allowed are auto, torch, dali")
    if dali_available() and torch.cuda.is_available():
        return "dali"
    return "torch"


# ------------------------------------------------------------------------------------------------
# Host side: which file, its bytes, its plan


@dataclass
class SampleMeta:
    epoch: int
    index: int  # dataset index asked for by the order
    used: int  # dataset index actually decoded (differs when files were skipped)


def _why(e: Exception) -> str:
    """A skip's reason, as the torch loader words it (an UnreadableImage names its cause)."""
    return str(e) if isinstance(e, P.UnreadableImage) else f"{type(e).__name__}: {e}"


class _Source:
    """Per-sample callback of `fn.external_source` (batch=False): -> (bytes, plan, meta, the
    image's two rows of the step's iBOT masks[, its crops' photometric kernel parameters])."""

    def __init__(self, images: ImageFolderUnlabeled, order: ShardedInfiniteOrder, cfg: Config,
                 start_iteration: int, photometric_params: bool = False,
                 steps: Callable[[int], int] | None = None) -> None:
        self.images, self.order, self.crops = images, order, cfg.crops
        self.white_level = cfg.data.white_level  # the probe's host decode applies it
        # photometric="triton": the kernel's per-crop parameters (blur taps included) are made
        # here too, in the worker processes, not on the training process's main thread
        self.photometric_params = photometric_params
        self.seed, self.batch_size = cfg.data.seed, cfg.data.batch_size_per_gpu
        self.start_iteration = start_iteration
        # the pipeline's j-th batch is step steps(j): start + j, or (one pipeline per entry of a
        # crops.resolution_mix) the j-th step of this resolution
        self.steps = steps if steps is not None else _Consecutive(start_iteration)
        ps, gsize = cfg.model.patch_size, cfg.crops.global_crops_size
        self.mask_grid = (gsize // ps, gsize // ps)
        self.mask_args = dict(mask_probability=cfg.ibot.mask_sample_probability,
                              ratio_min_max=cfg.ibot.mask_ratio_min_max)
        self.mask_generator = MaskingGenerator(gsize // ps,
                                               max_num_patches=max_num_patches_for(gsize, ps))
        self._masks: dict[int, np.ndarray] = {}  # step -> [2B, N], the last few steps

    def step_masks(self, step: int) -> np.ndarray:
        """The step's [2B, N] iBOT masks, drawn as the torch loader's collate draws them
        (`masking_rng(seed, step, rank)`): once per step in each process that asks."""
        if step not in self._masks:
            if len(self._masks) >= 4:  # steps in flight: prefetch depth + the one being built
                del self._masks[min(self._masks)]
            self._masks[step] = draw_mask_rows(
                2 * self.batch_size, self.mask_grid,
                masking_rng(self.seed, step, self.order.rank),
                mask_generator=self.mask_generator, **self.mask_args)
        return self._masks[step]

    def probe(self, index: int) -> tuple[np.ndarray, int, int, int]:
        """(bytes, width, height, index used): `index` or the next file that passes the probe."""
        paths, n = self.images.paths, len(self.images.paths)
        for i in self.images.candidates(index):
            if paths[i] in self.images.skipped:
                continue
            try:
                return (*P.probe_image(self.images.read(i), self.white_level), i)
            except (OSError, P.UnreadableImage) as e:
                # said by the loader, once, from the training process (`_skipped_paths`): a
                # spawned source worker has no logging set up (its line came untagged, on
                # every rank, beside the loader's)
                self.images.skipped.add(paths[i])
                self.images.skip_reasons[paths[i]] = _why(e)
        raise RuntimeError(f"none of the {n} files in {self.images.source!r} could be read as "
                           "images")

    def sample(self, step: int, slot: int) -> tuple[np.ndarray, ...]:
        epoch, index = self.order.sample(step * self.batch_size + slot)
        data, width, height, used = self.probe(index)
        # The crops depend on the requested (epoch, index), as in the torch loader.
        plan = P.plan_image(width, height, self.crops, augmentation_rng(self.seed, epoch, index))
        masks = self.step_masks(step)  # rows slot (global crop 1) and B + slot (global crop 2)
        out = (data, plan, np.array([epoch, index, used], dtype=np.int64),
               masks[[slot, self.batch_size + slot]])
        return (*out, P.photometric_params(plan)) if self.photometric_params else out

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        return self.sample(self.steps(info.iteration), info.idx_in_batch)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_creator_pid": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        # unpickled in a parallel external source worker (spawned): the stop signals are the
        # training process's (fastdino/stop.py), so the worker must not die of Ctrl-C / SIGTERM
        self.__dict__.update(state)
        if os.getpid() != state["_creator_pid"]:
            ignore_in_worker()
            # the 16-bit depth warning is the training process's (`say_bit_depth`): a spawned
            # worker has no logging set up and would print it bare, on every rank
            silence_shallow_16bit_warning()


# ------------------------------------------------------------------------------------------------
# The pipeline


PHOTOMETRIC = ("dali", "triton")


def output_names(cfg: Config, photometric: str = "dali", debug: bool = False) -> list[str]:
    """The pipeline's outputs, in order: the crops, meta [3] (epoch, index, used), mask_rows
    [2, N] (the image's rows of the step's iBOT masks), [params], [plan, image shape].
    photometric="triton" outputs uint8 HWC crops and params [n_crops, photometric.N_PARAMS] (the
    kernel's); with Gram crops distorted at the large size (no `gram_teacher_no_distortions`) the
    two global outputs are those large crops and there is no Gram output (the loader distorts,
    then resizes them to both sizes). debug adds the plan [n_crops, N_PARAMS] and the decoded
    image's shape [3]."""
    c = cfg.crops
    names = ["global0", "global1"] + [f"local{i}" for i in range(c.local_crops_number)]
    gram = c.gram_teacher_crops_size is not None
    if gram and (photometric == "dali" or c.gram_teacher_no_distortions):
        names += ["gram0", "gram1"]
    names += ["meta", "mask_rows"]
    if photometric == "triton":
        names.append("params")
    if debug:
        names += ["plan", "image_shape"]
    return names


def build_pipeline(source: _Source, cfg: Config, device_id: int | None, num_threads: int,
                   **kw):
    """`define_pipeline`, built (DALI's backend: needs CUDA when device_id is not None)."""
    pipe = define_pipeline(source, cfg, device_id, num_threads, **kw)
    pipe.build()
    return pipe


def define_pipeline(source: _Source, cfg: Config, device_id: int | None, num_threads: int,
                    debug: bool = False, seed: int = 0, exact_hue: bool = True,
                    host_jitter: bool | None = None, photometric: str = "dali",
                    source_workers: int = 0):
    """DALI pipeline of one rank, not built; outputs in `output_names` order. Defining it touches
    no device, so the GPU graph can be defined and inspected on a CPU-only machine
    (`pipe._build_graph()` runs DALI's Python-side checks; tests/unit/test_dali.py).
    host_jitter: None = on the CPU graph only (see the module docstring); False = the GPU graph's
    DALI jitter ops on the CPU too (tests use it to check those ops against PIL without a GPU).
    photometric="triton": the graph ends at crop + resize (uint8 HWC); the loader runs the
    photometric ops in kernels/photometric.py.
    source_workers: processes that run `source` (DALI's parallel external source, spawned: file
    reads, probes and crop plans off the training process's main thread); 0 = in this process."""
    if source_workers < 0:
        raise ValueError(f"source_workers={source_workers}: allowed is an integer >= 0")
    if photometric not in PHOTOMETRIC:
        raise ValueError(f"photometric={photometric!r}: allowed are {', '.join(PHOTOMETRIC)}")
    if source.photometric_params != (photometric == "triton"):
        raise ValueError(f"photometric={photometric!r} needs a source built with "
                         f"photometric_params={photometric == 'triton'}")
    from nvidia.dali import fn, pipeline_def, types

    from fastdino.data.dali_ops import CropGraph

    c = cfg.crops
    on_gpu = device_id is not None
    if host_jitter is None:
        host_jitter = not on_gpu
    gram_size = c.gram_teacher_crops_size
    global_max = max(c.global_crops_size, gram_size or 0)

    @pipeline_def(enable_conditionals=True)
    def multicrop():
        dtypes = [types.UINT8, types.FLOAT, types.INT64, types.BOOL]
        if photometric == "triton":
            dtypes.append(types.FLOAT)  # the kernel's parameters [n_crops, photometric.N_PARAMS]
        encoded, plan, meta, mask_rows, *params = fn.external_source(
            source=source, batch=False, num_outputs=len(dtypes), dtype=dtypes,
            parallel=source_workers > 0)
        image = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                                  output_type=types.RGB,
                                  adjust_orientation=False)  # as PIL's decode in the torch loader
        g = CropGraph("gpu" if on_gpu else "cpu", c.mean, c.std, exact_hue, host_jitter)

        def distort(x, row, size):
            # Each `if` runs its branch only for the samples whose coin says so.
            if row[P.JITTER] > 0.5:
                x = g.jitter(x, row, size * size)
            if row[P.GRAY] > 0.5:
                x = g.grayscale(x)
            if row[P.BLUR] > 0.5:
                x = g.blur(x, row)
            if row[P.SOLARIZE] > 0.5:
                x = g.solarize(x)
            return x

        if photometric == "triton":  # crop + resize only; the loader does the rest
            raw = [g.resize_window(image, plan[k], global_max
                                   if gram_size is not None and not c.gram_teacher_no_distortions
                                   else c.global_crops_size) for k in range(2)]
            raw += [g.resize_window(image, plan[2 + i], c.local_crops_size)
                    for i in range(c.local_crops_number)]
            if gram_size is not None and c.gram_teacher_no_distortions:
                raw += [g.resize_window(image, plan[k], gram_size) for k in range(2)]
            return tuple(raw + [meta, mask_rows, *params]
                         + ([plan, image.shape()] if debug else []))

        globals_, grams = [], []
        for k in range(2):
            row = plan[k]
            if gram_size is None:
                crop = g.resize_window(image, row, c.global_crops_size)
                globals_.append(g.normalize(distort(crop, row, c.global_crops_size), row))
            elif c.gram_teacher_no_distortions:
                student = distort(g.resize_window(image, row, c.global_crops_size), row,
                                  c.global_crops_size)
                globals_.append(g.normalize(student, row))
                grams.append(g.normalize(g.resize_window(image, row, gram_size), row))
            else:  # distort at the larger size, then resize both (torch loader's order)
                base = distort(g.resize_window(image, row, global_max), row, global_max)
                for size, out in ((c.global_crops_size, globals_), (gram_size, grams)):
                    out.append(g.normalize(base if size == global_max else g.resize(base, size),
                                           row))
        locals_ = []
        for i in range(c.local_crops_number):
            row = plan[2 + i]
            size = c.local_crops_size
            locals_.append(g.normalize(distort(g.resize_window(image, row, size), row, size), row))
        outputs = [*globals_, *locals_, *grams, meta, mask_rows]
        if debug:
            outputs += [plan, image.shape()]
        return tuple(outputs)

    # spawn, not fork: the training process holds a CUDA context by the time the loader is built
    workers = ({"py_num_workers": source_workers, "py_start_method": "spawn"}
               if source_workers else {})
    return multicrop(batch_size=cfg.data.batch_size_per_gpu, num_threads=num_threads,
                     device_id=device_id, seed=seed, prefetch_queue_depth=2, **workers)


def graph_operators(pipe) -> int:
    """Operators in a built pipeline's graph (DALI's executor pays a host cost per operator and
    step; `bench data` reports it beside the images/s)."""
    import re
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.dot"
        pipe.save_graph_to_dot_file(str(path))
        text = path.read_text()
    return len(set(re.findall(r"(?<!\w)(_\w+?_\d+)(?!\w)", text)))  # "__Resize_12 -> ..."


# ------------------------------------------------------------------------------------------------
# The loader


class _Consecutive:
    """j -> start + j (picklable: it goes to the source's worker processes)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self, j: int) -> int:
        return self.start + j


class _Shifted:
    """j -> steps(offset + j): a rebuilt pipeline continues where the old one stopped."""

    def __init__(self, steps: Callable[[int], int], offset: int) -> None:
        self.steps, self.offset = steps, offset

    def __call__(self, j: int) -> int:
        return self.steps(self.offset + j)


class DALITrainLoader:
    """Iterator of `Batch`; `iteration` is the step of the next batch (the data position).
    `steps` (a crops.resolution_mix's loader of one resolution): its j-th batch is step
    steps(j) instead of start_iteration + j."""

    def __init__(self, images: ImageFolderUnlabeled, cfg: Config, rank: int, world_size: int,
                 start_iteration: int, device_id: int | None, debug: bool = False,
                 exact_hue: bool = True, host_jitter: bool | None = None,
                 photometric: str = "dali", source_workers: int = 0,
                 steps: Callable[[int], int] | None = None) -> None:
        self.images, self.cfg, self.rank, self.debug = images, cfg, rank, debug
        self.exact_hue, self.host_jitter, self.photometric = exact_hue, host_jitter, photometric
        self.source_workers = source_workers
        self.device_id = device_id
        self.device = (torch.device("cuda", device_id) if device_id is not None
                       else torch.device("cpu"))
        self.order = build_order(images, cfg, rank, world_size)
        self.steps = steps if steps is not None else _Consecutive(start_iteration)
        self.served = 0  # batches this loader has returned
        self.skipped: set[str] = set()  # reported so far (same bookkeeping as TrainLoader)
        self._reasons: dict[str, str] = {}  # why each of them was skipped
        self.last_debug: dict | None = None  # with debug: plan/meta/decoded shape of the last batch
        self._start()

    def _names(self) -> list[str]:
        return output_names(self.cfg, self.photometric, self.debug)

    def _start(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        source = _Source(self.images, self.order, self.cfg, self.iteration,
                         photometric_params=self.photometric == "triton",
                         steps=_Shifted(self.steps, self.served))
        # The DALI seed only feeds operators we do not randomise; keep it a function of the run.
        seed = (self.cfg.data.seed * 1_000_003 + self.rank) % 2**31
        self.pipe = build_pipeline(source, self.cfg, self.device_id,
                                   num_threads=max(1, self.cfg.data.num_workers), debug=self.debug,
                                   seed=seed, exact_hue=self.exact_hue,
                                   host_jitter=self.host_jitter, photometric=self.photometric,
                                   source_workers=self.source_workers)
        # prepare_first_batch=False: DALI's default runs the pipeline in the constructor, outside
        # __next__'s recovery, so a bad file in the first step (of a run, a resume or a rebuilt
        # pipeline) would stop the run instead of being skipped
        self._it = DALIGenericIterator([self.pipe], self._names(), auto_reset=False,
                                       prepare_first_batch=False)

    @property
    def iteration(self) -> int:
        return self.steps(self.served)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __iter__(self) -> "DALITrainLoader":
        return self

    def _stop_workers(self) -> None:
        """Stop the source's worker processes now (DALI would at interpreter exit, through a
        weakref finalizer that can deadlock there once a worker has raised)."""
        pool = getattr(getattr(self, "pipe", None), "_py_pool", None)
        if pool is not None:
            pool.close()

    def _recover(self, error: Exception) -> None:
        """DALI stopped on a file the probe let through: find it by a full decode of the files
        of the steps in flight, skip it, and restart the pipeline at the current step."""
        depth = 3  # prefetch queue (2) + the step being returned
        found = []
        for step in (self.steps(j) for j in range(self.served, self.served + depth)):
            for k in range(step * self.cfg.data.batch_size_per_gpu,
                           (step + 1) * self.cfg.data.batch_size_per_gpu):
                _, index = self.order.sample(k)
                path = self.images.paths[index]
                if path in self.images.skipped:
                    continue
                try:
                    self.images.decode(index)
                except (OSError, ValueError, SyntaxError) as e:
                    self.images.skipped.add(path)  # said when a batch passes it over
                    self.images.skip_reasons[path] = f"DALI's decoder failed on it; {_why(e)}"
                    found.append(path)
        if not found:  # PIL decodes every one of them: a variant DALI's decoder cannot read
            raise RuntimeError(
                f"DALI loader: DALI's decoder failed on a file of steps {self.iteration} to "
                f"{self.steps(self.served + depth - 1)} that PIL decodes (a format DALI cannot "
                "read that the probe let through); data.loader=torch reads it") from error
        self._stop_workers()
        del self._it, self.pipe
        self._start()

    def __next__(self) -> Batch:
        try:
            for _ in range(8):  # each round removes at least one bad file
                try:
                    out = next(self._it)[0]
                    break
                except StopIteration:
                    raise
                except RuntimeError as e:
                    self._recover(e)
            else:
                raise RuntimeError("DALI loader: too many undecodable files in a row")
        except BaseException:  # the loader is done: its workers too (see _stop_workers)
            self._stop_workers()
            raise
        batch = self._to_batch(out)
        self.served += 1
        return batch

    def _to_batch(self, out: dict) -> Batch:
        c, b = self.cfg.crops, self.cfg.data.batch_size_per_gpu
        # Crop-major, as `collate_fn`: [all images' crop 0, all images' crop 1, ...]; on device.
        if self.photometric == "triton":
            global_crops, local_crops, gram_crops = self._photometric(out)
        else:
            global_crops = torch.cat([out["global0"], out["global1"]])  # [2B, 3, Hg, Wg]
            local_crops = torch.cat([out[f"local{i}"] for i in range(c.local_crops_number)])
            gram_crops = (torch.cat([out["gram0"], out["gram1"]])
                          if c.gram_teacher_crops_size is not None else None)
        meta = out["meta"].cpu()  # [B, 3] (epoch, index, used): tiny bookkeeping only
        skipped, reasons = self._skipped_paths(meta)
        # the step's iBOT masks, drawn by the source (worker processes): image i brought rows
        # i and B + i (its two global crops, crop-major)
        rows = out["mask_rows"].cpu()  # [B, 2, N] bool
        m = masks_from_rows(rows.transpose(0, 1).reshape(2 * b, -1).numpy())
        if self.debug:
            self.last_debug = {"meta": meta, "plan": out["plan"].cpu(),
                               "image_shape": out["image_shape"].cpu()}
        nb = self.device.type == "cuda"
        return Batch(global_crops=global_crops, local_crops=local_crops,
                     masks=m.masks.to(self.device, non_blocking=nb),
                     mask_indices=m.mask_indices.to(self.device, non_blocking=nb),
                     masks_weight=m.masks_weight.to(self.device, non_blocking=nb),
                     n_masked_patches=m.n_masked_patches.to(self.device, non_blocking=nb),
                     gram_crops=gram_crops, n_images=b, skipped_files=skipped,
                     skipped_reasons=reasons)

    def _photometric(self, out: dict):
        """The uint8 crops of photometric="triton" -> normalised (global, local, gram) crops
        (`gpu_photometric.finish_crops`: kernels/photometric.py on the crops' device)."""
        c = self.cfg.crops
        # [B, n_crops, photometric.N_PARAMS], by the source. non_blocking: from pageable memory
        # that is a staged copy with no device sync; a blocking one would first wait for all the
        # work queued on the stream (the previous step's optimizer and EMA), a stall that the
        # trainer would count as data wait
        params = out["params"].to(self.device, non_blocking=True)
        rows = params.transpose(0, 1)  # [n_crops, B, ...]: crop-major, as the crops
        n_local = c.local_crops_number

        def cat(names):  # [k·B, H, W, 3] uint8, our own buffer (the kernel works in place)
            return torch.cat([out[n] for n in names])

        raw = RawCrops(
            global_crops=cat(["global0", "global1"]),
            local_crops=cat([f"local{i}" for i in range(n_local)]),
            gram_crops=cat(["gram0", "gram1"]) if "gram0" in out else None,
            global_params=rows[:2].reshape(-1, rows.shape[-1]),
            local_params=rows[2:2 + n_local].reshape(-1, rows.shape[-1]))
        return finish_crops(raw, self.cfg)

    def _skipped_paths(self, meta: torch.Tensor) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(files passed over for the batch's images, why each), each file said once, as the
        torch loader says it (TrainLoader.__next__)."""
        files, reasons = [], []
        for _, index, used in meta.tolist():
            for i in self.images.candidates(index):  # index, then the next ones, up to used
                if i == used:
                    break
                path = self.images.paths[i]
                if path not in self.skipped:
                    self.skipped.add(path)
                    self._reasons[path] = self._reason(i, path)
                    why = self._reasons[path]
                    logger.warning("skipped unreadable image %s (%s%d skipped so far of %d)", path,
                                   f"{why}; " if why else "", len(self.skipped), self.num_images,
                                   extra=EVERY_RANK)  # this rank's shard: only it sees the file
                files.append(path)
                reasons.append(self._reasons[path])
        return tuple(files), tuple(reasons)

    def _reason(self, index: int, path: str) -> str:
        """Why the source skipped file `index`: recorded here when the source runs in this
        process (or the recovery found it), else the probe's answer again (a spawned worker's
        record stays in the worker; once per file); "" if it now passes (a transient error)."""
        if path in self.images.skip_reasons:
            return self.images.skip_reasons[path]
        try:
            P.probe_image(self.images.read(index), self.cfg.data.white_level)
        except (OSError, P.UnreadableImage) as e:
            return _why(e)
        return ""


class MixedResolutionLoader:
    """crops.resolution_mix on DALI: one pipeline per (global, local, Gram) triple (a DALI graph
    has one size), each serving the steps that drew its triple (`loader.StepsOfResolution`);
    step s comes from the pipeline of `resolution_of(seed, s)`, so the stream is the torch
    loader's choice of sizes, the same on every rank and on a resume. Each pipeline prefetches
    its own next batches: memory and threads grow with the number of triples."""

    def __init__(self, loaders: list[DALITrainLoader], seed: int, ratios, start_iteration: int,
                 gas: int = 1):
        self.loaders, self.seed, self.ratios, self.gas = loaders, seed, ratios, gas
        self.iteration = start_iteration
        self.skipped: set[str] = set()

    @property
    def num_images(self) -> int:
        return self.loaders[0].num_images

    def __iter__(self) -> "MixedResolutionLoader":
        return self

    def __next__(self) -> Batch:
        loader = self.loaders[resolution_of(self.seed, self.iteration, self.ratios, self.gas)]
        assert loader.iteration == self.iteration  # its next batch is this step's
        batch = next(loader)
        self.iteration += 1
        return batch


def build_dali_loader(cfg: Config, rank: int = 0, world_size: int = 1,
                      start_iteration: int = 0, debug: bool = False,
                      exact_hue: bool | None = None,
                      host_jitter: bool | None = None,
                      photometric: str | None = None,
                      source_workers: int | None = None
                      ) -> DALITrainLoader | MixedResolutionLoader:
    """Infinite iterator of this rank's `Batch`es from step `start_iteration`: on the current CUDA
    device when there is one (crops stay on the GPU), CPU-only DALI otherwise. exact_hue: the
    exact ColorJitter graph; photometric: "dali" (the graph does every op) or "triton" (the graph
    crops and resizes, kernels/photometric.py does the rest); None: from `data.dali_jitter`.
    source_workers: None = `data.dali_source_workers`."""
    if exact_hue is None:
        exact_hue = cfg.data.dali_jitter == "exact"
    if photometric is None:
        photometric = "triton" if cfg.data.dali_jitter == "triton" else "dali"
    if source_workers is None:
        source_workers = cfg.data.dali_source_workers
    if not dali_available():
        raise RuntimeError("data.loader=dali but NVIDIA DALI is not installed: "
                           "pip install 'fastdino[dali]' (or set data.loader=torch|auto)")
    images = build_dataset(cfg, ranks=(rank, world_size))  # collective: every rank calls this
    say_bit_depth(images)  # its source workers have no logging: said from here
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    logger.info("DALI loader: %d images in %s (rank %d/%d, %d per step, %s, from step %d; "
                "photometric ops: %s; source: %s)",
                len(images), images.source, rank, world_size, cfg.data.batch_size_per_gpu,
                f"GPU {device_id} (mixed decode)" if device_id is not None else "CPU-only",
                start_iteration, photometric if photometric == "triton" else
                f"DALI graph ({'exact' if exact_hue else 'fast'})",
                f"{source_workers} worker processes" if source_workers else "this process")
    variants = cfg.crops.variants()
    if len(variants) == 1:
        return DALITrainLoader(images, cfg, rank, world_size, start_iteration, device_id, debug,
                               exact_hue, host_jitter, photometric, source_workers)
    ratios = np.array([r for _, r in variants])
    gas = cfg.deepspeed.gradient_accumulation_steps  # one triple per optimizer step
    loaders = [DALITrainLoader(images, dataclasses.replace(cfg, crops=crops), rank, world_size,
                               start_iteration, device_id, debug, exact_hue, host_jitter,
                               photometric, source_workers,
                               steps=StepsOfResolution(cfg.data.seed, ratios, k, start_iteration,
                                                       gas))
               for k, (crops, _) in enumerate(variants)]
    logger.info("DALI loader: crops.resolution_mix, one pipeline per triple: %s",
                ", ".join(f"{c.global_crops_size}/{c.local_crops_size}/"
                          f"{c.gram_teacher_crops_size} ({r:.0%})" for c, r in variants))
    return MixedResolutionLoader(loaders, cfg.data.seed, ratios, start_iteration, gas)
