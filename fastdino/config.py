"""Typed, strict configuration: dataclass defaults <- yaml preset <- dotted CLI overrides.

    cfg = load_config("configs/vitl16.yaml", ["optim.lr=1e-3", "data.root=/imgs"])

Every section is a dataclass; every field carries a comment. Loading is strict: an unknown key, a
value of the wrong type, or a value outside what is allowed raises `ConfigError` naming the dotted
key and what is allowed. Defaults are the official DINOv3 ImageNet ViT-L recipe (SPEC.md §3.6,
`vitl_im1k_lin834` column) with the ViT-S/16 backbone; presets in configs/ hold only differences.

A yaml may start from another with a top-level `base:` key: a preset name (`base: vitl16` =
configs/vitl16.yaml) or a yaml path relative to the file. The base is applied first, then the
file's own keys, then the overrides (chains allowed, loops are an error):

    # my_run.yaml
    base: vitl16
    data: {root: /data/my_images}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key is unknown, mistyped or holds a value outside what is allowed."""


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: allowed is {allowed}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, "one of " + " | ".join(choices), value)


ARCHS = (
    "vit_test",
    "vit_tiny",
    "vit_small",
    "vit_small_plus",
    "vit_base",
    "vit_large",
    "vit_large_plus",  # the hub's dinov3_vitl16plus
    "vit_huge_plus",
    "vit_7b",
    # DINOv2 backbones (SPEC.md §2.6): patch 14, learned position embedding (configs/dinov2_*)
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vitg14",
    # ConvNeXt distillation students (fastdino/models/convnext.py; distillation runs only)
    "convnext_test",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
)


@dataclass(kw_only=True)
class ModelConfig:
    # backbone factory in fastdino.models (SPEC.md §2.1); convnext_* (distillation students,
    # models/convnext.py) take only patch_size, drop_path_rate and activation_checkpointing
    arch: str = "vit_small"
    patch_size: int = 16  # patch side in pixels
    embed_dim: int | None = None  # override of the arch's width (None = the arch's)
    depth: int | None = None  # override of the arch's number of blocks
    num_heads: int | None = None  # override of the arch's number of heads
    ffn_layer: str | None = None  # mlp | swiglu | swiglu32 | swiglu64; None = the arch's
    ffn_ratio: float | None = None  # hidden = ratio * D (SwiGLU: align_up(int(D*r*2/3), align))
    n_storage_tokens: int = 4  # register tokens after CLS
    qkv_bias: bool = True  # bias on the fused qkv projection
    mask_k_bias: bool = True  # zero the key third of the qkv bias with a persistent `bias_mask`
    layerscale_init: float = 1e-5  # LayerScale gamma init
    norm_eps: float = 1e-5  # LayerNorm eps
    drop_path_rate: float = 0.3  # sample-subset stochastic depth rate, uniform over depth
    rope_base: float = 100.0  # RoPE period base
    rope_rescale: float | None = 2.0  # train-time coordinate rescale s in [1/r, r]; None = off
    # dtype of the RoPE periods buffer and sin/cos tables: bf16 | fp32 | null. null (default) =
    # the official code's in each context: bf16 for training (a validated training config sets
    # it: the official build_model never passes student.pos_embed_rope_dtype, so every official
    # run, the 7B's "fp32" yamls included, ran DinoVisionTransformer's default bf16; a run's
    # config.yaml records it), fp32 for a backbone evaluated or exported from --arch or a preset
    # (the official hub's; the released files hold bf16-rounded periods, used as they are)
    pos_embed_rope_dtype: str | None = None
    untie_global_and_local_cls_norm: bool = (
        False  # separate final norm for local-crop CLS/registers
    )
    # the official untie_cls_and_patch_norms: CLS + registers take their own final norm
    # (`cls_norm`), patches `norm` (no released DINOv3 model uses it; HF / timm exports refuse it)
    untie_cls_and_patch_norms: bool = False
    attn_impl: str = "auto"  # auto | flash_attn | sdpa | torch
    # position encoding: rope (DINOv3) | learned (DINOv2's absolute table, bicubically resized
    # to each crop's grid: layers/pos_embed.py) | null = the arch's (learned for dinov2_*)
    pos_embed: str | None = None
    pos_embed_grid: int = 37  # learned: side M of the table (DINOv2: 37 = 518 px / 14)
    interpolate_offset: float = 0.1  # learned: DINOv2's resize offset (0 for the reg models)
    interpolate_antialias: bool = False  # learned: antialiased resize (True for reg models)
    # Continued pretraining: initialise the student (hence the EMA and Gram teachers) from these
    # weights: an exported backbone (.pth / .safetensors, official keys), a Hugging Face
    # DINOv3ViTModel or timm DINOv3 folder (or file), or a fastdino run / checkpoint (its teacher,
    # DINO and iBOT heads too).
    # Strict: a key or shape mismatch is an error. A resumed run's checkpoint takes precedence.
    pretrained_weights: str | None = None
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no codegen, debug)
    compile_fallback: bool = True  # a block whose compile fails runs eagerly (warned), no stop

    def validate(self, p: str = "model") -> None:
        _choice(self.arch, f"{p}.arch", ARCHS)
        _check(self.patch_size > 0, f"{p}.patch_size", "a positive integer", self.patch_size)
        for name in ("embed_dim", "depth", "num_heads"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{p}.{name}", "null or a positive integer", v)
        if self.embed_dim is not None and self.num_heads is not None:
            _check(
                self.embed_dim % self.num_heads == 0,
                f"{p}.num_heads",
                f"a divisor of embed_dim={self.embed_dim}",
                self.num_heads,
            )
        if self.ffn_layer is not None:
            _choice(self.ffn_layer, f"{p}.ffn_layer", ("mlp", "swiglu", "swiglu32", "swiglu64"))
        _check(
            self.ffn_ratio is None or self.ffn_ratio > 0,
            f"{p}.ffn_ratio",
            "null or > 0",
            self.ffn_ratio,
        )
        _check(
            self.n_storage_tokens >= 0,
            f"{p}.n_storage_tokens",
            "an integer >= 0",
            self.n_storage_tokens,
        )
        _check(
            0.0 <= self.drop_path_rate < 1.0,
            f"{p}.drop_path_rate",
            "a float in [0, 1)",
            self.drop_path_rate,
        )
        _check(self.norm_eps > 0, f"{p}.norm_eps", "a float > 0", self.norm_eps)
        # 0 is not "no LayerScale" (the official null): it zeroes every residual branch
        _check(self.layerscale_init > 0, f"{p}.layerscale_init", "a float > 0",
               self.layerscale_init)
        _check(self.rope_base > 0, f"{p}.rope_base", "a float > 0", self.rope_base)
        _check(
            self.rope_rescale is None or self.rope_rescale >= 1.0,
            f"{p}.rope_rescale",
            "null or a float >= 1",
            self.rope_rescale,
        )
        _check(self.pos_embed_rope_dtype in (None, "bf16", "fp32"), f"{p}.pos_embed_rope_dtype",
               "one of bf16 | fp32 | null", self.pos_embed_rope_dtype)
        _choice(self.attn_impl, f"{p}.attn_impl", ("auto", "flash_attn", "sdpa", "torch"))
        if self.pos_embed is not None:
            _choice(self.pos_embed, f"{p}.pos_embed", ("rope", "learned"))
        _check(self.pos_embed_grid > 0, f"{p}.pos_embed_grid", "a positive integer",
               self.pos_embed_grid)
        _check(self.interpolate_offset >= 0, f"{p}.interpolate_offset", "a float >= 0",
               self.interpolate_offset)
        if self.arch.startswith("dinov2_"):
            # the DINOv3-default fields the DINOv2 architecture differs in (the presets set them)
            for key, want in (("patch_size", 14), ("mask_k_bias", False)):
                _check(getattr(self, key) == want, f"{p}.{key}",
                       f"{want} for model.arch={self.arch} (configs/{self.arch}.yaml sets the "
                       "DINOv2 fields)", getattr(self, key))
        if self.arch.startswith("convnext_"):
            # a ConvNeXt has its own stage sizes and no attention, tokens or compile of blocks
            for key in ("embed_dim", "depth", "num_heads", "ffn_layer", "ffn_ratio"):
                _check(getattr(self, key) is None, f"{p}.{key}",
                       f"null for model.arch={self.arch} (a ConvNeXt's stages are fixed by its "
                       "size)", getattr(self, key))
            _check(not self.compile, f"{p}.compile", f"false for model.arch={self.arch} (per-"
                   "block compile is built for the ViT blocks)", self.compile)
        _check(
            self.pretrained_weights is None or self.pretrained_weights.strip() != "",
            f"{p}.pretrained_weights",
            "null or a path",
            self.pretrained_weights,
        )


@dataclass(kw_only=True)
class HeadConfig:
    n_prototypes: int = 65536  # K, width of the bias-free last layer
    hidden_dim: int = 2048  # MLP hidden width
    bottleneck_dim: int = 256  # width before L2 normalisation
    nlayers: int = 3  # MLP depth
    weight_norm_last_layer: bool = False  # DINOv2-style weight-normed prototypes (SPEC.md §10.5)

    def validate(self, p: str) -> None:
        for name in ("n_prototypes", "hidden_dim", "bottleneck_dim", "nlayers"):
            v = getattr(self, name)
            _check(v > 0, f"{p}.{name}", "a positive integer", v)


@dataclass(kw_only=True)
class CropsConfig:
    global_crops_size: int = 224  # side of the 2 global crops
    local_crops_size: int = 96  # side of the local crops
    local_crops_number: int = 8  # local crops per image (> 0 as in DINOv3)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)  # RandomResizedCrop area range
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    horizontal_flip: bool = True  # p=0.5 flip (off in the 7B recipes)
    blur_probabilities: str = (
        "intended"  # intended (1.0/0.1/0.5) | official (inverted bug, SPEC §10.1)
    )
    gram_teacher_crops_size: int | None = None  # Gram-teacher crop side; None = no Gram crops
    gram_teacher_no_distortions: bool = True  # Gram crops: geometry only, no colour/blur/solarise
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation mean
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalisation std
    # mixed resolutions (the official high-res adaptation, SPEC.md §3.4 / §3.7): [[global, local,
    # gram, ratio], ...]; each step every rank uses one size triple, drawn with these ratios from
    # the step's seed (so resumes repeat it); gram is null without Gram crops; the sizes above are
    # then unused by the loader. [] = one resolution. DALI: one pipeline per triple; torch loader:
    # data.torch_photometric=cpu.
    resolution_mix: tuple[tuple[int, int, int | None, float], ...] = ()

    def variants(self) -> list[tuple[CropsConfig, float]]:
        """(crops config of each resolution, its ratio normalised): one of ratio 1 without a mix."""
        if not self.resolution_mix:
            return [(self, 1.0)]
        total = sum(r for *_, r in self.resolution_mix)
        return [(dataclasses.replace(self, global_crops_size=g, local_crops_size=lo,
                                     gram_teacher_crops_size=gr, resolution_mix=()), r / total)
                for g, lo, gr, r in self.resolution_mix]

    def validate(self, p: str = "crops") -> None:
        for name in ("global_crops_size", "local_crops_size"):
            _check(
                getattr(self, name) > 0, f"{p}.{name}", "a positive integer", getattr(self, name)
            )
        _check(
            self.local_crops_number > 0,
            f"{p}.local_crops_number",
            "a positive integer (DINOv3 asserts local crops > 0)",
            self.local_crops_number,
        )
        for name in ("global_crops_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            _check(
                0.0 < lo <= hi <= 1.0,
                f"{p}.{name}",
                "[lo, hi] with 0 < lo <= hi <= 1",
                getattr(self, name),
            )
        _choice(self.blur_probabilities, f"{p}.blur_probabilities", ("intended", "official"))
        _check(
            self.gram_teacher_crops_size is None or self.gram_teacher_crops_size > 0,
            f"{p}.gram_teacher_crops_size",
            "null or a positive integer",
            self.gram_teacher_crops_size,
        )
        _check(all(s > 0 for s in self.std), f"{p}.std", "three floats > 0", self.std)
        for g, lo, gr, r in self.resolution_mix:
            _check(g > 0 and lo > 0 and (gr is None or gr > 0) and r > 0,
                   f"{p}.resolution_mix", "[[global, local, gram or null, ratio], ...] with "
                   "positive sizes and ratios", list(self.resolution_mix))
            _check((gr is None) == (self.gram_teacher_crops_size is None),
                   f"{p}.resolution_mix", "gram sizes set exactly when "
                   f"{p}.gram_teacher_crops_size is (Gram crops on or off for every resolution)",
                   list(self.resolution_mix))


@dataclass(kw_only=True)
class DinoConfig:
    loss_weight: float = 1.0  # w_dino
    head: HeadConfig = field(default_factory=HeadConfig)
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp (DINOv3) | softmax (DINOv2 EMA centering)
    center_momentum: float = 0.9  # EMA momentum of the softmax center
    sk_iterations: int = 3  # Sinkhorn-Knopp iterations
    student_temp: float = 0.1  # tau_s
    local_loss_weight: float = 1.0  # w_local (7B Gram stage 0.5; SPEC.md §1.2)
    # w_local's schedule (official `dino.local_loss_weight_schedule`): 1 before
    # local_loss_weight_start_iteration, then a cosine from 1 to local_loss_weight over
    # local_loss_weight_ramp_iterations (its last iteration at local_loss_weight), then constant.
    # 0 and 0 (default): local_loss_weight throughout. 7B Gram stage: 1,000,000 and 1,000
    local_loss_weight_start_iteration: int = 0
    local_loss_weight_ramp_iterations: int = 0

    def validate(self, p: str = "dino") -> None:
        _check(self.loss_weight >= 0, f"{p}.loss_weight", "a float >= 0", self.loss_weight)
        self.head.validate(f"{p}.head")
        _choice(self.centering, f"{p}.centering", ("sinkhorn_knopp", "softmax"))
        _check(
            0.0 <= self.center_momentum < 1.0,
            f"{p}.center_momentum",
            "a float in [0, 1)",
            self.center_momentum,
        )
        _check(
            self.sk_iterations > 0, f"{p}.sk_iterations", "a positive integer", self.sk_iterations
        )
        _check(self.student_temp > 0, f"{p}.student_temp", "a float > 0", self.student_temp)
        _check(
            self.local_loss_weight >= 0,
            f"{p}.local_loss_weight",
            "a float >= 0",
            self.local_loss_weight,
        )
        for name in ("local_loss_weight_start_iteration", "local_loss_weight_ramp_iterations"):
            _check(getattr(self, name) >= 0, f"{p}.{name}", "an integer >= 0",
                   getattr(self, name))


@dataclass(kw_only=True)
class IbotConfig:
    loss_weight: float = 1.0  # w_ibot
    head: HeadConfig = field(default_factory=HeadConfig)
    mask_sample_probability: float = 0.5  # fraction of the 2B global crops that are masked
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)  # ratios spread evenly in (min, max]

    def validate(self, p: str = "ibot") -> None:
        _check(self.loss_weight >= 0, f"{p}.loss_weight", "a float >= 0", self.loss_weight)
        self.head.validate(f"{p}.head")
        _check(
            0.0 <= self.mask_sample_probability <= 1.0,
            f"{p}.mask_sample_probability",
            "a float in [0, 1]",
            self.mask_sample_probability,
        )
        lo, hi = self.mask_ratio_min_max
        _check(
            0.0 <= lo < hi <= 1.0,
            f"{p}.mask_ratio_min_max",
            "[lo, hi] with 0 <= lo < hi <= 1",
            self.mask_ratio_min_max,
        )


@dataclass(kw_only=True)
class KoleoConfig:
    loss_weight: float = 0.1  # w_koleo, applied to the sum over the 2 global crops
    distributed: bool = False  # gathered batch split into groups (KoLeoLossDistributed)
    group_size: int = 16  # group size of the distributed variant (multiple of the local batch)

    def validate(self, p: str = "koleo") -> None:
        _check(self.loss_weight >= 0, f"{p}.loss_weight", "a float >= 0", self.loss_weight)
        _check(self.group_size >= 2, f"{p}.group_size", "an integer >= 2", self.group_size)


@dataclass(kw_only=True)
class GramConfig:
    use: bool = False  # add the Gram-anchoring loss
    loss_weight: float = 1.0  # w_gram after its warm-up
    loss_weight_warmup_iterations: int = 0  # cosine ramp 0 -> loss_weight from `start_iteration`
    start_iteration: int = 0  # iteration at which the Gram loss is switched on
    img_level: bool = True  # per-image Grams (True) or one Gram of the flattened rank batch
    remove_neg: bool = False  # clamp both Grams at 0
    remove_only_teacher_neg: bool = False  # clamp the teacher Gram at 0 (and student where t<0)
    tokens_used: str = "all"  # all | masked | unmasked student patches (the last two: no img_level)
    # Gram teacher weights: anything --weights takes (a teacher snapshot, a run or checkpoint, an
    # official DINOv3 DCP checkpoint, a backbone file, a Hugging Face / timm folder)
    ckpt: str | None = None
    ema_teacher: bool = False  # use the EMA teacher itself at the student resolution
    it_load_ema_teacher: int = -1  # copy the EMA teacher into the Gram teacher at this iteration
    rep_update: bool = True  # refresh the Gram teacher from the EMA teacher
    it_first_update: int = 0  # first refresh iteration
    update_frequency: int = 10000  # refresh period
    max_updates: int = 3  # refresh at most this many times (official config)
    # dtype the student and teacher patches enter the Gram loss in. fp32: the official cast (the
    # Triton kernel then runs fp32 dots on CUDA cores). bf16: the tensor-core path (2.5-100x
    # faster on an H200 at ViT-L shapes, bench/results/), fp32 accumulation, bf16 operands:
    # within the DESIGN.md rule of torch in bf16, not of fp32
    compute_dtype: str = "fp32"
    # dtype the frozen Gram teacher's Linear / Conv weights and biases are held in: auto = bf16
    # when training in bf16 (the values autocast would cast them to at every forward, so the same
    # outputs at half the memory: 13 GB less per GPU for a 7B Gram teacher, and no per-step
    # weight casts; norms, LayerScale and tokens stay fp32), fp32 otherwise
    teacher_dtype: str = "auto"

    def validate(self, p: str = "gram") -> None:
        _choice(self.compute_dtype, f"{p}.compute_dtype", ("fp32", "bf16"))
        _choice(self.teacher_dtype, f"{p}.teacher_dtype", ("auto", "fp32", "bf16"))
        _check(self.loss_weight >= 0, f"{p}.loss_weight", "a float >= 0", self.loss_weight)
        _check(
            self.update_frequency > 0,
            f"{p}.update_frequency",
            "a positive integer",
            self.update_frequency,
        )
        _check(
            not (self.remove_neg and self.remove_only_teacher_neg),
            f"{p}.remove_neg",
            "at most one of remove_neg / remove_only_teacher_neg",
            self.remove_neg,
        )
        _choice(self.tokens_used, f"{p}.tokens_used", ("all", "masked", "unmasked"))
        _check(
            self.tokens_used == "all" or not self.img_level,
            f"{p}.tokens_used",
            "'all' when img_level is true (masked / unmasked need img_level: false)",
            self.tokens_used,
        )
        for name in (
            "loss_weight_warmup_iterations",
            "start_iteration",
            "it_first_update",
            "max_updates",
        ):
            _check(getattr(self, name) >= 0, f"{p}.{name}", "an integer >= 0", getattr(self, name))


@dataclass(kw_only=True)
class DistillationConfig:
    # Distillation (SPEC.md §1.8; the official MultiDistillationMetaArch with one student): the
    # DINO and iBOT targets come from a frozen teacher instead of the student's own EMA. The
    # teacher is a fastdino training run or checkpoint (its EMA teacher: backbone and both heads,
    # architecture from the run's config.yaml; heads fitted to a released backbone by a run with
    # optim.frozen_blocks=-1 qualify). The student sees unmasked global crops, the iBOT loss is
    # still taken at the sampled mask positions, there is no Gram loss, and the student's EMA is
    # still kept: it is what checkpoints hold and what is exported and evaluated.
    enabled: bool = False
    teacher: str | None = None  # the teacher run / checkpoint folder
    # the teacher's architecture (its model and head sizes: a preset name in configs/ or a yaml)
    # when distillation.teacher has no config.yaml beside it: an official DINOv3 DCP checkpoint,
    # a `fastdino export --with-heads` file; overrides the run's own config.yaml when given
    teacher_config: str | None = None
    # dtype the frozen teacher is held in: auto = bf16 when training in bf16 (as the official
    # FSDP teacher's bf16 parameters: half the memory of fp32, 14 GB for a 7B teacher, and no
    # per-step weight casts under autocast), fp32 otherwise
    teacher_dtype: str = "auto"
    # co-distillation (fastdino/codistill.py): more students trained beside this one from the
    # same teacher in the same run, sharing its batches and the teacher's forward; each a yaml
    # (a path from the working directory, or a preset name) of the keys in which that student
    # differs (model, heads, optim, ...), written to <train.output_dir>/students/<yaml stem>/
    students: tuple[str, ...] = ()
    # where the students train: empty = every rank holds every student and runs them in turn on
    # its batch; or one rank count per student (this config's first, then `students` in order),
    # summing to the world size: each student trains on its own consecutive ranks on the whole
    # global batch (split over its ranks), the teacher's forward is spread over all ranks and its
    # outputs exchanged (the official layout: size the counts so the students' steps take equally
    # long, e.g. [4, 2, 2] for a ViT-L beside two ViT-B on 8 GPUs)
    student_ranks: tuple[int, ...] = ()

    def validate(self, p: str = "distillation") -> None:
        _choice(self.teacher_dtype, f"{p}.teacher_dtype", ("auto", "fp32", "bf16"))
        _check(not self.students or self.enabled, f"{p}.students",
               "empty unless distillation.enabled is true", list(self.students))
        _check(not self.student_ranks or self.students, f"{p}.student_ranks",
               "empty unless distillation.students lists further students (one student trains "
               "on every rank)", list(self.student_ranks))
        _check(not self.student_ranks or len(self.student_ranks) == 1 + len(self.students),
               f"{p}.student_ranks", f"empty, or {1 + len(self.students)} rank counts (this "
               f"config's student, then one per distillation.students entry)",
               list(self.student_ranks))
        _check(all(isinstance(n, int) and n >= 1 for n in self.student_ranks),
               f"{p}.student_ranks", "rank counts >= 1", list(self.student_ranks))
        _check(self.enabled or self.teacher is None, f"{p}.teacher",
               "null unless distillation.enabled is true (a teacher alone would be ignored: the "
               "run would self-distil)", self.teacher)
        _check(self.enabled or self.teacher_config is None, f"{p}.teacher_config",
               "null unless distillation.enabled is true (it names the teacher's architecture)",
               self.teacher_config)
        _check(
            not self.enabled or self.teacher is not None,
            f"{p}.teacher",
            "a fastdino training run or checkpoint folder when distillation.enabled is true",
            self.teacher,
        )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3  # base lr before the sqrt scaling rule
    # end of the cosine; optim.scaling_rule scales it like lr when min_lr >= lr (a constant lr
    # after the warm-up: the official v2 recipes scale peak and end), not below lr (v1 scales the
    # peak only)
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0  # linear warm-up from 0, in epochs (train.epoch_length its)
    weight_decay: float = 0.04  # start of the cosine wd schedule
    weight_decay_end: float = 0.4  # end of the cosine wd schedule
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW eps
    clip_grad: float = 3.0  # max grad norm per module (backbone, dino head, ibot head); 0 = off
    layerwise_decay: float = 0.9  # lr multiplier lambda^(L+1-layer_id)
    patch_embed_lr_mult: float = 0.2  # extra lr multiplier of patch_embed
    freeze_last_layer_epochs: float = 1.0  # last_layer lr = 0 during this many epochs
    # Continued pretraining (README "Continued pretraining"). Head warm-up: the backbone's lr is 0
    # during this many epochs while the DINO / iBOT heads train against a teacher whose backbone
    # is the loaded one, so that gradients through fresh heads do not wreck pretrained features.
    # The backbone's gradients are still computed (AdamW moments warm up, both engines alike).
    freeze_backbone_epochs: float = 0.0
    # Partial fine-tuning: the patch embedding, the cls / storage / mask tokens and the first N
    # blocks never train (no gradient, no optimizer state, no activations kept for the backward
    # below block N); -1 = the whole backbone (only the heads train, e.g. to fit heads to a
    # released backbone). 0 = everything trains.
    frozen_blocks: int = 0
    # LoRA (layers/lora.py): adapters of this rank on the blocks' linear layers (those of
    # blocks >= optim.frozen_blocks), which with the heads are all that trains; the backbone's own
    # weights stay frozen. Exports and evaluation merge them (W + alpha/rank · B·A). 0 = off.
    lora_rank: int = 0
    lora_alpha: float | None = None  # scale numerator; None = lora_rank (scale 1)
    lora_targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "w1", "w2", "w3")
    scaling_rule: str = "sqrt_wrt_1024"  # lr <- lr*4*sqrt(global_batch/1024) | none

    def validate(self, p: str = "optim") -> None:
        for name in (
            "lr",
            "min_lr",
            "weight_decay",
            "weight_decay_end",
            "eps",
            "clip_grad",
            "warmup_epochs",
            "freeze_last_layer_epochs",
            "freeze_backbone_epochs",
        ):
            _check(getattr(self, name) >= 0, f"{p}.{name}", "a float >= 0", getattr(self, name))
        _check(self.lora_rank >= 0, f"{p}.lora_rank", "an integer >= 0", self.lora_rank)
        _check(
            self.lora_alpha is None or self.lora_alpha > 0,
            f"{p}.lora_alpha",
            "null or a float > 0",
            self.lora_alpha,
        )
        _check(
            not (self.lora_rank > 0 and self.frozen_blocks == -1),
            f"{p}.frozen_blocks",
            "not -1 when optim.lora_rank > 0 (-1 freezes every block, adapters included)",
            self.frozen_blocks,
        )
        _check(
            self.frozen_blocks >= -1,
            f"{p}.frozen_blocks",
            "an integer >= -1 (-1 = the whole backbone, 0 = none, N = embedding + first N blocks)",
            self.frozen_blocks,
        )
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"{p}.betas",
            "two floats in [0, 1)",
            self.betas,
        )
        _check(
            0.0 < self.layerwise_decay <= 1.0,
            f"{p}.layerwise_decay",
            "a float in (0, 1]",
            self.layerwise_decay,
        )
        _check(
            self.patch_embed_lr_mult > 0,
            f"{p}.patch_embed_lr_mult",
            "a float > 0",
            self.patch_embed_lr_mult,
        )
        _choice(self.scaling_rule, f"{p}.scaling_rule", ("sqrt_wrt_1024", "none"))


@dataclass(kw_only=True)
class SchedulesConfig:
    teacher_temp: float = 0.07  # tau_t after warm-up
    warmup_teacher_temp: float = 0.04  # tau_t at iteration 0
    warmup_teacher_temp_epochs: float = 30.0  # linear tau_t ramp length, in epochs
    momentum_teacher: float = 0.992  # EMA momentum at iteration 0 (cosine to the final value)
    final_momentum_teacher: float = 1.0  # EMA momentum at the last iteration
    # EMA scaling rule for other global batches (Busbridge et al. 2023, "How to scale your EMA"):
    # with the recipe's global batch here, both momenta m become m^(global batch / this), so the
    # teacher averages over as many images as in the recipe (0.992 at 2048 -> 0.999 at 256).
    # null = the momenta as written (official)
    momentum_reference_batch: int | None = None

    def validate(self, p: str = "schedules") -> None:
        _check(self.teacher_temp > 0, f"{p}.teacher_temp", "a float > 0", self.teacher_temp)
        _check(
            self.warmup_teacher_temp > 0,
            f"{p}.warmup_teacher_temp",
            "a float > 0",
            self.warmup_teacher_temp,
        )
        _check(
            self.warmup_teacher_temp_epochs >= 0,
            f"{p}.warmup_teacher_temp_epochs",
            "a float >= 0",
            self.warmup_teacher_temp_epochs,
        )
        _check(
            self.momentum_reference_batch is None or self.momentum_reference_batch > 0,
            f"{p}.momentum_reference_batch",
            "null or a positive integer (the recipe's global batch)",
            self.momentum_reference_batch,
        )
        for name in ("momentum_teacher", "final_momentum_teacher"):
            _check(
                0.0 <= getattr(self, name) <= 1.0,
                f"{p}.{name}",
                "a float in [0, 1]",
                getattr(self, name),
            )


# data.white_level (and eval's --white-level): what is allowed
WHITE_LEVEL_ALLOWED = ("null (a 16-bit image's 0..65535 maps to 0..255), or an integer in "
                       "256..65535: the value that maps to white for integer images deeper than "
                       "8 bits, e.g. 4095 for 12-bit data (values above it clip to white)")


def white_level_ok(value) -> bool:
    """data.white_level's rule (the config, the datasets, eval's --white-level): None, or an
    integer (not a bool) in 256..65535."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and 255 < value <= 65535)


@dataclass(kw_only=True)
class DataConfig:
    # where the images are: a folder (recursive; the images inside its .tar shards too), an
    # uncompressed WebDataset .tar shard, or a glob / brace pattern of them
    # ("/data/train-{0000..0999}.tar", "/data/**/*.jpg"); None = the embedded sample images
    root: str | None = None
    file_list: str | None = None  # optional text file of image paths or .tar shards (one per line)
    loader: str = "auto"  # auto | torch | dali
    # the DALI loader's photometric ops: triton (the DALI graph only decodes, crops and resizes;
    # jitter, greyscale, blur, solarize, flip and normalisation run in one kernel launch per crop
    # size, kernels/photometric.py, the torch loader's ops bit for bit) | exact (all in the DALI
    # graph, ~4,900 operators; ColorJitter torchvision's PIL ops bit for bit, DALI's blur and
    # normalisation) | fast (DALI's own jitter ops, ~1,800 operators: a level or two off, the
    # hue ~17 levels)
    dali_jitter: str = "triton"
    # DALI loader: processes that read the files and draw the crop plans (DALI's parallel
    # external source, spawned), so that ~0.1 ms of Python per image stays off the training
    # process's main thread (6-15 ms per step at B = 64); 0 = in the training process
    dali_source_workers: int = 2
    # torch loader: where the photometric ops run. cpu: in the workers (PIL / numpy) | gpu: the
    # workers decode, crop, resize and flip, the trainer's device runs jitter, greyscale, blur,
    # solarize and normalisation (kernels/photometric.py, the same values bit for bit; Gram crops
    # distorted at the large size within a few levels): a worker's time per image at 2 x 224 +
    # 8 x 96 from 17.3 to 5.4 ms (measured on a 2-core CPU machine)
    torch_photometric: str = "cpu"
    batch_size_per_gpu: int = 64  # B, images per rank per step
    num_workers: int = 4  # torch loader worker processes
    seed: int = 0  # data shuffling / augmentation seed
    # a second source read as homogeneous batches (the DINOv3 paper: 10 % of the steps are
    # ImageNet-1k batches): each step, with probability homogeneous_ratio (drawn from the seed and
    # the step, the same on every rank), the whole global batch comes from it (data/mixing.py)
    homogeneous_root: str | None = None
    homogeneous_ratio: float = 0.1  # share of the steps read from homogeneous_root, in (0, 1)
    # the value that maps to white for integer images deeper than 8 bits (16-bit greyscale PNG /
    # TIFF, 16-bit RGB TIFF): 10/12/14-bit data (scientific cameras, satellites, CT / X-ray,
    # microscopy) is stored in 16-bit files, and scaled from 0..65535 a 12-bit image (max 4095)
    # trains on 8-bit levels 0..16, nearly black. 4095 for 12-bit data, 1023 / 16383 for 10 /
    # 14-bit, 10000 for reflectance 0..10000; values above it clip to white. Integer images only
    # (16-bit, and 32-bit without negative values); float and signed data keep their own range.
    # Not for 16-bit colour PNGs (PIL reads them as 8 bits, their high byte; save them as TIFF)
    # nor for TIFFs whose compression tifffile needs imagecodecs for (LZW, JPEG), said once each.
    # Applies to both loaders (DALI: such images are decoded on the host). null = the 16-bit range
    # 0..65535 (a warning says it once when an image uses at most 14 bits). Eval / curate embed:
    # --white-level.
    white_level: int | None = None
    # torch loader (either torch_photometric): decode a JPEG at 1/2, 1/4 or 1/8 of its size
    # (libjpeg's DCT scaling: on 12 MP photos at 2 x 224 + 8 x 96, 5.7 -> 32.9 images/s with 2
    # workers on a 2-core CPU) when even the smallest crop of every kind still has at least its
    # output side in pixels; the crop boxes and random draws are unchanged (drawn from the full
    # size), the pixels within a resampling's difference. false = the full decode's pixels. Host
    # (PIL) decoding only: the DALI loader's decoder is not affected. (Eval's transform drafts
    # alike, down to its resize target.)
    jpeg_draft: bool = True

    def validate(self, p: str = "data") -> None:
        _choice(self.loader, f"{p}.loader", ("auto", "torch", "dali"))
        _check(0 < self.homogeneous_ratio < 1, f"{p}.homogeneous_ratio",
               "a share of the steps in (0, 1)", self.homogeneous_ratio)
        _choice(self.dali_jitter, f"{p}.dali_jitter", ("exact", "fast", "triton"))
        _choice(self.torch_photometric, f"{p}.torch_photometric", ("cpu", "gpu"))
        _check(self.dali_source_workers >= 0, f"{p}.dali_source_workers",
               "an integer >= 0 (0 = in the training process)", self.dali_source_workers)
        _check(
            self.batch_size_per_gpu > 0,
            f"{p}.batch_size_per_gpu",
            "a positive integer",
            self.batch_size_per_gpu,
        )
        _check(self.num_workers >= 0, f"{p}.num_workers", "an integer >= 0", self.num_workers)
        _check(self.seed >= 0, f"{p}.seed", "an integer >= 0", self.seed)
        _check(white_level_ok(self.white_level), f"{p}.white_level", WHITE_LEVEL_ALLOWED,
               self.white_level)


@dataclass(kw_only=True)
class KernelsConfig:
    impl: str = "auto"  # auto (Triton on CUDA, reference elsewhere) | triton | torch
    # LayerNorm + residual + LayerScale and SwiGLU in Triton; off until a GPU benchmark shows a win
    fuse_pointwise: bool = False

    def validate(self, p: str = "kernels") -> None:
        _choice(self.impl, f"{p}.impl", ("auto", "triton", "torch"))


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 0, 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    config_file: str | None = None  # user DeepSpeed json; conflicts with this yaml are errors
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    # process-group timeout: a rank waiting longer in a collective (a hung or crashed rank, rank 0
    # busy with a long kNN probe or export) fails instead of waiting; null = DeepSpeed's (10 min,
    # or $DEEPSPEED_TIMEOUT minutes)
    timeout_minutes: float | None = None

    def validate(self, p: str = "deepspeed") -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"{p}.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        _choice(self.precision, f"{p}.precision", ("auto", "bf16", "fp32"))
        _check(
            self.gradient_accumulation_steps >= 1,
            f"{p}.gradient_accumulation_steps",
            "an integer >= 1",
            self.gradient_accumulation_steps,
        )
        _check(self.timeout_minutes is None or self.timeout_minutes > 0, f"{p}.timeout_minutes",
               "null or a number of minutes > 0", self.timeout_minutes)


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = "runs/default"  # checkpoints, metrics and the resolved config go here
    epochs: int = 100  # schedule length in epochs
    epoch_length: int = 1250  # iterations per "epoch" (OFFICIAL_EPOCH_LENGTH), not a data pass
    max_iterations: int | None = None  # stop early (schedules still span epochs*epoch_length)
    seed: int = 0  # model init / masking / RoPE seed
    log_every: int = 10  # metrics line period, in iterations
    checkpoint_every: int = 3750  # checkpoint period, in iterations
    keep_checkpoints: int = 3  # checkpoints kept (periodic, last-iteration and signal alike)
    resume: str = "auto"  # auto (latest in output_dir) | none | path to a checkpoint dir
    max_consecutive_nan: int = 3  # stop after this many consecutive non-finite steps
    knn_every: int = 0  # kNN probe period in iterations (0 = off)
    # labelled folder (class subfolders) for the kNN probe; "digits": the embedded sklearn digits
    knn_data: str | None = None
    # with knn_data: the query set, knn_data then the training set; both take labelled shards
    # (<key>.cls beside <key>.jpg) and patterns as well as class folders (fastdino.data.labelled)
    knn_val_data: str | None = None
    # signals that stop the run after the current step with a checkpoint (fastdino/stop.py;
    # SIGUSR1: Slurm's `--signal=USR1@120` warning); [] = the default actions (no checkpoint)
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")
    # every N iterations also <output_dir>/eval/training_N/teacher_checkpoint.pth (the official
    # eval snapshot: {"teacher": EMA teacher}, never rotated away): what gram.ckpt, --weights and
    # model.pretrained_weights take, e.g. an early teacher for the Gram stage; 0 = off
    teacher_snapshot_every: int = 0
    # PCA maps of the teacher's patch features (and token-norm maps) written with every
    # checkpoint to <output_dir>/pca/iter_N/ (fastdino eval pca's images, one PCA shared by all):
    # image files and folders of them, or "sample" (the embedded sample photos); null = off
    pca_images: tuple[str, ...] | None = None
    pca_resolution: int = 448  # image height in pixels (a multiple of the patch size is used)
    # metric sinks beside metrics.jsonl (fastdino/loggers.py; the `log` extra): TensorBoard event
    # files in <output_dir>/tensorboard/; a Weights & Biases run (its id kept for resumes)
    tensorboard: bool = False
    wandb_project: str | None = None
    wandb_run_name: str | None = None  # default: W&B's own

    def validate(self, p: str = "train") -> None:
        _check(self.seed >= 0, f"{p}.seed", "an integer >= 0", self.seed)
        # '' would be the working directory (output_dir) or no checkpoint anywhere (resume)
        _check(self.output_dir.strip() != "", f"{p}.output_dir", "a folder path", self.output_dir)
        _check(self.resume.strip() != "", f"{p}.resume", "auto, none or a checkpoint path",
               self.resume)
        for name in (
            "epochs",
            "epoch_length",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_consecutive_nan",
            "pca_resolution",
        ):
            _check(
                getattr(self, name) > 0, f"{p}.{name}", "a positive integer", getattr(self, name)
            )
        _check(
            self.max_iterations is None or self.max_iterations > 0,
            f"{p}.max_iterations",
            "null or a positive integer",
            self.max_iterations,
        )
        _check(self.knn_every >= 0, f"{p}.knn_every", "an integer >= 0", self.knn_every)
        _check(not self.knn_every or self.knn_data is not None, f"{p}.knn_every",
               f"0 unless {p}.knn_data names the probe's labelled data", self.knn_every)
        _check(self.teacher_snapshot_every >= 0, f"{p}.teacher_snapshot_every",
               "an integer >= 0 (0 = off)", self.teacher_snapshot_every)
        _check(self.knn_val_data is None or self.knn_data is not None, f"{p}.knn_val_data",
               f"null unless {p}.knn_data names the training set", self.knn_val_data)
        from fastdino.stop import STOP_SIGNALS

        _check(all(n in STOP_SIGNALS for n in self.stop_signals), f"{p}.stop_signals",
               "a list of " + ", ".join(STOP_SIGNALS), list(self.stop_signals))

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.epoch_length


@dataclass(kw_only=True)
class EvalConfig:
    # the in-training kNN probe (train.knn_every, train.knn_data); `fastdino eval` has its own flags
    knn_k: tuple[int, ...] = (10, 20, 100, 200)  # k values of the kNN protocol
    knn_temperature: float = 0.07  # softmax temperature of the weighted vote
    batch_size: int = 64  # feature extraction batch

    def validate(self, p: str = "eval") -> None:
        _check(
            len(self.knn_k) > 0 and all(k > 0 for k in self.knn_k),
            f"{p}.knn_k",
            "a non-empty list of positive integers",
            self.knn_k,
        )
        _check(
            self.knn_temperature > 0, f"{p}.knn_temperature", "a float > 0", self.knn_temperature
        )
        _check(self.batch_size > 0, f"{p}.batch_size", "a positive integer", self.batch_size)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    koleo: KoleoConfig = field(default_factory=KoleoConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.model.pos_embed_rope_dtype is None:  # a training config: the official trainer's
            self.model.pos_embed_rope_dtype = "bf16"
        ps = self.model.patch_size
        if self.crops.resolution_mix:
            _check(self.data.loader == "dali" or self.data.torch_photometric == "cpu",
                   "crops.resolution_mix", "a mix with the DALI loader (one pipeline per triple) "
                   "or the torch loader with data.torch_photometric=cpu (its photometric "
                   "buffers have one size)", list(self.crops.resolution_mix))
        # global and Gram crops: whole patches (the iBOT mask grid and the Gram grid); local crops
        # may leave a remainder, which the patch embedding drops as the official one does (the
        # official high-res triple (768, 168, 1152): 10 x 10 local patches)
        for key, v in ((k, getattr(c, k)) for c, _ in self.crops.variants() for k in (
                "global_crops_size", "gram_teacher_crops_size")):
            _check(
                v is None or v % ps == 0, f"crops.{key}", f"a multiple of model.patch_size={ps}", v
            )
        # a local crop holds at least one patch (a ConvNeXt: one cell of its stride-32 map); a
        # smaller one fails in the patch embedding's convolution at the first step
        convnext = self.model.arch.startswith("convnext_")
        least = max(ps, 32) if convnext else ps
        mix = self.crops.resolution_mix
        for c, _ in self.crops.variants():
            _check(c.local_crops_size >= least,
                   "crops.resolution_mix" if mix else "crops.local_crops_size",
                   f"local crop sizes >= {least} (at least " + ("one cell of a ConvNeXt's "
                   "stride-32 map" if convnext else f"one patch of model.patch_size={ps}") + ")",
                   list(mix) if mix else c.local_crops_size)
        _check(not self.koleo.distributed or self.koleo.loss_weight == 0
               or self.koleo.group_size % self.data.batch_size_per_gpu == 0, "koleo.group_size",
               f"a multiple of data.batch_size_per_gpu={self.data.batch_size_per_gpu} (a group "
               "is whole ranks' batches)", self.koleo.group_size)
        _check(self.koleo.loss_weight == 0 or self.koleo.distributed
               or self.data.batch_size_per_gpu >= 2, "koleo.loss_weight",
               "0 when data.batch_size_per_gpu is 1 (KoLeo takes each image's nearest neighbour "
               "among the rank's images; or raise the batch, or koleo.distributed=true)",
               self.koleo.loss_weight)
        if self.model.arch.startswith("convnext_"):  # no mask token: the student is unmasked
            _check(self.distillation.enabled, "model.arch", "a ViT unless distillation.enabled "
                   "(ConvNeXt students learn from a frozen teacher, as the official ConvNeXt "
                   "family; self-distillation masks the student's patch tokens)", self.model.arch)
            _check(self.optim.lora_rank == 0, "optim.lora_rank", "0 for a ConvNeXt student "
                   "(LoRA adapts the ViT's attention and MLP layers)", self.optim.lora_rank)
        _check(
            not (self.distillation.enabled and self.gram.use),
            "gram.use",
            "false when distillation.enabled is true (distillation has no Gram loss)",
            self.gram.use,
        )
        _check(not self.gram.use or self.gram.tokens_used != "masked"
               or self.ibot.mask_sample_probability > 0, "gram.tokens_used",
               "all or unmasked when ibot.mask_sample_probability is 0 (no patch is masked: the "
               "Gram loss would be 0)", self.gram.tokens_used)
        if self.gram.use and self.gram.ckpt is None and not self.gram.ema_teacher:
            _check(
                self.gram.it_load_ema_teacher >= 0,
                "gram.it_load_ema_teacher",
                "an iteration >= 0 when gram.use is true and neither gram.ckpt nor "
                "gram.ema_teacher gives the Gram teacher",
                self.gram.it_load_ema_teacher,
            )

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------------------
# Loading: strict merge of nested dicts into the dataclass tree, with type checks.


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "true / false values"), str: ("a string", "strings"),
          type(None): ("null", "nulls")}


def _describe(tp: Any, plural: bool = False) -> str:
    """A field type in words, for errors: `int | None` -> 'an integer or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a, plural) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            text = f"list of {_describe(args[0], plural=True)}"
        elif len(set(args)) == 1:
            text = f"list of {len(args)} {_describe(args[0], plural=True)}"
        else:
            text = "list [" + ", ".join(_describe(a) for a in args) + "]"
        return text.replace("list", "lists", 1) if plural else f"a {text}"
    return _NAMES[tp][plural] if tp in _NAMES else str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`, the value as given and
    the type in words."""
    try:
        return _coerce_value(value, tp)
    except (TypeError, ValueError) as e:
        if value is None:  # (an override `key=` reads as null too)
            raise ConfigError(f"config key '{key}' is null: expected {_describe(tp)}") from None
        raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected "
                          f"{_describe(tp)}{f' ({e})' if str(e) else ''}") from None


def _coerce_value(value: Any, tp: Any) -> Any:
    """`value` as type `tp`; TypeError / ValueError (with a reason or none) otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce_value(value, a)
            except (TypeError, ValueError):
                pass
        raise TypeError()
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_value(v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(f"got {len(value)}")
        return tuple(_coerce_value(v, a) for v, a in zip(value, args, strict=True))
    if tp is float:
        if isinstance(value, str):  # yaml 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError()
        if not math.isfinite(float(value)):
            raise ValueError("it is not finite")
        return float(value)
    if tp is int:
        if isinstance(value, str):  # 1e6 iterations: yaml 1.1 reads it as a string
            try:
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer() and "e" in value.lower():
                return int(as_float)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError()
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError()
        return value
    raise TypeError(f"unsupported field type {tp}")


def _merge(obj: Any, updates: dict, prefix: str, unknown: list[str] | None = None) -> None:
    """`unknown`: collect keys this version does not have there instead of refusing them."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in updates.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            if unknown is not None:
                unknown.append(key)
                continue
            raise ConfigError(
                f"unknown config key '{key}': allowed keys here are {', '.join(names)}"
            )
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge(cur, v, key, unknown)
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def merge_mapping(cfg: Config, data: dict) -> None:
    """Apply a nested mapping of config keys onto `cfg` (the strict, type-checked merge of the
    yaml files; the caller validates)."""
    _merge(cfg, data, "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    keys = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:  # data.root=*.tar, optim.betas=[0.9,0.99
        if _is_string_key(keys):
            return keys, raw
        raise ConfigError(f"override {item!r} is not a yaml value: "
                          f"{str(e).splitlines()[0]}") from None
    if value is not None and not isinstance(value, str) and _is_string_key(keys):
        # a path or name that yaml reads as something else (data.root=2024, =yes, =1e5, the brace
        # pattern {/a,/b} as a mapping, *.[tT]ar as a list): the key takes text, keep it as given
        value = raw
    return keys, value


def _is_string_key(keys: list[str]) -> bool:
    """Whether the dotted key names a field typed str or str | None (False if unknown: the
    merge reports it)."""
    obj: Any = Config
    for k in keys:
        if not dataclasses.is_dataclass(obj):
            return False
        hints = typing.get_type_hints(obj)
        if k not in hints:
            return False
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            obj = tp
            continue
        return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                             and set(typing.get_args(tp)) <= {str, type(None)})
    return False


def _preset_dir() -> Path:
    """The presets: inside the package where pip installed it (fastdino/configs: pyproject
    ships configs/ there), else the repository's configs/ (a clone, an editable install)."""
    here = Path(__file__).resolve().parent
    return here / "configs" if (here / "configs").is_dir() else here.parent / "configs"


PRESET_DIR = _preset_dir()


def preset_names() -> str:
    return ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def find_preset(spec: str | Path) -> Path | None:
    """A yaml path, or the preset of that name in configs/; None if neither."""
    for path in (Path(spec).expanduser(), PRESET_DIR / f"{spec}.yaml"):
        if path.is_file():
            return path
    return None


def resolve_preset(spec: str | Path, key: str) -> Path:
    """find_preset, or a ConfigError naming `key` and the presets."""
    path = find_preset(spec)
    if path is None:
        raise ConfigError(f"config key '{key}' = {str(spec)!r} is invalid: allowed is a yaml file "
                          f"or a preset name ({preset_names()})")
    return path


def _resolve_base(base: Any, path: Path) -> Path:
    """`base:` of the yaml at `path`: a yaml path relative to it, or a preset name in configs/."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: 'base' = {base!r} is invalid: allowed is a preset name "
                          "(configs/<name>.yaml) or a yaml path relative to this file")
    relative = path.parent / base
    preset = PRESET_DIR / (base if base.endswith((".yaml", ".yml")) else f"{base}.yaml")
    for cand in (relative, preset):
        if cand.is_file():
            return cand
    raise ConfigError(f"{path}: 'base' = {base!r} is neither {relative} nor a preset "
                      f"(configs/: {preset_names()})")


def _apply_file(cfg: Config, path: Path, chain: tuple[Path, ...],
                unknown: list[str] | None = None) -> None:
    """Apply the yaml at `path` onto `cfg`, its `base:` first."""
    path = path.resolve()
    if path in chain:
        raise ConfigError("config 'base' chain loops: " + " -> ".join(
            str(p) for p in (*chain, path)))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid yaml: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of sections, got {data!r}")
    if "base" in data:
        data = dict(data)
        _apply_file(cfg, _resolve_base(data.pop("base"), path), (*chain, path), unknown)
    _merge(cfg, data, "", unknown)


# Keys that hold file or folder paths (or lists of them). A leading `~` in them is the user's home:
# the shell expands `~` only at the start of a word, so `train.output_dir=~/runs/x` reached the
# config as written and the run wrote into a folder literally named `~` in the working directory
# (and `~/...` in a yaml file is never expanded by anyone).
PATH_KEYS = (
    ("model", "pretrained_weights"), ("gram", "ckpt"), ("distillation", "teacher"),
    ("distillation", "teacher_config"), ("distillation", "students"), ("data", "root"),
    ("data", "file_list"), ("data", "homogeneous_root"), ("deepspeed", "config_file"),
    ("train", "output_dir"), ("train", "resume"), ("train", "knn_data"),
    ("train", "knn_val_data"), ("train", "pca_images"),
)


def _expand_user(cfg: Config) -> None:
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if isinstance(value, str):
            setattr(obj, key, os.path.expanduser(value))
        elif isinstance(value, tuple):
            setattr(obj, key, tuple(os.path.expanduser(v) if isinstance(v, str) else v
                                    for v in value))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- yaml file at `path` (if any) <- `overrides` ("a.b=c"); validated."""
    cfg = Config()
    if path is not None:
        found = find_preset(path)  # a yaml file, or a preset's name (smoke, vitl16, ...)
        if found is None:
            raise ConfigError(f"config file {str(path)!r} does not exist (nor is it a preset: "
                              f"{preset_names()})")
        _apply_file(cfg, found, ())
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "")
    _expand_user(cfg)
    cfg.validate()
    return cfg


def load_unvalidated(path: str | Path) -> Config:
    """Defaults <- the yaml at `path` (and its base: chain), type-checked but without the
    whole-config rules (`validate`), and keys this version does not have dropped with a warning:
    for readers of a run's saved config.yaml and of one section (evaluation reads `model:`)."""
    cfg = Config()
    unknown: list[str] = []
    _apply_file(cfg, Path(path).expanduser(), (), unknown)
    if unknown:  # a run saved by another version (a key removed or renamed since): not fatal
        logging.getLogger(__name__).warning(
            "%s: ignoring keys this version of fastdino does not have: %s", path,
            ", ".join(unknown))
    _expand_user(cfg)
    return cfg


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two config dicts (as
    `Config.to_dict` / a saved config.yaml give them); keys only one side has count as changed."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b, key = old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key) as yaml."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
