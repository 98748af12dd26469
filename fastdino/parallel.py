"""The student as a DeepSpeed engine (the only file that imports deepspeed), or a plain-torch
stand-in with the same interface when DeepSpeed is not installed or the process was not started by
a distributed launcher (`python fastdino/train.py`, e.g. the GPU benchmark machine).

    dist_info = init_distributed()                  # before building anything
    engine = build_engine(student, groups, cfg, dist_info)
    for i in range(gas):                            # deepspeed.gradient_accumulation_steps
        engine.set_accumulation_boundary(i == gas - 1)
        out = engine(*inputs_i)                     # student forward on micro-batch i
        engine.backward(loss_i)                     # gradients of loss_i / gas, accumulated
    norms = engine.clip_grad_norms(max_norm, losses)  # {"backbone": ..., "dino_head": ..., ...}
                                                    # (+ flags={"stop": ...}: OR over ranks)
    engine.step()                                   # optimizer step + zero_grad
    with engine.full_values(params) as vals: ...    # full fp32 student values (ZeRO-3 / bf16)

Gradient clipping per module (SPEC.md §3.1 step 5). DeepSpeed clips one global norm inside its
ZeRO optimizers, so its `gradient_clipping` is set to 0 and we clip per top-level child of the
student (backbone, dino_head, ibot_head) ourselves, between backward and step:
- each rank reads only the gradient *fragment it owns* after DeepSpeed's reduce(-scatter):
  ZeRO-1/2 `param._hp_mapping.get_lp_grad_fragment(...)` (a view into the partition DeepSpeed
  flattens at step), ZeRO-3 `safe_get_local_grad` (the fp32 partition); the fragments of all
  ranks are disjoint and cover each gradient once;
- the per-module sums of squares [n_modules] are all-reduced (SUM) once → exact global norms;
- each fragment is scaled by min(1, max_norm / (norm + 1e-6)) (torch's clip_grad_norm_ rule) in
  place (ZeRO-1/2) or through `safe_set_local_grad` (ZeRO-3).
The norms returned (and logged as `<module>_grad_norm`) are the pre-clip norms, as the official
`clip_grad_norm_` return value. ZeRO stage 0 (fp32) keeps replicated full `.grad`s: no reduction.
DeepSpeed's own per-step overflow check and global norm, which would repeat this work, are
switched off where DeepSpeed allows it, and bf16 gradients are reduced over ranks in fp32 as the
official code does (`with_step_defaults`).

Gradient accumulation (gas micro-batches per optimizer step). DeepSpeed: `engine.backward`
divides the loss by gas (`scale_wrt_gas=True`, its default); the boundary is set explicitly
before every micro-batch (`set_gradient_accumulation_boundary`, DeepSpeed's documented pattern),
so `engine.step()` is called once per optimizer step and the boundary never depends on
DeepSpeed's micro-step counter (which a checkpoint does not restore). Off the boundary ZeRO-0/1
(and the bf16 optimizer) only accumulate locally; ZeRO-2/3 reduce-scatter every micro-batch into
the owned partition (DeepSpeed's design: the full gradient is never kept). On the boundary, after
the last backward and before `step`, the fragments read above hold the reduced gradient summed
over the micro-batches: the clip sees exactly what the optimizer will use. The plain torch engine
is one process (no gradient all-reduce at all): its `backward` divides by gas and `.grad`s
accumulate until `step` clears them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastdino import dist as fdist
from fastdino.config import Config, ConfigError
from fastdino.ema import module_values
from fastdino.rank_logging import EVERY_RANK

logger = logging.getLogger("fastdino")

try:  # optional: the plain-torch engine below runs without it
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad
except ImportError:  # pragma: no cover - exercised on machines without deepspeed
    deepspeed = None

CLIP_EPS = 1e-6


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    use_deepspeed: bool


def launched_distributed() -> bool:
    """True when a launcher (deepspeed, torchrun) set the rendezvous environment."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(timeout_minutes: float | None = None) -> DistInfo:
    """Start the process group (gloo on CPU, nccl on GPU) when launched by a launcher;
    `timeout_minutes` (deepspeed.timeout_minutes): its collective timeout, None = DeepSpeed's."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    use_ds = deepspeed is not None and launched_distributed()
    if use_ds and not fdist.is_enabled():
        extra = {} if timeout_minutes is None else {
            "timeout": datetime.timedelta(minutes=timeout_minutes)}
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   **extra)
    elif launched_distributed() and not fdist.is_enabled():
        # torchrun without deepspeed: plain torch engine, still one process per rank is
        # not supported (no gradient all-reduce in the plain engine)
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("several ranks need DeepSpeed (pip install deepspeed); the plain "
                               "torch engine runs one process only")
    return DistInfo(fdist.get_rank(), fdist.get_world_size(), local_rank, device, use_ds)


def shutdown_distributed(barrier: bool = True) -> None:
    """End of a distributed run, on every rank: barrier (ZeRO-3 can abort at exit without it),
    destroy the process group, then unlink this rank's DeepSpeed CPU shared-memory all-reduce
    buffer. DeepSpeed's shm comm op (CPU accelerator, 0.19.8) creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (~66 MB) at
    init and never unlinks it, so every CPU run left its buffers in RAM-backed /dev/shm (hundreds
    of runs filled a 24 GB machine). No-op on one process.

    `barrier=False`: a rank that stops on an error the other ranks may not share (a data.root or
    weights file missing on one node only) must not wait for them: they are inside a training
    collective and never reach the barrier, so both would hang until the backend's timeout
    (30 min). It exits instead, and the launcher ends the others (a non-zero exit)."""
    if not fdist.is_enabled():
        return
    with fdist.world():  # every rank, whatever training group is set (the buffer is per rank)
        rank = fdist.get_rank()
        if barrier:
            fdist.barrier()
    fdist.set_group(None)
    torch.distributed.destroy_process_group()
    release_shm_buffer(rank)


def release_shm_buffer(rank: int) -> None:
    """Unlink DeepSpeed's CPU all-reduce buffer of `rank` for this launch, if there is one (the
    other ranks' mappings stay valid until they exit: POSIX unlink semantics)."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype:
    p = cfg.deepspeed.precision
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


# ------------------------------------------------------------------------------- DeepSpeed json


def build_ds_config(cfg: Config, world_size: int, dtype: torch.dtype) -> dict:
    """DeepSpeed json from the yaml, merged with the user's `deepspeed.config_file`.
    A user setting that contradicts the yaml is an error naming both values."""
    B, gas = cfg.data.batch_size_per_gpu, cfg.deepspeed.gradient_accumulation_steps
    ours = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": gas,
        "train_batch_size": B * gas * world_size,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "gradient_clipping": 0.0,  # per-module clipping is ours (module docstring)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.config_file is None:
        return ours
    path = Path(cfg.deepspeed.config_file)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file {str(path)!r} does not exist")
    user = json.loads(path.read_text())
    checks = [  # (user json path, our value, yaml key that decides it)
        (("train_micro_batch_size_per_gpu",), B, "data.batch_size_per_gpu"),
        (("gradient_accumulation_steps",), gas, "deepspeed.gradient_accumulation_steps"),
        (("train_batch_size",), B * gas * world_size,
         "data.batch_size_per_gpu x deepspeed.gradient_accumulation_steps x world size"),
        (("zero_optimization", "stage"), cfg.deepspeed.zero_stage, "deepspeed.zero_stage"),
        (("bf16", "enabled"), dtype == torch.bfloat16, "deepspeed.precision"),
        (("fp16", "enabled"), False, "deepspeed.precision (fp16 is not supported)"),
        (("gradient_clipping",), 0.0, "optim.clip_grad (per-module clipping; leave it 0 here)"),
    ]
    for keys, want, yaml_key in checks:
        node = user
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None and node != want:
            raise ConfigError(
                f"{path}: '{'.'.join(keys)}' = {node!r} conflicts with the yaml ({yaml_key} "
                f"gives {want!r}); remove it from the json or change the yaml")
    if (user.get("zero_optimization") or {}).get("round_robin_gradients"):
        # DeepSpeed (0.19.8) lays the flat buffers out in round-robin order but, without
        # per-parameter padding, maps each parameter's fp32 master (`_hp_mapping`) in group
        # order: safe_get_full_fp32_param, and whatever is built on that mapping (the universal
        # checkpoint's slice mappings, the clip's fragments), read other parameters' values
        raise ConfigError(f"{path}: 'zero_optimization.round_robin_gradients' = true is not "
                          "supported (DeepSpeed maps the fp32 masters to the wrong parameters "
                          "under it); remove it or set it to false")
    for k in ("optimizer", "scheduler"):
        if k in user:
            raise ConfigError(f"{path}: section '{k}' is not allowed: fastdino owns the AdamW "
                              "groups and the schedules (optim.*, schedules.* in the yaml)")
    merged = json.loads(json.dumps(user))
    for k, v in ours.items():
        if isinstance(v, dict):
            merged.setdefault(k, {}).update(v)
        else:
            merged[k] = v
    return merged


def with_step_defaults(ds: dict) -> dict:
    """`ds` (build_ds_config's json) with DeepSpeed's per-step checks off where they duplicate
    ours; a key the user's json sets is kept as set (e.g. `zero_optimization.compute_grad_norm:
    true` restores DeepSpeed's `get_global_grad_norm`, which fastdino never reads).

    DeepSpeed 0.19.8's ZeRO-1/2 optimizer `step()` (zero/stage_1_and_2.py), with clipping 0 and
    bf16, still (1) checks every owned gradient for inf/NaN (amax + amin per tensor, an
    all-reduce and a host read: `bf16.check_grad_overflow`) and (2) computes the global gradient
    norm (an fp64 copy and norm of every owned gradient, an all-reduce and another host read of
    its finiteness: `zero_optimization.compute_grad_norm`). Our clip has already reduced the
    per-module norms and every micro-batch's loss finiteness over all ranks and skipped a
    non-finite step (`clip_grad_norms`, `discard_step`), so both only cost: ~22 bytes read or
    written per owned gradient element (ViT-L on 8 GPUs: ~44M elements, ~1 GB per GPU per step),
    two host syncs, two all-reduces and ~5 kernels per owned gradient tensor. Both are DeepSpeed
    config keys; compute_grad_norm=false is refused where its ZeRO-1 BF16_Optimizer
    (data_types.grad_accum_dtype=fp32), optimizer offload or ZenFlow runs, and by ZeRO-3, whose
    step computes the norm regardless (no switch: ~18 bytes per owned element and one host
    read a step, left as they are) and checks overflow only under fp16."""
    from deepspeed.runtime.config import DtypeEnum
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    ds = json.loads(json.dumps(ds))
    zero = ds.setdefault("zero_optimization", {})
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    if bf16:
        ds["bf16"].setdefault("check_grad_overflow", False)
        # Gradients are summed over ranks in fp32, as the official FSDP2 policy does
        # (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), SPEC.md §3.5). DeepSpeed's
        # default under bf16 is to reduce in bf16: a ring reduction rounds the partial sum at
        # every hop, so at 256 ranks each gradient carries 255 bf16 roundings (a random walk of
        # ~16 half-ulps, a few 1e-2 relative) where fp32 carries one. The cost is 2x the gradient
        # bytes on the wire (ViT-L: 0.7 -> 1.4 GB per rank per step) and an fp32 copy of each
        # bucket; a user json that sets `communication_data_type: bf16` keeps DeepSpeed's way.
        ds.setdefault("communication_data_type", "fp32")
    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's reading (aliases such as cpu_offload)
    offload = (parsed.offload_optimizer is not None
               and parsed.offload_optimizer.device != OffloadDeviceEnum.none)
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    bf16_optimizer = (parsed.stage == 1 and bf16 and accum is not None
                      and DtypeEnum(accum).value == torch.float32)
    if (parsed.stage in (1, 2) and not offload and not bf16_optimizer
            and parsed.zenflow is None and not ds.get("gradient_clipping")):
        zero.setdefault("compute_grad_norm", False)
    return ds


def _adamw(groups: list[dict], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=0.0, fused=device.type == "cuda")


def build_engine(student: nn.Module, groups: list[dict], cfg: Config, info: DistInfo):
    """DeepSpeedStudent when running under DeepSpeed, else TorchStudent."""
    dtype = resolve_precision(cfg, info.device)
    gas = cfg.deepspeed.gradient_accumulation_steps
    if info.use_deepspeed:
        logger.info("engine: DeepSpeed ZeRO-%d, %s, %d rank(s), gradient accumulation %d",
                    cfg.deepspeed.zero_stage, dtype, info.world_size, gas)
        return DeepSpeedStudent(student, groups, cfg, info, dtype)
    if cfg.deepspeed.config_file is not None:
        raise ConfigError("deepspeed.config_file is set but this process runs without DeepSpeed "
                          "(start it with `deepspeed --num_gpus N fastdino/train.py ...`)")
    logger.info("engine: plain torch (one process, no DeepSpeed), %s, gradient accumulation %d",
                dtype, gas)
    return TorchStudent(student, groups, cfg, info, dtype)


# ------------------------------------------------------------------------------------ engines


class _StudentBase:
    module: nn.Module
    dtype: torch.dtype
    zero_stage: int

    def module_params(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters of each top-level child (backbone, dino_head, ibot_head)."""
        return {name: [p for p in child.parameters() if p.requires_grad]
                for name, child in self.module.named_children()}

    def full_values(self, params):
        """Context yielding the full fp32 value of each of `params` (see ema.py)."""
        return module_values(params)

    def _grad_fragments(self, p: nn.Parameter) -> torch.Tensor | None:
        return p.grad

    def _set_fragment(self, p: nn.Parameter, frag: torch.Tensor, scaled: torch.Tensor) -> None:
        frag.copy_(scaled)

    def _fragments_are_partitions(self) -> bool:
        return False

    def clip_grad_norms(self, max_norm: float, finite_check: torch.Tensor | None = None,
                        flags: dict[str, bool] | None = None) -> dict[str, float]:
        """Per-module pre-clip grad norms; scales each module's grads to at most `max_norm`
        (0 = report only). `finite_check` (e.g. the loss): if it is non-finite on any rank, every
        norm returned is NaN and nothing is scaled (the caller discards the step). `flags`: host
        booleans OR-ed over the ranks, written back into the dict (the stop request of
        fastdino/stop.py). Both ride on the norms' reduction and their single host read: no
        separate collective or sync."""
        mods = self.module_params()
        flags = {} if flags is None else flags
        frags = {n: [(p, f) for p in ps if (f := self._grad_fragments(p)) is not None]
                 for n, ps in mods.items()}
        device = next(self.module.parameters()).device
        # [modules, non-finite flag, host flags]
        sq = torch.zeros(len(mods) + 1 + len(flags), dtype=torch.float64, device=device)
        for i, n in enumerate(mods):
            if frags[n]:  # fp32 norms of each fragment, then the sum of squares in fp64
                fn = torch._foreach_norm([f.detach() for _, f in frags[n]], 2, dtype=torch.float32)
                sq[i] = torch.stack(fn).double().pow(2).sum()
        if finite_check is not None:
            sq[len(mods)] = (~torch.isfinite(finite_check.detach())).any().double()
        for j, v in enumerate(flags.values()):
            if v:  # a scalar fill (no copy from the host, no sync); zero needs nothing
                sq[len(mods) + 1 + j] = 1.0
        if self._fragments_are_partitions():
            fdist.all_reduce_sum(sq)  # disjoint fragments: sums of squares add; flags count
        elif (finite_check is not None or flags) and fdist.get_world_size() > 1:
            fdist.all_reduce_max(sq)  # replicated grads: equal sums; flag = any rank
        values = sq.sqrt().tolist()  # one host sync
        norms, bad = values[:len(mods)], values[len(mods)]
        for key, v in zip(list(flags), values[len(mods) + 1:], strict=True):
            flags[key] = v > 0
        if bad > 0:
            return dict.fromkeys(mods, float("nan"))
        if max_norm > 0:
            for i, n in enumerate(mods):
                coef = min(1.0, max_norm / (norms[i] + CLIP_EPS))
                if coef < 1.0 and frags[n]:
                    self._scale_fragments(frags[n], coef)
        return dict(zip(mods, norms, strict=True))

    def _scale_fragments(self, frags: list[tuple[nn.Parameter, torch.Tensor]], coef: float) -> None:
        fs = [f for _, f in frags]  # views into the optimizer's grads: scaled in place
        if all(f.dtype == torch.float32 for f in fs):
            torch._foreach_mul_(fs, coef)
        else:  # the foreach scalar would be rounded to bf16 (~2^-9): scale in fp32 instead
            for f in fs:
                f.copy_(f.float().mul_(coef))

    def discard_step(self) -> None:
        """Step that leaves the parameters unchanged (non-finite gradients): gradients zeroed and
        lr 0 in every group, then the normal step, so DeepSpeed's internal state stays in sync
        (only the Adam moments decay by beta1/beta2 and the Adam step count advances)."""
        for ps in self.module_params().values():
            for p in ps:
                f = self._grad_fragments(p)
                if f is not None:
                    self._set_fragment(p, f, torch.zeros_like(f))
        for g in self.param_groups:
            g["lr"] = 0.0
        self.step()


class TorchStudent(_StudentBase):
    """One process, plain torch AdamW; same interface as DeepSpeedStudent."""

    zero_stage = -1

    def __init__(self, student, groups, cfg, info, dtype):
        self.module = student.to(info.device)
        self.dtype = dtype  # bf16: autocast in __call__ (params stay fp32 master weights)
        self.device = info.device
        self.gas = cfg.deepspeed.gradient_accumulation_steps
        # images per micro-batch, recorded in checkpoints for the data position (a DeepSpeed run
        # of any size, or a run with another batch, may continue this one)
        self.micro_batch_size = cfg.data.batch_size_per_gpu
        self.optimizer = _adamw(groups, cfg, info.device)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.dtype == torch.bfloat16):
            return self.module(*args, **kwargs)

    def set_accumulation_boundary(self, is_last: bool) -> None:
        """Nothing to do: one process, no gradient reduction to schedule."""

    def backward(self, loss: torch.Tensor) -> None:
        # as DeepSpeed's scale_wrt_gas: the accumulated gradient is that of the mean loss
        (loss / self.gas if self.gas > 1 else loss).backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def checkpoint_layout(self) -> dict:
        """How save_checkpoint lays the student out on disk (recorded in the trainer state)."""
        return {"engine": "torch", "zero_stage": None, "precision": _precision_name(self.dtype),
                "optimizer": type(self.optimizer).__name__, "format": FORMAT_TORCH}

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        if fdist.is_main_process():
            torch.save({"module": self.module.state_dict(),
                        "optimizer": self.optimizer.state_dict()},
                       Path(save_dir) / tag / TORCH_ENGINE_FILE)

    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int | None = None,
                        saved_layout: dict | None = None) -> None:
        """Its own checkpoint (torch_engine.pt), or a DeepSpeed one written by any number of ranks:
        ZeRO-0 holds the full AdamW state in its model file (fp32 masters: bf16 runs keep them
        beside it); ZeRO-1/2/3 partitions are read through their universal form
        (`universal_checkpoint`, needs deepspeed installed). `saved_layout`: unused (the files
        say which)."""
        ckpt = Path(load_dir) / tag
        if not (ckpt / TORCH_ENGINE_FILE).is_file():
            if not any(ckpt.glob("*model_states.pt")):
                checkpoint_format(ckpt)  # raises: no engine files at all
            logger.info("checkpoint %s was written by the DeepSpeed engine (%s rank(s)); this run "
                        "uses the plain torch engine", ckpt, saved_world_size or "?")
        if _holds_full_state(ckpt):  # the full AdamW state in one file
            module_state, optim_state = _replicated_state(ckpt, self.device)
            self.module.load_state_dict(module_state)
            self.optimizer.load_state_dict(optim_state)
            return
        if deepspeed is None:
            raise RuntimeError(
                f"{ckpt} was written by the DeepSpeed engine ({saved_world_size or '?'} rank(s), "
                "ZeRO partitions); this run uses the plain torch engine and reading the "
                "partitions needs DeepSpeed: pip install deepspeed, or resume with `deepspeed "
                "--num_gpus N fastdino/train.py ...`")
        zero = universal_checkpoint(ckpt, self.device) / "zero"
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                if not p.requires_grad:  # outside the optimizer: see check_frozen_params
                    continue
                p.copy_(_read_universal(zero / name, "fp32").reshape(p.shape))
                self.optimizer.state[p] = {
                    "step": adam_step_tensor(_read_universal(zero / name, "step"), p,
                                             self.optimizer),
                    **{k: _read_universal(zero / name, k).reshape(p.shape).to(p)
                       for k in ("exp_avg", "exp_avg_sq")}}
        module_state = _module_state(ckpt)  # read once (a full model file) for both
        load_buffers(self.module, ckpt, module_state)
        check_frozen_params(self.module, ckpt, module_state)


class GroupMPU:
    """DeepSpeed's `mpu` for an engine that is data parallel over the ranks of fdist's group (a
    co-distillation student on its own rank range, fdist.split) instead of the world: no model,
    tensor or pipeline parallelism (their groups are this rank alone)."""

    def __init__(self):
        self.dp, self.alone = fdist.get_group(), fdist.self_group()

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.dp)

    def get_data_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.dp)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return torch.distributed.get_process_group_ranks(self.dp)

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return torch.distributed.get_rank()


@contextlib.contextmanager
def deepspeed_collectives_on_group():
    """DeepSpeed (0.19) calls a few collectives without a group, meaning every rank of the job:
    the barriers around save_checkpoint, the all-reduce that checks a checkpoint tag, barriers
    in ZeRO-3's setup. Under fdist's group (a co-distillation student on its own ranks) the job
    is that group: inside this context (engine setup, save, load) those calls take it, so the
    students' checkpoints never wait on each other. (ZeRO-3 also broadcasts from world rank 0
    in its forward: codistill_ranks.check_layout refuses it there.) A no-op without a group."""
    group = fdist.get_group()
    if group is None:
        yield
        return
    import deepspeed.comm as dscomm

    def on_group(fn, pos: int):  # pos: the index of fn's `group` parameter
        def call(*args, **kwargs):
            if len(args) <= pos and kwargs.get("group") is None:
                kwargs["group"] = group
            return fn(*args, **kwargs)
        return call

    saved = {"barrier": dscomm.barrier, "all_reduce": dscomm.all_reduce}
    dscomm.barrier, dscomm.all_reduce = on_group(dscomm.barrier, 0), on_group(dscomm.all_reduce, 2)
    try:
        yield
    finally:
        dscomm.barrier, dscomm.all_reduce = saved["barrier"], saved["all_reduce"]


@dataclass(frozen=True)
class _MasterSlot:
    """Where one trainable parameter's fp32 master lies in its unit (`_master_layout`)."""
    unit: int  # ZeRO-1/2: the param group's flat buffer; ZeRO-3: the sub-group
    offset: int  # ZeRO-1/2: in the whole flat buffer; ZeRO-3: in each rank's partition
    numel: int  # ZeRO-1/2: the parameter's; ZeRO-3: its partition's (partition_numel)
    shape: torch.Size
    full_numel: int


@dataclass
class _MasterLayout:
    slots: dict  # {trainable parameter: _MasterSlot}
    partition: object  # unit -> this rank's fp32 flat partition of it (read at every call)
    world: int
    zero3: bool


class DeepSpeedStudent(_StudentBase):
    """The student wrapped by `deepspeed.initialize` with our param groups and AdamW."""

    def __init__(self, student, groups, cfg, info, dtype):
        self.dtype = dtype
        self.zero_stage = cfg.deepspeed.zero_stage
        self.device = info.device
        ds_config = with_step_defaults(build_ds_config(cfg, info.world_size, dtype))
        student = student.to(info.device)
        student.compute_dtype = dtype  # DeepSpeed casts the module to bf16: cast inputs too
        optimizer = _adamw(groups, cfg, info.device)
        # data parallel over the world, or over fdist's group (a co-distillation student's ranks)
        mpu = GroupMPU() if fdist.get_group() is not None else None
        with deepspeed_collectives_on_group():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=student, optimizer=optimizer, config=ds_config, mpu=mpu)
        self.module = self.engine.module
        self._layout = False  # _master_layout: not built yet
        if self.zero_stage == 3:  # fused blocks read ls1 / norm2 params without calling them
            for m in self.module.modules():
                for p in getattr(m, "external_parameters", list)():
                    deepspeed.zero.register_external_parameter(m, p)

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def set_accumulation_boundary(self, is_last: bool) -> None:
        """Before each micro-batch: True on the last one of the optimizer step (gradients are
        reduced / finalised for the clip and the step), False before (accumulate)."""
        self.engine.set_gradient_accumulation_boundary(is_last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gas (scale_wrt_gas=True)

    def step(self) -> None:
        self.engine.step()

    def full_values(self, params):
        if self.dtype == torch.bfloat16 and self.zero_stage > 0:
            params = list(params)
            layout = self._master_layout()
            if layout is not None and all(p in layout.slots for p in params if p.requires_grad):
                return self._gathered_masters(params, layout)
            return self._master_values_allreduce(params)
        if self.zero_stage == 3:
            return self._gathered_values(list(params))
        if self.dtype == torch.bfloat16:  # ZeRO-0 bf16: replicated fp32 masters beside the module
            masters = self._zero0_masters()
            return module_values([masters.get(p, p) for p in params])
        return module_values(params)

    def _zero0_masters(self) -> dict:
        """ZeRO-0 bf16 (DeepSpeed's FP16_UnfusedOptimizer): {bf16 module parameter: its fp32
        master}. The module holds the bf16 rounding of the master, so the EMA must read the
        master, as under ZeRO-1/2/3 (frozen parameters have none: their module value is all)."""
        opt = self.engine.optimizer
        if not hasattr(opt, "fp32_groups"):
            return {}
        return {p: m for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for p, m in zip(g16, g32, strict=True)}

    @contextlib.contextmanager
    def _gathered_values(self, params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # read only
            yield [p.detach() for p in params]

    def _owned_master_slice(self, p) -> tuple[int, torch.Tensor] | None:
        """(offset in the flattened param, fp32 master slice this rank's optimizer owns)."""
        if self.zero_stage == 3:
            part = safe_get_local_fp32_param(p)
            if part is None:
                return None
            start = part.numel() * p._z3_optimizer._get_param_partition_rank(p)
            n = min(part.numel(), p.ds_numel - start)  # the last partition is padded
            return (start, part.view(-1)[:n]) if n > 0 else None
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1)

    @contextlib.contextmanager
    def _master_values_allreduce(self, params):
        """The fp32 masters of `params`: owned slices placed in a zero buffer, summed over ranks
        (each element has exactly one owner, so the sum is exact). The fallback of
        `_gathered_masters` (2x its traffic, a memset and a per-parameter loop), for optimizer
        layouts `_master_layout` does not know, and its reference in the tests."""
        numels = [p.ds_numel if self.zero_stage == 3 else p.numel() for p in params]
        flat = torch.zeros(sum(numels), dtype=torch.float32, device=self.device)
        offset = 0
        for p, n in zip(params, numels, strict=True):
            owned = self._owned_master_slice(p) if p.requires_grad else None
            if owned is not None:
                start, vals = owned
                flat[offset + start: offset + start + vals.numel()].copy_(vals)
            elif not p.requires_grad:  # frozen params are not in the optimizer: replicated
                with self._gathered_values([p]) if self.zero_stage == 3 else \
                        contextlib.nullcontext():
                    if fdist.is_main_process():
                        flat[offset: offset + n].copy_(p.detach().reshape(-1))
            offset += n
        fdist.all_reduce_sum(flat)
        shapes = [p.ds_shape if self.zero_stage == 3 else p.shape for p in params]
        yield [v.view(s) for v, s in zip(flat.split(numels), shapes, strict=True)]

    # --------------------------------------------------------- fp32 masters by all-gather (bf16)

    def value_units(self, params) -> list[int] | None:
        """For each of `params`, the flat fp32 partition (`_master_layout`) `full_values` gathers
        whole to read it (None for a frozen parameter), or None when `full_values` does not
        gather by units: ema.EMAPlan keeps the parameters of one unit in one chunk, so no unit
        is gathered twice per step."""
        if self.dtype != torch.bfloat16 or self.zero_stage == 0:
            return None
        layout = self._master_layout()
        if layout is None:
            return None
        slots = [layout.slots.get(p) for p in params]
        if any(s is None and p.requires_grad for s, p in zip(slots, params, strict=True)):
            return None
        return [None if s is None else s.unit for s in slots]

    def _master_layout(self) -> _MasterLayout | None:
        """Where each trainable parameter's fp32 master lies in the optimizer's flat fp32
        partitions, built once (the layout never changes after `deepspeed.initialize`; collective
        the first time), or None for an optimizer this does not know (then
        `_master_values_allreduce`), on every rank alike. Every rank holds
        an equal-sized, contiguous partition of each unit, in rank order of fdist's group, so
        one all-gather of a unit's partitions is the whole unit."""
        if self._layout is False:
            try:
                built = self._build_master_layout()
            except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
                logger.warning("full_values: reading DeepSpeed's layout failed: %s", e)
                built = None  # another DeepSpeed version's internals: the fallback is exact
            # every rank must take the same path (all-gathers here, an all-reduce there would
            # pair wrong collectives): one rank's unknown layout sends all to the fallback
            failed = torch.tensor([float(built is None)], device=self.device)
            if fdist.all_reduce_max(failed).item() > 0:
                built = None
            if built is None:
                logger.warning("full_values: unknown DeepSpeed optimizer layout (%s): the fp32 "
                               "masters are read through an all-reduce (2x the traffic)",
                               type(self.engine.optimizer).__name__)
            self._layout = built
        return self._layout

    def _build_master_layout(self) -> _MasterLayout | None:
        opt, ranks = self.engine.optimizer, fdist.group_ranks()

        def same_group(g) -> bool:  # DeepSpeed's partition group is fdist's, in the same order
            try:
                return torch.distributed.get_process_group_ranks(g) == ranks
            except (ValueError, RuntimeError, AttributeError, TypeError):
                return False

        if self.zero_stage == 3:
            return self._build_zero3_layout(opt, same_group)
        if hasattr(opt, "bit16_groups_flat"):  # DeepSpeedZeroOptimizer (ZeRO-1/2)
            flats, name = opt.bit16_groups_flat, "single_partition_of_fp32_groups"
        elif hasattr(opt, "bf16_groups_flat"):  # BF16_Optimizer (ZeRO-1, fp32 grad accumulation)
            flats, name = opt.bf16_groups_flat, "fp32_groups_flat_partition"
        else:
            return None
        parts, world, rank = getattr(opt, name), len(ranks), fdist.get_rank()
        groups = getattr(opt, "real_dp_process_group", None)
        if groups is None or not len(flats) == len(parts) == len(groups):
            return None
        # each rank's partition: [rank·P, (rank + 1)·P) of the flat bf16 buffer, P equal on every
        # rank (the flat is padded to a multiple of 2·world), padding included
        for flat, part, group in zip(flats, parts, groups, strict=True):
            if (part.dtype != torch.float32 or part.numel() * world != flat.numel()
                    or not same_group(group)):
                return None
        # the offsets DeepSpeed laid the flat buffers out with (ZeRO-1/2: round-robin order
        # included; BF16_Optimizer: none kept, its `_hp_mapping`s agree with the flat order)
        laid = {id(q): off for grp, offs in zip(getattr(opt, "round_robin_bit16_groups", []),
                                                getattr(opt, "round_robin_bit16_offsets", []),
                                                strict=True) for q, off in zip(grp, offs,
                                                                               strict=True)}
        by_storage = {f.untyped_storage().data_ptr(): i for i, f in enumerate(flats)}
        slots = {}
        for p in self.module.parameters():
            if not p.requires_grad or p.numel() == 0:
                continue
            i = by_storage.get(p.untyped_storage().data_ptr())
            if i is None or not p.is_contiguous():
                return None
            delta = p.data_ptr() - flats[i].data_ptr()  # p is a view into the flat buffer
            offset = delta // p.element_size()
            if delta % p.element_size() or offset < 0 or offset + p.numel() > flats[i].numel():
                return None
            if laid:
                if laid.get(id(p)) != offset:
                    return None
            else:  # this rank's fragment as the optimizer maps it agrees with the layout
                m = getattr(p, "_hp_mapping", None)
                if m is not None and (m.hp_fragment_address.start + rank * parts[i].numel()
                                      != offset + m.lp_fragment_address.start):
                    return None
            slots[p] = _MasterSlot(i, offset, p.numel(), p.shape, p.numel())
        return _MasterLayout(slots, lambda i: getattr(opt, name)[i], world, zero3=False)

    def _build_zero3_layout(self, opt, same_group) -> _MasterLayout | None:
        """ZeRO-3: parameter p's rank-r partition (partition_numel elements, the last rank's
        padded) is elements [r·n, (r + 1)·n) of p; each sub-group's fp32 flat partition is its
        parameters' partitions back to back (`grad_position`: sub-group, offset, n)."""
        needed = ("fp16_groups", "fp32_partitioned_groups_flat", "grad_position", "get_param_id")
        if not all(hasattr(opt, a) for a in needed):
            return None
        flats, world = opt.fp32_partitioned_groups_flat, fdist.get_world_size()
        swappable = getattr(opt, "_swappable_optimizer_subgroup", lambda g: False)
        slots = {}
        for g, params in enumerate(opt.fp16_groups):
            if swappable(g) or flats[g].dtype != torch.float32:  # NVMe: not in memory
                return None
            used = 0
            for p in params:
                unit, offset, n = opt.grad_position[opt.get_param_id(p)]
                if (unit != g or n != p.partition_numel() or n * world < p.ds_numel
                        or not same_group(opt._get_param_partition_group(p))):
                    return None
                slots[p] = _MasterSlot(g, offset, n, p.ds_shape, p.ds_numel)
                used += n
            if used != flats[g].numel():
                return None
        if any(p.requires_grad and p not in slots for p in self.module.parameters()):
            return None
        return _MasterLayout(slots, lambda g: opt.fp32_partitioned_groups_flat[g], world,
                             zero3=True)

    @contextlib.contextmanager
    def _gathered_masters(self, params, layout: _MasterLayout):
        """The fp32 masters of `params`: each unit they lie in all-gathered once into a fresh
        buffer (half the bytes of `_master_values_allreduce`'s all-reduce, no memset); ZeRO-1/2
        values are views into it (the flat layout is the parameters'), ZeRO-3 values one copy
        each out of the [world, partition] rows. Frozen parameters (not in the optimizer) as
        today: replicated, read locally (gathered under ZeRO-3), identical on every rank."""
        units = list(dict.fromkeys(layout.slots[p].unit for p in params if p.requires_grad))
        full = {}
        for u in units:
            part = layout.partition(u).to(self.device)  # an offloaded optimizer's: on the host
            out = torch.empty(layout.world * part.numel(), dtype=torch.float32,
                              device=self.device)
            full[u] = fdist.all_gather_into(out, part)
        frozen = [p for p in params if not p.requires_grad]
        with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None) \
                if layout.zero3 and frozen else contextlib.nullcontext():
            values = {p: p.detach().to(torch.float32, copy=layout.zero3) for p in frozen}
        out = []
        for p in params:
            if not p.requires_grad:
                out.append(values[p])
                continue
            s = layout.slots[p]
            if layout.zero3:  # rows: ranks; columns [offset, offset + n): p's partitions
                v = full[s.unit].view(layout.world, -1).narrow(1, s.offset, s.numel)
                out.append(v.reshape(-1)[:s.full_numel].view(s.shape))
            else:
                out.append(full[s.unit].narrow(0, s.offset, s.numel).view(s.shape))
        del full  # ZeRO-3: the copies are all that is left
        yield out

    def _fragments_are_partitions(self) -> bool:
        return self.zero_stage > 0

    def _grad_fragments(self, p):
        if self.zero_stage == 3:
            return safe_get_local_grad(p)
        if self.zero_stage == 0:
            return p.grad
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this rank owns no slice of p
            return None
        frag = mapping.get_lp_grad_fragment(p._index_in_param_group)
        addr = mapping.lp_fragment_address
        if frag.numel() == p.numel() and addr.numel != p.numel():
            frag = frag.view(-1).narrow(0, addr.start, addr.numel)  # bf16 full-buffer case
        return frag

    def _set_fragment(self, p, frag, scaled):
        if self.zero_stage == 3:
            safe_set_local_grad(p, scaled)
        else:
            frag.copy_(scaled)

    def _scale_fragments(self, frags, coef):
        if self.zero_stage == 3:  # local fp32 partitions may be copies: write them back
            for p, f in frags:
                safe_set_local_grad(p, f * coef)
        else:
            super()._scale_fragments(frags, coef)

    @property
    def micro_batch_size(self) -> int:
        """Images per rank per micro-batch (recorded in checkpoints for the data position)."""
        return self.engine.train_micro_batch_size_per_gpu()

    @property
    def checkpoint_layout(self) -> dict:
        """How save_checkpoint lays the student out on disk (recorded in the trainer state): the
        ZeRO stage and DeepSpeed's optimizer wrapper decide the files and what they hold."""
        opt, precision = type(self.engine.optimizer).__name__, _precision_name(self.dtype)
        if opt == "BF16_Optimizer":  # ZeRO-1 bf16 with fp32 gradient accumulation (user json)
            fmt = FORMAT_BF16_OPTIMIZER
        elif self.zero_stage > 0:
            fmt = _zero_format(self.zero_stage, precision == "bf16")
        else:  # ZeRO-0: torch's AdamW (fp32), or DeepSpeed's FP16_UnfusedOptimizer around it
            fmt = FORMAT_ZERO0 if self.engine.optimizer is self.engine.basic_optimizer \
                else FORMAT_ZERO0_WRAPPED
        return {"engine": "deepspeed", "zero_stage": self.zero_stage, "precision": precision,
                "optimizer": opt, "format": fmt}

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        with deepspeed_collectives_on_group():
            self.engine.save_checkpoint(save_dir, tag=tag, save_latest=False)

    def load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int | None = None,
                        saved_layout: dict | None = None) -> None:
        """Collective. DeepSpeed's own loader reads only what this engine would have written: the
        same data-parallel size and the same layout (`checkpoint_format`: ZeRO-1 and 2 share one;
        ZeRO-3, ZeRO-0 and the plain torch engine each their own; a ZeRO-0 engine keeps the full
        optimizer state, so any size). Otherwise DeepSpeed fails (ZeRO partitions of another
        world size: ZeRORuntimeException; ZeRO-3 <-> 1/2: an assertion in its state-dict
        factory) or, worse, silently restarts the AdamW moments (no partition files of its
        kind: ZeRO-0 -> 1/2), so the checkpoint is converted once into a universal checkpoint
        (per-parameter fp32 master, exp_avg, exp_avg_sq, step: `<ckpt>/universal/`, see
        `universal_checkpoint`) and loaded with DeepSpeed's universal loader, which partitions it
        for this world and stage. A ZeRO-0 engine (DeepSpeed has no universal loader for it) is
        given the full state directly (`_load_full_state`). `saved_layout`: the writer's
        `checkpoint_layout` from the trainer state (None in older checkpoints: the files say)."""
        with deepspeed_collectives_on_group():
            self._load_checkpoint(load_dir, tag, saved_world_size, saved_layout)

    def _load_checkpoint(self, load_dir: str, tag: str, saved_world_size: int | None,
                         saved_layout: dict | None) -> None:
        ckpt = Path(load_dir) / tag
        saved = (saved_layout or {}).get("format") or checkpoint_format(ckpt)
        fmt, world = self.checkpoint_layout["format"], fdist.get_world_size()
        replicated_here = fmt in REPLICATED_FORMATS
        if saved == fmt and (replicated_here or saved_world_size in (None, world)):
            path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {load_dir}")
            return
        writer = (f"{saved_world_size or '?'} DeepSpeed rank(s), {saved}" if saved
                  != FORMAT_TORCH else "the plain torch engine")
        if replicated_here:
            logger.info("checkpoint %s was written by %s; this run is %s on %d rank(s): loading "
                        "the full optimizer state", ckpt, writer, fmt, world)
            self._load_full_state(ckpt, saved)
            return
        uni = universal_checkpoint(ckpt, self.device)
        logger.info("checkpoint %s was written by %s; this run is %s on %d rank(s): loading its "
                    "universal form %s (ZeRO-%d partitions built for %d ranks)", ckpt, writer,
                    fmt, world, uni, self.zero_stage, world)
        cfg = self.engine._config  # DeepSpeed reads the flag at load time only
        before = cfg.load_universal_checkpoint
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        cfg.load_universal_checkpoint = True
        try:
            path, _ = self.engine.load_checkpoint(str(uni.parent), tag=uni.name,
                                                  load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        finally:
            cfg.load_universal_checkpoint = before
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {uni}")
        # DeepSpeed 0.19.8's ZeRO-3 universal loader copies group 0's keys into every param
        # group: our per-group lr_multiplier / wd_multiplier / is_last_layer would all become
        # those of group 0. They are a function of the model and config (lr and weight_decay are
        # rewritten from the schedules every step), so ours are put back, for every stage.
        for g, mine in zip(self.param_groups, groups, strict=True):
            g.update(mine)
        self._fix_adam_steps()
        module_state = _module_state(ckpt)  # read once for both
        load_buffers(self.module, ckpt, module_state)
        check_frozen_params(self.module, ckpt, module_state,
                            gather=self._gathered_values if self.zero_stage == 3 else None)

    def _load_full_state(self, ckpt: Path, saved: str) -> None:
        """A ZeRO-0 engine (replicated: torch's AdamW, in bf16 inside DeepSpeed's
        FP16_UnfusedOptimizer with fp32 masters) from a checkpoint of another layout: the full
        module and AdamW state of a replicated checkpoint (the plain torch engine's, or ZeRO-0 of
        the other precision), or each parameter's from the universal form of ZeRO partitions."""
        opt = self.engine.optimizer
        base = opt.optimizer if hasattr(opt, "fp32_groups") else opt  # torch AdamW either way
        if not isinstance(base, torch.optim.Optimizer):
            raise RuntimeError(f"{ckpt} ({saved}) cannot be loaded into this run's DeepSpeed "
                               f"ZeRO-0 optimizer {type(opt).__name__}: resume with "
                               "deepspeed.zero_stage>=1")
        if saved in REPLICATED_FORMATS:
            module_state, optim_state = _replicated_state(ckpt, self.device)
            self.module.load_state_dict(module_state)  # (cast to bf16 in a bf16 engine)
            masters = module_state
        else:
            zero = universal_checkpoint(ckpt, self.device) / "zero"
            masters, optim_state = _full_state_from_universal(zero, base.param_groups)
            module_state = _module_state(ckpt)
            load_buffers(self.module, ckpt, module_state)
        base.load_state_dict(optim_state)
        with torch.no_grad():
            for gi, g in enumerate(base.param_groups):
                for i, (name, master) in enumerate(zip(g["names"], g["params"], strict=True)):
                    master.copy_(masters[name].reshape(master.shape))
                    if hasattr(opt, "fp16_groups"):  # the bf16 compute copy of the master
                        opt.fp16_groups[gi][i].copy_(master)
        if saved not in REPLICATED_FORMATS:
            check_frozen_params(self.module, ckpt, module_state)

    def _fix_adam_steps(self) -> None:
        """DeepSpeed 0.19.8's ZeRO-3 universal loader gives every sub-group's AdamW state the
        *same* `step` tensor, which torch's AdamW then increments in place once per sub-group
        per step (2 -> 16 after one step with 14 groups: wrong bias corrections). Each state
        gets its own step tensor."""
        base = self.engine.optimizer.optimizer  # torch AdamW under the ZeRO optimizer
        for p, st in base.state.items():
            if "step" in st:
                st["step"] = adam_step_tensor(st["step"], p, base)


TORCH_ENGINE_FILE = "torch_engine.pt"
UNIVERSAL_DIR = "universal"
_MODEL_FILES = ("mp_rank_00_model_states.pt",  # what DeepSpeed's universal loader reads:
                "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3
# on-disk layouts of the student (`checkpoint_layout()["format"]`): DeepSpeed's own loader reads
# only its own (0.19.8: ZeRO partitions of the other precision, named bf16_zero_pp_rank_* in
# bf16 and zero_pp_rank_* in fp32, are not found); any two are bridged by the universal form
# (or, for ZeRO-0, the full state)
FORMAT_TORCH = "torch"  # torch_engine.pt: module + torch AdamW state
FORMAT_ZERO0 = "zero0"  # mp_rank_00_model_states.pt: module + torch AdamW state
FORMAT_ZERO0_WRAPPED = "zero0-bf16"  # the same, AdamW inside FP16_UnfusedOptimizer (fp32 masters)
# "zero1-2" ([bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt partitions), "zero3" (also
# zero_pp_rank_<r>_mp_rank_00_model_states.pt), each with "-bf16" in bf16: _zero_format
FORMAT_BF16_OPTIMIZER = "bf16-optimizer"  # ZeRO-1/2 bf16 file names, DeepSpeed's BF16_Optimizer
REPLICATED_FORMATS = (FORMAT_TORCH, FORMAT_ZERO0, FORMAT_ZERO0_WRAPPED)


def _zero_format(stage: int, bf16: bool) -> str:
    return ("zero3" if stage == 3 else "zero1-2") + ("-bf16" if bf16 else "")


def _precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _holds_full_state(ckpt: Path) -> bool:
    """The checkpoint holds the whole AdamW state in one file (REPLICATED_FORMATS)."""
    return (ckpt / TORCH_ENGINE_FILE).is_file() or (
        (ckpt / "mp_rank_00_model_states.pt").is_file() and not any(ckpt.glob("*zero_pp_rank_*")))


def checkpoint_format(ckpt: Path) -> str:
    """The layout of checkpoint `ckpt`'s student files, read from the files themselves (for
    checkpoints that predate `engine_layout` in the trainer state). ZeRO-1/2 partitions of
    DeepSpeed's BF16_Optimizer have the same names as the ZeRO optimizer's in bf16: taken as
    "zero1-2-bf16"."""
    ckpt = Path(ckpt)
    if (ckpt / TORCH_ENGINE_FILE).is_file():
        return FORMAT_TORCH
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        return _zero_format(3 if any(ckpt.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")) else 1,
                            any(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt")))
    model = ckpt / "mp_rank_00_model_states.pt"
    if model.is_file():  # ZeRO-0: its optimizer state says which
        opt = torch.load(model, map_location="cpu", weights_only=True).get("optimizer")
        return FORMAT_ZERO0_WRAPPED if isinstance(opt, dict) and "fp32_groups" in opt \
            else FORMAT_ZERO0
    raise FileNotFoundError(f"{ckpt}: neither DeepSpeed checkpoint files (*model_states.pt) nor "
                            f"{TORCH_ENGINE_FILE} (plain torch engine)")


def _replicated_state(ckpt: Path, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(module state, torch AdamW state dict) of a checkpoint that holds the full optimizer state
    (REPLICATED_FORMATS). The module state's trainable entries are the fp32 masters: a bf16
    ZeRO-0 engine keeps them in its optimizer (`fp32_groups`, in the order of the AdamW groups'
    `names`), beside the bf16 module."""
    if (ckpt / TORCH_ENGINE_FILE).is_file():
        sd = torch.load(ckpt / TORCH_ENGINE_FILE, map_location=device, weights_only=True)
        return sd["module"], sd["optimizer"]
    sd = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location=device, weights_only=True)
    module, opt = dict(sd["module"]), sd["optimizer"]
    if not isinstance(opt, dict):
        raise FileNotFoundError(f"{ckpt}: the DeepSpeed model file holds no optimizer state "
                                "(and there are no ZeRO partition files)")
    if "fp32_groups" in opt:  # DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 bf16)
        from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

        masters, opt = opt["fp32_groups"], opt[OPTIMIZER_STATE_DICT]
        for g, group_masters in zip(opt["param_groups"], masters, strict=True):
            for name, m in zip(g["names"], group_masters, strict=True):
                module[name] = m.detach().float()
    return module, opt


def _full_state_from_universal(zero: Path, groups: list[dict]) -> tuple[dict, dict]:
    """({name: fp32 master}, torch AdamW state dict for `groups`, the optimizer's own groups) from
    a universal checkpoint's per-parameter files."""
    masters, state, saved_groups, idx = {}, {}, [], 0
    for g in groups:
        ids = []
        for name, p in zip(g["names"], g["params"], strict=True):
            masters[name] = _read_universal(zero / name, "fp32").reshape(p.shape)
            state[idx] = {"step": _read_universal(zero / name, "step").float().reshape(()),
                          **{k: _read_universal(zero / name, k).reshape(p.shape)
                             for k in ("exp_avg", "exp_avg_sq")}}
            ids.append(idx)
            idx += 1
        saved_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    return masters, {"state": state, "param_groups": saved_groups}


def adam_step_tensor(value, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A fresh AdamW `step`, placed as torch keeps it: on the parameter's device when fused /
    capturable, else a CPU float32 scalar."""
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    return torch.tensor(float(value), dtype=torch.float32,
                        device=param.device if on_device else "cpu")


def _module_state(ckpt: Path) -> dict:
    """The full module state (weights + buffers) of a checkpoint written by either engine
    (DeepSpeed's model file: ZeRO-3 keeps only the buffers full there)."""
    if (ckpt / TORCH_ENGINE_FILE).is_file():
        return torch.load(ckpt / TORCH_ENGINE_FILE, map_location="cpu", weights_only=True)["module"]
    f = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))[0]
    return torch.load(f, map_location="cpu", weights_only=True)["module"]


def load_buffers(module: nn.Module, ckpt: Path, sd: dict | None = None) -> None:
    """The universal loader restores parameters only: buffers (RoPE periods, qkv bias masks)
    are read from the original checkpoint's module state (`sd`: already read)."""
    sd = _module_state(ckpt) if sd is None else sd
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in sd:
                buf.copy_(sd[name].to(buf.dtype))


def _frozen_in_checkpoint(ckpt: Path, sd: dict) -> dict[str, torch.Tensor]:
    """Full saved values by name: the module state's (the torch engine, ZeRO-0/1/2 hold every
    parameter in full there), and for ZeRO-3, whose module state holds placeholders, the frozen
    parameters reassembled from every rank's `frozen_param_fragments` (zero_to_fp32's rule)."""
    out = dict(sd)
    files = sorted(ckpt.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                   key=lambda f: int(f.name.split("_")[3]))
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    shapes = (states[0].get("frozen_param_shapes") or {}) if states else {}
    for name, shape in shapes.items():
        frags = torch.cat([st["frozen_param_fragments"][name].reshape(-1) for st in states])
        out[name] = frags[:math.prod(shape)].view(tuple(shape))
    return out


def check_frozen_params(module: nn.Module, ckpt: Path, sd: dict | None = None,
                        gather=None) -> None:
    """Frozen parameters (`optim.frozen_blocks`, requires_grad False) are not in the optimizer,
    so a universal checkpoint has no state for them: a run resumed through one keeps the values
    it was built with (`model.pretrained_weights`, or the seeded init), which are the values
    they held when the checkpoint was written, as they never train. Checked against the
    checkpoint (`_frozen_in_checkpoint`, every ZeRO stage): a run rebuilt from other weights is
    an error, not a silent mix. `sd`: the checkpoint's module state, when already read;
    `gather`: for a partitioned (ZeRO-3) module, a context giving full values (collective)."""
    saved = _frozen_in_checkpoint(ckpt, _module_state(ckpt) if sd is None else sd)
    # the frozen parameters the checkpoint holds in full (ZeRO-3's placeholders are not)
    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad and n in saved
              and saved[n].numel() == getattr(p, "ds_numel", p.numel())]
    partitioned = [(n, p) for n, p in frozen if p.numel() != saved[n].numel()]
    if partitioned and gather is None:  # nothing to gather them with: not checked
        frozen = [(n, p) for n, p in frozen if p.numel() == saved[n].numel()]
        partitioned = []
    with (gather([p for _, p in partitioned]) if partitioned else contextlib.nullcontext([])) \
            as full:
        values = dict(zip([n for n, _ in partitioned], full, strict=True))
        for name, p in frozen:
            value = values.get(name, p.detach())
            if value.numel() != saved[name].numel() or not _equal_at_coarser(
                    saved[name].to(value.device).view(value.shape), value):
                raise ValueError(
                    f"{ckpt}: frozen parameter {name!r} (optim.frozen_blocks) differs from the "
                    "value this run was built with: resume with the model.pretrained_weights "
                    "(and train.seed) of the run that wrote the checkpoint")


def _equal_at_coarser(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal once both are rounded to the coarser of their dtypes: a bf16 run saves its frozen
    parameters in bf16, a fp32 run resumed from it holds them in fp32 (the same values)."""
    if a.dtype != b.dtype and a.is_floating_point() and b.is_floating_point():
        low = a.dtype if torch.finfo(a.dtype).eps > torch.finfo(b.dtype).eps else b.dtype
        a, b = a.to(low), b.to(low)
    return torch.equal(a, b.to(a.dtype))


def _read_universal(param_dir: Path, key: str) -> torch.Tensor:
    """One state of one parameter in a universal checkpoint: ZeRO-1/2 files hold {"param": full
    tensor, "cat_dim": 0}, ZeRO-3 files the flat tensor, step.pt a scalar tensor."""
    f = param_dir / f"{key}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: the universal checkpoint has no {key!r} for "
                                f"parameter {param_dir.name!r} (model and checkpoint differ?)")
    obj = torch.load(f, map_location="cpu", weights_only=True)
    return obj["param"] if isinstance(obj, dict) else obj


def universal_checkpoint(ckpt: Path, device: torch.device) -> Path:
    """Collective. `<ckpt>/universal`: DeepSpeed's universal form of checkpoint `ckpt`
    (per parameter: fp32 master, exp_avg, exp_avg_sq, step), which DeepSpeed's universal loader
    partitions for any number of ranks and any ZeRO stage (`_make_any_stage`). Written by rank 0
    the first time, reused after: a ZeRO checkpoint through deepspeed.checkpoint.ds_to_universal,
    one holding the full AdamW state (torch_engine.pt, ZeRO-0) by `_universal_from_torch`.
    Atomic: written into `<ckpt>/.universal.partial/`, fsync'ed, renamed (its presence =
    complete); derived data (delete it to convert again). A universal form converted before it
    was made readable by every stage is completed in place. Every rank must see `ckpt` (a shared
    filesystem)."""
    from fastdino.checkpoint import fsync_tree

    out = ckpt / UNIVERSAL_DIR
    err = ""
    failed_mark = ckpt / ".universal.failed"
    convert = fdist.is_main_process() and not (out / ANY_STAGE_MARK).is_file()
    if convert:
        failed_mark.unlink(missing_ok=True)  # an earlier attempt's
    fdist.barrier()  # (quick) no rank reads a stale failure mark below
    if convert:
        partial = ckpt / ".universal.partial"
        try:
            if out.is_dir():  # converted by an earlier fastdino: readable by its own stage only
                _make_any_stage(out)
                fsync_tree(out)
            else:
                if partial.exists():  # a conversion killed half-way
                    shutil.rmtree(partial)
                if _holds_full_state(ckpt):
                    _universal_from_torch(ckpt, partial / UNIVERSAL_DIR)
                else:
                    _convert_to_universal(ckpt, partial / UNIVERSAL_DIR)
                _make_any_stage(partial / UNIVERSAL_DIR)
                fsync_tree(partial)
                os.rename(partial / UNIVERSAL_DIR, out)
                shutil.rmtree(partial)  # ds_to_universal also wrote partial/latest_universal
        except Exception as e:  # every rank raises below, none hangs in a collective
            err = f"{type(e).__name__}: {e}"
            logger.error("universal conversion of %s failed: %s", ckpt, err)
            failed_mark.write_text(err)
    elif not fdist.is_main_process():
        _wait_for_conversion(out / ANY_STAGE_MARK, failed_mark)
    failed = fdist.all_reduce_max(torch.tensor([1.0 if err else 0.0], device=device))
    if failed.item() > 0:
        raise RuntimeError(
            f"could not convert {ckpt} (written by another number of ranks, ZeRO stage or "
            f"engine) into a universal checkpoint in {out}: "
            f"{err or 'failed on rank 0 (see its log)'}. The directory must be writable (copy the "
            "checkpoint directory somewhere writable and resume from there), or resume with the "
            "ranks, ZeRO stage and engine that wrote it")
    return out


ANY_STAGE_MARK = "any_stage"  # in a universal dir: `_make_any_stage` completed


def _wait_for_conversion(done: Path, failed: Path, poll_s: float = 2.0) -> None:
    """The other ranks wait for rank 0's conversion on the shared filesystem, not in a
    collective: a 7B checkpoint (~80 GB of masters and moments) takes longer than the process
    group's timeout (DeepSpeed's default 10 min), and ranks waiting in the all-reduce would be
    killed by the NCCL watchdog while rank 0 was still writing. Rank 0 writes `done` (the
    universal form's completion mark) or `failed` (its error); if rank 0 dies, the launcher
    ends this rank."""
    t0 = last = time.monotonic()
    while not done.is_file() and not failed.is_file():
        time.sleep(poll_s)
        if time.monotonic() - last > 60:
            last = time.monotonic()
            if fdist.get_rank() == 1:  # one line for all the waiting ranks (rank_logging)
                logger.warning("waiting for rank 0 to convert the checkpoint into %s (%.0f min "
                               "so far)", done.parent, (last - t0) / 60, extra=EVERY_RANK)


def _save_replacing(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _make_any_stage(uni: Path) -> None:
    """Make universal dir `uni` readable by DeepSpeed's universal loaders of every stage
    (0.19.8), whatever stage wrote it: ds_to_universal writes only what the writer's own stage
    reads back. ZeRO-1/2's loader reads `mp_rank_00_model_states.pt`, per-parameter files
    {"param": tensor of the parameter's shape, "cat_dim": 0} and `ds_version` in
    zero/optimizer_state.pt; ZeRO-3's reads `zero_pp_rank_0_mp_rank_00_model_states.pt`
    (metadata only: the weights come from zero/) and the step from zero/optimizer_state.pt's
    `optimizer_state_dict`; ZeRO-3 output has flat per-parameter tensors. Idempotent (each
    file replaced whole), marked done by ANY_STAGE_MARK."""
    from deepspeed.checkpoint.constants import CAT_DIM, OPTIMIZER_STATE_DICT, PARAM

    have = [uni / f for f in _MODEL_FILES if (uni / f).is_file()]
    if not have:
        raise FileNotFoundError(f"{uni}: no DeepSpeed model file ({' or '.join(_MODEL_FILES)})")
    from_zero3 = have[0].name == _MODEL_FILES[1]
    for f in _MODEL_FILES:  # the same metadata under both names (DeepSpeed reads one of them)
        if not (uni / f).is_file():
            try:
                os.link(have[0], uni / f)
            except OSError:
                shutil.copy2(have[0], uni / f)
    zero = uni / "zero"
    if from_zero3:  # flat per-parameter tensors: shaped, as ZeRO-1/2's loader reads them
        meta = torch.load(have[0], map_location="cpu", weights_only=True)
        shapes = {n: tuple(s) for g in meta.get("param_shapes") or [] for n, s in g.items()}
        for name, shape in shapes.items():
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                f = zero / name / f"{key}.pt"
                obj = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(obj, dict):
                    _save_replacing({PARAM: obj.view(shape), CAT_DIM: 0}, f)
    osd_file = zero / "optimizer_state.pt"
    osd = torch.load(osd_file, map_location="cpu", weights_only=False)  # DeepSpeed objects
    if "ds_version" not in osd or OPTIMIZER_STATE_DICT not in osd:
        osd.setdefault("ds_version", deepspeed.__version__)
        if OPTIMIZER_STATE_DICT not in osd:
            step = next((torch.load(f, map_location="cpu", weights_only=True)
                         for f in sorted(zero.glob("*/step.pt"))), torch.tensor(0.0))
            osd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": torch.tensor(float(step))}},
                                         "param_groups": osd["param_groups"]}
        _save_replacing(osd, osd_file)
    (uni / ANY_STAGE_MARK).write_text("readable by the universal loaders of ZeRO-1, 2 and 3\n")


def _convert_to_universal(ckpt: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    args = argparse.Namespace(  # ds_to_universal's own options; one worker: no process pool
        input_folder=str(ckpt), output_folder=str(out), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True)  # our engine does not record UNIVERSAL_CHECKPOINT_INFO
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        ds_to_universal.main(args)
    # ZeRO-3 output has no per-parameter step.pt (its loader reads the step from
    # optimizer_state.pt, a pickle of DeepSpeed objects): add it, so that a plain-torch reader
    # (weights_only) and a ZeRO-1/2 reader find it as in ZeRO-1/2 output
    zero = out / "zero"
    dirs = [d for d in zero.iterdir()  # (buffers have a directory too: fp32.pt only)
            if (d / "exp_avg.pt").is_file() and not (d / "step.pt").exists()]
    if dirs:
        sd = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        step = torch.tensor(float(sd[OPTIMIZER_STATE_DICT]["state"][0]["step"]))
        for d in dirs:
            torch.save(step, d / "step.pt")


def _universal_from_torch(ckpt: Path, out: Path) -> None:
    """Universal form of a checkpoint holding the full AdamW state (the plain torch engine's
    torch_engine.pt, a DeepSpeed ZeRO-0 model file: `_replicated_state`): the files DeepSpeed's
    universal loaders read (ZeRO-1/2: base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir,
    ZeRO-3: stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), as ds_to_universal writes
    them. A parameter torch's AdamW never stepped (no gradient yet) gets zero moments; every
    parameter gets the largest step (DeepSpeed steps all partitions together)."""
    from deepspeed.checkpoint.constants import CAT_DIM, OPTIMIZER_STATE_DICT, PARAM

    module, optim = _replicated_state(ckpt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
    step = max((float(st["step"]) for st in optim["state"].values() if "step" in st), default=0.0)
    zero = out / "zero"
    for g in optim["param_groups"]:
        for name, idx in zip(g["names"], g["params"], strict=True):
            st, w = optim["state"].get(idx, {}), module[name].float()
            (zero / name).mkdir(parents=True)
            torch.save({PARAM: w, CAT_DIM: 0}, zero / name / "fp32.pt")
            for k in ("exp_avg", "exp_avg_sq"):
                v = st[k].float() if k in st else torch.zeros_like(w)
                torch.save({PARAM: v, CAT_DIM: 0}, zero / name / f"{k}.pt")
            torch.save(torch.tensor(step), zero / name / "step.pt")
    torch.save({"ds_version": deepspeed.__version__, "clip_grad": 0.0, "dynamic_loss_scale": False,
                "overflow": False, "param_groups": groups,
                OPTIMIZER_STATE_DICT: {"state": {0: {"step": torch.tensor(step)}},
                                       "param_groups": groups}},
               zero / "optimizer_state.pt")
    meta = {"module": module, "dp_world_size": 1, "mp_world_size": 1, "global_steps": int(step),
            "global_samples": 0, "skipped_steps": 0, "ds_version": deepspeed.__version__,
            "optimizer": None, "lr_scheduler": None, "data_sampler": None, "random_ltd": None}
    for f in _MODEL_FILES:
        torch.save(meta, out / f)
