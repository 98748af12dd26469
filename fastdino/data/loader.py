"""The torch training loader: an infinite, rank-sharded, exactly resumable stream of `Batch`es.

Order. The data is an endless sequence of epochs (one epoch = one pass over the sorted file list);
epoch e visits the images in the permutation seeded by (data.seed, e). Global position p of that
sequence is epoch p // n, slot p % n. Rank r of W takes positions r, r+W, r+2W, ... (the official
InfiniteSampler's striding), so within any epoch every slot goes to exactly one rank: the ranks'
shards are disjoint and together cover the epoch. Step s of rank r holds its samples
k = s*B .. s*B+B-1, i.e. positions k*W + r.

Randomness. An image's crops are drawn from a Generator seeded by (data.seed, epoch, index); a
step's iBOT masks from one seeded by (data.seed, step, rank). Nothing depends on worker ids, on
process history or on global RNG state, so a run resumed at `start_iteration` computes exactly
the batches an uninterrupted run would have seen, and skips the earlier ones arithmetically
(no decoding).

Workers. A DataLoader over a map-style dataset whose item `s` is the whole collated Batch of step
s (`batch_size=None`): each worker builds complete batches, DataLoader keeps them in step order,
and pin memory calls `Batch.pin_memory`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastdino.config import Config
from fastdino.data.collate import Batch, RawBatch, collate_fn, collate_raw
from fastdino.data.datasets import ImageFolderUnlabeled, say_bit_depth
from fastdino.data.gpu_photometric import geometric_crops
from fastdino.data.masking import MaskingGenerator, max_num_patches_for
from fastdino.data.transforms import CropNeeds, DataAugmentationDINO
from fastdino.rank_logging import EVERY_RANK
from fastdino.stop import ignore_in_worker, reap_workers_at_exit

logger = logging.getLogger("fastdino.data")

# Domain tags keep the seed sequences of the four uses apart.
_PERMUTATION, _AUGMENTATION, _MASKING, _RESOLUTION = 0, 1, 2, 3


def augmentation_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _AUGMENTATION, epoch, index])


def masking_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, _MASKING, step, rank])


class ShardedInfiniteOrder:
    """Which (epoch, dataset index) rank `rank` of `world_size` reads as its k-th sample."""

    def __init__(self, num_images: int, seed: int, rank: int = 0, world_size: int = 1,
                 stream: int = 0) -> None:
        """`stream` > 0: another permutation sequence from the same seed (a second source)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n, self.seed, self.rank, self.world_size = num_images, seed, rank, world_size
        self.stream = stream
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            key = [self.seed, _PERMUTATION, epoch] + ([self.stream] if self.stream else [])
            perm = np.random.default_rng(key).permutation(self.n)
            self._cache = (epoch, perm)
        return self._cache[1]

    def sample(self, k: int) -> tuple[int, int]:
        p = k * self.world_size + self.rank  # global position
        epoch, slot = divmod(p, self.n)
        return epoch, int(self.permutation(epoch)[slot])

    def step(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        return [self.sample(k) for k in range(step * batch_size, (step + 1) * batch_size)]


def resolution_of(seed: int, micro_batch: int, ratios, gas: int = 1) -> int:
    """The crops.resolution_mix entry of the loader's `micro_batch`: drawn from the data seed and
    the optimizer step (micro_batch // gas: the gas micro-batches of a step share one size), not
    the rank, so every rank and every loader (torch, DALI) picks the same one, and a resume too;
    0 without a mix."""
    if len(ratios) == 1:
        return 0
    step = micro_batch // gas
    return int(np.random.default_rng([seed, _RESOLUTION, step]).choice(len(ratios), p=ratios))


class StepsOfResolution:
    """j -> the j-th step from `start` (j = 0, 1, ...) whose resolution is entry `k`: the steps a
    loader of that one resolution serves (DALI keeps one pipeline per entry). Picklable for
    DALI's worker processes; the scan is memoised."""

    def __init__(self, seed: int, ratios, k: int, start: int, gas: int = 1) -> None:
        self.seed, self.ratios, self.k, self.start, self.gas = seed, list(ratios), k, start, gas
        self._steps: list[int] = []
        self._next = start

    def __call__(self, j: int) -> int:
        while len(self._steps) <= j:
            if resolution_of(self.seed, self._next, np.asarray(self.ratios), self.gas) == self.k:
                self._steps.append(self._next)
            self._next += 1
        return self._steps[j]


def build_order(images, cfg: Config, rank: int, world_size: int):
    """The file order of a rank: ShardedInfiniteOrder, or with data.homogeneous_root (images a
    mixing.ConcatImages) the mixing.MixedOrder of both sources."""
    from fastdino.data.mixing import ConcatImages, MixedOrder

    seed = cfg.data.seed
    if not isinstance(images, ConcatImages):
        return ShardedInfiniteOrder(len(images), seed, rank, world_size)
    main = ShardedInfiniteOrder(images.offset, seed, rank, world_size)
    homo = ShardedInfiniteOrder(len(images) - images.offset, seed, rank, world_size, stream=1)
    return MixedOrder(main, homo, seed, cfg.data.homogeneous_ratio,
                      cfg.data.batch_size_per_gpu, images.offset,
                      gas=cfg.deepspeed.gradient_accumulation_steps)  # one source per step


class MultiCropBatches(Dataset):
    """Item `step` = the collated `Batch` of that step for one rank."""

    def __init__(self, images: ImageFolderUnlabeled, cfg: Config, rank: int,
                 world_size: int) -> None:
        self.images = images
        images.log_skipped = False  # workers would each log it; TrainLoader reports once per file
        self.order = build_order(images, cfg, rank, world_size)
        # one (crops, augmentation, mask generator) per resolution of crops.resolution_mix, and
        # its probability; a single one without a mix
        variants = cfg.crops.variants()
        self.ratios = np.array([r for _, r in variants])
        ps = cfg.model.patch_size
        self.variants = [(c, DataAugmentationDINO(c), MaskingGenerator(
            c.global_crops_size // ps,
            max_num_patches=max_num_patches_for(c.global_crops_size, ps))) for c, _ in variants]
        # data.torch_photometric=gpu: workers do the geometry only (PIL), the trainer's device the
        # photometric ops (TrainLoader finishes the RawBatch)
        self.raw = cfg.data.torch_photometric == "gpu"
        # data.jpeg_draft: JPEGs decoded at 1/2, 1/4 or 1/8 where every crop of every resolution
        # keeps at least its output side (CropNeeds); the boxes are drawn from the full size
        # (transforms.crop_resize; gpu_photometric.geometric_crops alike)
        if cfg.data.jpeg_draft:
            needs = CropNeeds.of(c for c, _ in variants)
            for part in getattr(images, "parts", (images,)):  # (mixing.ConcatImages' sources)
                part.draft = needs
        self.batch_size = cfg.data.batch_size_per_gpu
        self.seed, self.rank = cfg.data.seed, rank
        self.gas = cfg.deepspeed.gradient_accumulation_steps  # one resolution per optimizer step
        self.patch_size = cfg.model.patch_size
        self.mask_probability = cfg.ibot.mask_sample_probability
        self.ratio_min_max = cfg.ibot.mask_ratio_min_max

    def __len__(self) -> int:  # only for DataLoader's bookkeeping: the stream is endless
        return 2**62

    def resolution(self, step: int) -> int:
        """The crops.resolution_mix entry of `step` (`resolution_of`)."""
        return resolution_of(self.seed, step, self.ratios, self.gas)

    def sample(self, epoch: int, index: int, variant: int = 0) -> dict:
        crops_cfg, augment, _ = self.variants[variant]
        image, _used, skipped = self.images.load(index)
        rng = augmentation_rng(self.seed, epoch, index)
        if self.raw:
            crops = geometric_crops(image, crops_cfg, rng)
        else:
            crops = augment(image, rng)
        crops["skipped_files"] = skipped
        reasons = getattr(self.images, "skip_reasons", {})
        crops["skipped_reasons"] = tuple(reasons.get(p, "") for p in skipped)
        return crops

    def __getitem__(self, step: int) -> Batch | RawBatch:
        v = self.resolution(step)
        crops_cfg, _, mask_generator = self.variants[v]
        samples = [self.sample(e, i, v) for e, i in self.order.step(step, self.batch_size)]
        if self.raw:
            return collate_raw(samples, self.patch_size, crops_cfg.global_crops_size,
                               masking_rng(self.seed, step, self.rank), mask_generator,
                               mask_probability=self.mask_probability,
                               ratio_min_max=self.ratio_min_max)
        return collate_fn(samples, self.patch_size, masking_rng(self.seed, step, self.rank),
                          mask_probability=self.mask_probability,
                          ratio_min_max=self.ratio_min_max, mask_generator=mask_generator)


class _StepsFrom(Sampler):
    """start, start+1, ... forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _identity(x):
    return x


def _worker_init(worker_id: int) -> None:
    # Augmentation never reads global RNG state; seed it anyway so third-party code in a worker is
    # reproducible, and keep each worker on one thread (workers already give the parallelism).
    info = torch.utils.data.get_worker_info()
    torch.manual_seed(info.seed % 2**63)
    np.random.seed(info.seed % 2**32)
    torch.set_num_threads(1)
    ignore_in_worker()  # stop signals are the main process's (fastdino/stop.py)


class TrainLoader:
    """Iterator of `Batch`; `iteration` is the step of the next batch (the data position)."""

    def __init__(self, batches: MultiCropBatches, num_workers: int, start_iteration: int,
                 pin_memory: bool, finish: Callable[[RawBatch], Batch] | None = None) -> None:
        self.batches = batches
        self.finish = finish  # RawBatch -> Batch (data.torch_photometric=gpu)
        self.iteration = start_iteration
        self.skipped: set[str] = set()  # unreadable files met so far (reported by all workers)
        self._loader = DataLoader(
            batches, batch_size=None, sampler=_StepsFrom(start_iteration), collate_fn=_identity,
            num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=_worker_init,
            prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False,
            # A private generator: starting the iterator must not draw from the global torch RNG
            # (model init, RoPE jitter and drop path read it, and resume restores it exactly).
            generator=torch.Generator().manual_seed(start_iteration))
        self._it = iter(self._loader)

    @property
    def num_images(self) -> int:
        return len(self.batches.images)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        batch = next(self._it)
        if isinstance(batch, RawBatch):
            batch = self.finish(batch)
        self.iteration += 1
        reasons = batch.skipped_reasons or ("",) * len(batch.skipped_files)
        for path, why in zip(batch.skipped_files, reasons, strict=True):
            if path not in self.skipped:
                self.skipped.add(path)
                logger.warning("skipped unreadable image %s (%s%d skipped so far of %d)", path,
                               f"{why}; " if why else "", len(self.skipped), self.num_images,
                               extra=EVERY_RANK)  # this rank's shard: only it sees the file
        return batch


def _naming(key: str, build):
    """`build()`, its source errors naming `key`: the dataset's finder says `data.root` for
    whatever source it is given, and "no images found in ..." names no key at all."""
    try:
        return build()
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        msg = str(e)
        msg = key + msg[len("data.root"):] if msg.startswith("data.root") else f"{key}: {msg}"
        raise type(e)(msg) from None


def build_dataset(cfg: Config, ranks: tuple[int, int] | None = None) -> ImageFolderUnlabeled:
    """The training images of `cfg.data`. `ranks` = (rank, world size) when every rank builds
    it at once (the train loaders): they share the first indexing of tar shards (collective).
    Both sources decode with data.white_level (the datasets carry it into the workers)."""
    d = cfg.data
    wl = d.white_level
    if d.root is not None and d.file_list is not None:
        raise ValueError(f"set only one of data.root={d.root!r} and data.file_list={d.file_list!r}")
    if d.file_list is not None:
        main = ImageFolderUnlabeled(file_list=d.file_list, ranks=ranks, white_level=wl)
    elif d.root is None:
        from fastdino.data.sample_data import sample_images_dir

        root = sample_images_dir()
        logger.info("data.root is not set: using the embedded sample images in %s", root)
        main = ImageFolderUnlabeled(root=root, white_level=wl)
    else:
        main = ImageFolderUnlabeled(root=d.root, ranks=ranks,  # folder, shard or pattern
                                    white_level=wl)
    if d.homogeneous_root is None:
        return main
    from fastdino.data.mixing import ConcatImages

    homogeneous = _naming("data.homogeneous_root",
                          lambda: ImageFolderUnlabeled(root=d.homogeneous_root, ranks=ranks,
                                                       white_level=wl))
    logger.info("data.homogeneous_root: %.0f%% of the steps read only %s (%d images)",
                100 * d.homogeneous_ratio, homogeneous.source, len(homogeneous))
    return ConcatImages(main, homogeneous)


def build_train_loader(cfg: Config, rank: int = 0, world_size: int = 1,
                       start_iteration: int = 0) -> TrainLoader:
    """Infinite iterator of this rank's `Batch`es, starting at step `start_iteration`.

    data.loader: torch -> this loader; dali -> `fastdino.data.dali` (an error if it cannot run);
    auto -> DALI when it is importable and CUDA is present, else this loader."""
    reap_workers_at_exit()  # both loaders' workers ignore the stop signals (fastdino/stop.py)
    if cfg.data.loader in ("dali", "auto"):
        try:  # imported lazily: dali.py builds on this module
            from fastdino.data import dali
        except ImportError as e:
            dali, why = None, f"{type(e).__name__}: {e}"
        if dali is not None and dali.choose_loader(cfg.data.loader) == "dali":
            return dali.build_dali_loader(cfg, rank, world_size, start_iteration)
        if cfg.data.loader == "dali":
            raise RuntimeError(f"DALI loader not available: fastdino.data.dali cannot be imported "
                               f"({why}); set data.loader=torch or auto")
    images = build_dataset(cfg, ranks=(rank, world_size))  # collective: every rank calls this
    logger.info("found %d images in %s (rank %d/%d, %d per step, %d workers, from step %d)",
                len(images), images.source, rank, world_size, cfg.data.batch_size_per_gpu,
                cfg.data.num_workers, start_iteration)
    say_bit_depth(images)  # before the workers fork (they inherit that it was said)
    batches = MultiCropBatches(images, cfg, rank, world_size)
    finish = None
    if cfg.data.torch_photometric == "gpu":
        device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                  else torch.device("cpu"))
        logger.info("torch loader: photometric ops on %s (kernels/photometric.py), the workers "
                    "decode, crop, resize and flip", device)
        if device.type != "cuda":
            logger.warning("data.torch_photometric=gpu without CUDA: the photometric ops run as "
                           "their PyTorch reference in the main process (slower than "
                           "data.torch_photometric=cpu, which spreads them over the workers)")

        def finish(raw: RawBatch) -> Batch:
            return raw.to(device, non_blocking=True).finish(cfg)
    return TrainLoader(batches, cfg.data.num_workers, start_iteration,
                       pin_memory=torch.cuda.is_available(), finish=finish)
