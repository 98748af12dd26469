"""SSLMetaArch: student, EMA teacher, Gram teacher and the DINOv3 objective (SPEC.md §1, §3.1).

    arch = SSLMetaArch(cfg, device)              # builds student + teachers + losses
    engine = build_engine(arch.student, groups, cfg, info)   # parallel.py wraps the student
    arch.attach(engine)                          # EMA / Gram refresh read the engine's params
    t = arch.teacher_output(batch, teacher_temp, need_gram=w_gram > 0)  # no grad
    s = engine(batch.global_crops, batch.local_crops, arch.student_masks(batch),
               batch.mask_indices)
    loss, terms = arch.compute_losses(s, t, batch, sched_values)

Legend: B images per rank, nL local crops, N patches of a global crop, M masked tokens of the
rank, D width, K prototypes. Crops are crop-major ([crop 0 of all images, crop 1 ...]).
The teacher and Gram teacher (and, in distillation runs, the frozen teacher that gives the targets
instead of the EMA teacher: fastdino/distillation.py) are replicated plain modules in eval mode (no
drop-path, no RoPE jitter: SPEC.md §9.4), outside the engine; the Gram teacher holds its Linear /
Conv weights in bf16 when training in bf16 (`gram.teacher_dtype`, `_frozen_copy`). The student
forward is `Student.forward`, so that DeepSpeed's engine (ZeRO-3 hooks) sees one forward per step.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from fastdino.config import Config, ConfigError
from fastdino.distillation import build_distillation_teacher, resolve_teacher_dtype
from fastdino.ema import EMAPlan, copy_params, ema_update, gram_refresh_due
from fastdino.layers.attn_backend import check_attn_impl
from fastdino.layers.lora import add_lora
from fastdino.layers.select import check_kernels_impl
from fastdino.losses.dino_clstoken_loss import DINOLoss
from fastdino.losses.gram_loss import GramLoss
from fastdino.losses.ibot_patch_loss import iBOTPatchLoss
from fastdino.losses.koleo_loss import KoLeoLoss, KoLeoLossDistributed
from fastdino.models import build_backbone, build_head
from fastdino.models.state_dict_io import load_backbone_state_dict
from fastdino.param_groups import freeze_layers

logger = logging.getLogger("fastdino")


class Student(nn.Module):
    """backbone + dino_head + ibot_head (official names: the teacher is a copy of this)."""

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head
        self.compute_dtype = torch.float32  # set to bf16 by the DeepSpeed engine in bf16 mode

    def forward(self, global_crops, local_crops, masks, mask_indices) -> dict[str, torch.Tensor]:
        """Student forward: masked global crops [2B,3,Hg,Wg] + local crops [nL·B,3,Hl,Wl]."""
        # Call the backbone as a module (not a method): under ZeRO-3 its pre-forward hook gathers
        # its own parameters (cls/storage/mask tokens). Touching them from here instead would
        # register them as "external" parameters of this module on the first step after a
        # checkpoint load and break DeepSpeed's prefetch trace.
        dtype = self.compute_dtype
        g, loc = self.backbone([global_crops.to(dtype), local_crops.to(dtype)], [masks, None],
                               is_training=True)
        cls_g, cls_l = g["x_norm_clstoken"], loc["x_norm_clstoken"]  # [2B, D], [nL·B, D]
        patches = g["x_norm_patchtokens"]  # [2B, N, D]
        masked = masked_tokens(patches, mask_indices)  # [M, D]
        dino_logits = self.dino_head(torch.cat([cls_g, cls_l]))  # [2B + nL·B, K]
        return {"global_cls": cls_g,  # [2B, D] pre-head CLS of the masked global crops (KoLeo)
                "global_patches": patches,  # [2B, N, D] (Gram)
                "dino_logits": dino_logits,  # [2B + nL·B, K]: global rows, then local
                "ibot_logits": self.ibot_head(masked)}  # [M, K]

    @torch.no_grad()
    def teacher_forward(self, global_crops, mask_indices) -> dict[str, torch.Tensor]:
        """Teacher on the unmasked global crops: CLS logits [2B,K], masked-patch logits [M,K].
        (compute_dtype: fp32 for the EMA teacher, whose bf16 compute comes from autocast; the
        dtype a distillation teacher is held in.)"""
        g = self.backbone.forward_features(global_crops.to(self.compute_dtype))
        patches = g["x_norm_patchtokens"]  # [2B, N, D]
        masked = masked_tokens(patches, mask_indices)  # [M, D]
        return {"cls_logits": self.dino_head(g["x_norm_clstoken"]),
                "patch_logits": self.ibot_head(masked), "patches": patches}


def masked_tokens(patches: torch.Tensor, mask_indices: torch.Tensor) -> torch.Tensor:
    """The rows [M, D] of `patches` [n, N, D] at the flat indices `mask_indices` [M] into
    [n·N]. The ViT's patch tokens are a slice of its [n, 1 + storage + N, D] output, not
    contiguous: `flatten(0, 1)` would copy all of them (a [2B, N, D] fp32 write and read per
    forward, 103 MB at ViT-L B = 64, student and teacher) to pick M rows; indexing the two
    dimensions reads only those rows (same values; the backward writes the same gradient)."""
    if patches.is_contiguous():
        return patches.flatten(0, 1).index_select(0, mask_indices)
    n = patches.shape[1]
    return patches[mask_indices // n, mask_indices % n]


def loss_logits(x: torch.Tensor) -> torch.Tensor:
    """Logits as the DINO / iBOT losses (student) and the teacher normalisation take them: bf16
    and fp32 as they are (both the Triton kernels and the references compute in fp32, upcasting
    on load, which is exact, and write the student gradient in the input's dtype, rounded once as
    a .float() copy's backward would round it), anything else upcast. A .float() copy of bf16
    logits costs a [rows, K] fp32 write and read each way and keeps the copy alive for the
    backward: 1 GB for the iBOT logits at ViT-L shapes (3,771 × 65,536)."""
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


def build_student(cfg: Config) -> Student:
    backbone = build_backbone(cfg.model, kernels_impl=cfg.kernels.impl,
                              fuse_pointwise=cfg.kernels.fuse_pointwise)
    dim = backbone.embed_dim
    return Student(backbone, build_head(cfg.dino.head, dim), build_head(cfg.ibot.head, dim))


def head_state_dicts(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"dino_head": ..., "ibot_head": ...}: the heads' state dicts in a whole-student state
    dict, prefixes stripped; a head the state dict does not hold is left out."""
    heads = {name: {k.removeprefix(f"{name}."): v for k, v in flat.items()
                    if k.startswith(f"{name}.")} for name in ("dino_head", "ibot_head")}
    return {name: sd for name, sd in heads.items() if sd}


def load_pretrained(student: Student, weights: str) -> None:
    """Continued pretraining (`model.pretrained_weights`): the backbone strictly from `weights`
    (any source fastdino.eval.weights.read_weights knows); the DINO / iBOT heads too when the
    source carries them (a fastdino run or checkpoint, or a {"teacher": ...} file with
    `dino_head.` / `ibot_head.` keys), strictly as well. Released backbones carry no heads: the
    heads then keep their fresh init, which is logged."""
    from fastdino.eval.weights import read_weights

    sd, source, _, _ = read_weights(weights, key="model.pretrained_weights")
    try:
        load_backbone_state_dict(student.backbone, sd)
    except ValueError as e:
        raise ValueError(f"model.pretrained_weights={weights!r} ({source}) does not fit "
                         f"model.arch: {e}") from None
    flat = sd["teacher"] if isinstance(sd.get("teacher"), dict) else sd
    loaded = []
    for name, head_sd in head_state_dicts(flat).items():
        try:
            getattr(student, name).load_state_dict(head_sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"model.pretrained_weights={weights!r}: the {name} does not fit "
                             f"the configured head: {e}") from None
        loaded.append(name)
    logger.info("initialised the student from %s: backbone%s", source,
                "".join(f", {n}" for n in loaded) or " (no heads in the file: fresh heads)")


def freeze_backbone_layers(backbone: nn.Module, cfg: Config) -> None:
    """`optim.frozen_blocks` (requires_grad off) and `optim.lora_rank` (adapters; the rest of the
    backbone frozen), before the engine and the teacher copies, and the log lines that say what
    continued pretraining will do."""
    o = cfg.optim
    n = freeze_layers(backbone, o.frozen_blocks)
    if o.lora_rank > 0 and o.frozen_blocks >= backbone.n_blocks:
        raise ConfigError(f"optim.frozen_blocks={o.frozen_blocks} freezes all {backbone.n_blocks} "
                          f"blocks: LoRA (optim.lora_rank={o.lora_rank}) adapts blocks "
                          f">= optim.frozen_blocks; allowed is at most {backbone.n_blocks - 1}")
    if o.lora_rank > 0:
        # after the weights are loaded: the adapters start at B = 0, the loaded function exactly
        before = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        backbone.requires_grad_(False)
        k = add_lora(backbone, o.lora_rank, o.lora_alpha or o.lora_rank, tuple(o.lora_targets),
                     first_block=max(o.frozen_blocks, 0))
        trained = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        logger.info("LoRA: rank %d adapters (scale %g) on %d linear layers of the backbone: "
                    "%.2fM parameters train instead of %.1fM", o.lora_rank,
                    (o.lora_alpha or o.lora_rank) / o.lora_rank, k, trained / 1e6, before / 1e6)
        n = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    if n and o.lora_rank == 0:
        blocks = "block 0" if o.frozen_blocks == 1 else f"blocks 0-{o.frozen_blocks - 1}"
        what = ("the whole backbone" if o.frozen_blocks == -1 else
                f"the patch embedding, the tokens and {blocks}")
        logger.info("optim.frozen_blocks=%d: %s frozen (%.1fM parameters never train)",
                    o.frozen_blocks, what, n / 1e6)
    if o.freeze_backbone_epochs > 0:
        logger.info("head warm-up: the backbone's lr is 0 for the first %g epochs "
                    "(optim.freeze_backbone_epochs)", o.freeze_backbone_epochs)
    if (n or o.freeze_backbone_epochs > 0) and cfg.model.pretrained_weights is None:
        logger.warning("the backbone is %s but model.pretrained_weights is not set: it holds "
                       "its random initialisation", "frozen" if n else "held (head warm-up)")


def matmul_params(m: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of `m`'s Linear and Conv layers (a LoRA layer's base included, its
    adapters not): exactly the tensors bf16 autocast casts to bf16 at every call (F.linear,
    F.conv*). Everything else (LayerNorm weights and biases, LayerScale gammas, the cls /
    storage / mask tokens, a learned position table, LoRA adapters) enters elementwise ops or
    ops autocast keeps in fp32, and buffers (RoPE periods, the qkv bias mask) are not listed.
    LinearKMaskedBias multiplies its bias by its 0/1 mask before F.linear: exact in bf16 too.
    The fused Triton paths (kernels.fuse_pointwise, kernels.impl=triton) read only activations
    and the fp32 LayerScale / LayerNorm parameters (layernorm_residual), never a Linear weight."""
    return [p for sub in m.modules() if isinstance(sub, (nn.Linear, nn.modules.conv._ConvNd))
            for p in (sub.weight, sub.bias) if p is not None]


def _frozen_copy(m: nn.Module, matmul_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen eval-mode copy of `m`, with `matmul_params` held in `matmul_dtype`: bf16 for the
    Gram teacher of a bf16 run, the values autocast would cast them to (round to nearest even),
    so its outputs under autocast are bit-identical to an fp32 copy's at half the memory and
    without the per-forward weight casts. Cast while copying (deepcopy memo): no transient fp32
    copy of those weights."""
    memo = {id(p): nn.Parameter(p.detach().to(matmul_dtype), requires_grad=False)
            for p in matmul_params(m) if p.dtype != matmul_dtype}
    m = copy.deepcopy(m, memo).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class SSLMetaArch:
    def __init__(self, cfg: Config, device: torch.device,
                 distillation_teacher: nn.Module | None = None):
        """`distillation_teacher`: the frozen teacher when a co-distillation run shares one
        between its students (codistill.py); built from distillation.teacher otherwise."""
        self.cfg = cfg
        # backends this machine cannot run: a one-line ConfigError now, not at the first step
        check_kernels_impl(cfg.kernels.impl, device)
        if not cfg.model.arch.startswith("convnext_"):  # (a ConvNeXt student has no attention)
            check_attn_impl(cfg.model.attn_impl, device)
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        self.student = build_student(cfg)
        if cfg.model.pretrained_weights is not None:
            load_pretrained(self.student, cfg.model.pretrained_weights)
        freeze_backbone_layers(self.student.backbone, cfg)
        self.student = self.student.to(device)
        # Distillation: a frozen teacher run gives the targets; the student is never masked, so
        # its mask token never gets a gradient (frozen: no optimizer state for an unused value)
        self.distillation_teacher: nn.Module | None = None
        if cfg.distillation.enabled:
            self.distillation_teacher = (distillation_teacher if distillation_teacher is not None
                                         else build_distillation_teacher(cfg, device))
            if hasattr(self.student.backbone, "mask_token"):  # (a ConvNeXt student has none)
                self.student.backbone.mask_token.requires_grad_(False)
        # The teacher starts as the student (official: teacher.load_state_dict(student)); the
        # copy is taken before DeepSpeed partitions the student under ZeRO-3. In distillation
        # runs it is the student's EMA, kept for export and evaluation, not a target.
        self.teacher = _frozen_copy(self.student)
        impl = cfg.kernels.impl
        d = cfg.dino
        # softmax centers move once per optimizer step (update_centers), not per micro-batch
        self.dino_loss = DINOLoss(d.head.n_prototypes, d.student_temp, d.centering,
                                  d.center_momentum, d.sk_iterations, impl,
                                  defer_center_update=True).to(device)
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head.n_prototypes, d.student_temp,
                                             d.centering, d.center_momentum, d.sk_iterations,
                                             impl, defer_center_update=True).to(device)
        self.koleo_loss = (KoLeoLossDistributed(cfg.koleo.group_size, impl) if cfg.koleo.distributed
                           else KoLeoLoss(impl))
        g = cfg.gram
        self.gram_loss = GramLoss(g.img_level, g.remove_neg, g.remove_only_teacher_neg, impl,
                                  tokens_used=g.tokens_used)
        # Gram teacher: a frozen backbone copy, or the EMA teacher itself (gram.ema_teacher)
        self.gram_teacher: nn.Module | None = None
        self.gram_updates = 0
        # gram.teacher_dtype: the dtype of the Gram teacher's Linear / Conv weights (_frozen_copy)
        self.gram_dtype = resolve_teacher_dtype(g.teacher_dtype, cfg, device)
        if g.use and not g.ema_teacher:
            self.gram_teacher = _frozen_copy(self.teacher.backbone, self.gram_dtype)
            held = sum(p.numel() for p in matmul_params(self.gram_teacher))
            logger.info("Gram teacher: a frozen backbone copy, its Linear / Conv weights (%.1fM "
                        "parameters) held in %s (gram.teacher_dtype=%s), %.2f GB per rank",
                        held / 1e6, str(self.gram_dtype).removeprefix("torch."), g.teacher_dtype,
                        sum(t.nbytes for t in (*self.gram_teacher.parameters(),
                                               *self.gram_teacher.buffers())) / 1e9)
            # it_load_ema_teacher = 0: the Gram teacher is the initial teacher
            self.gram_ready = g.ckpt is not None or g.it_load_ema_teacher == 0
            if g.ckpt is not None:  # anything --weights takes: a snapshot, a run, an official
                from fastdino.eval.weights import read_weights  # DCP checkpoint, HF / timm

                sd, source, _, _ = read_weights(g.ckpt, key="gram.ckpt")
                try:
                    load_backbone_state_dict(self.gram_teacher, sd)
                except ValueError as e:
                    raise ValueError(f"gram.ckpt={g.ckpt!r} ({source}) does not fit model.arch: "
                                     f"{e}") from None
        else:
            self.gram_ready = g.use
        self.engine = None
        self._ema_plan: EMAPlan | None = None  # the teacher / student pairs, built at the 1st EMA

    def attach(self, engine) -> None:
        """The engine that owns the student (its `full_values` is ZeRO-3 / bf16 aware). Under
        DeepSpeed bf16 the fp32 master is the bf16-rounded init: the teacher starts from it."""
        self.engine = engine
        self._ema_plan = None  # pairs with this engine's module
        if engine.dtype == torch.bfloat16 and getattr(engine, "zero_stage", -1) >= 0:
            copy_params(self.teacher, engine.module, full_values=engine.full_values)
            if self.gram_teacher is not None and self.cfg.gram.ckpt is None:
                copy_params(self.gram_teacher, self.teacher.backbone)

    # ------------------------------------------------------------------------------ teachers
    @torch.no_grad()
    def teacher_output(self, batch, teacher_temp: float, need_gram: bool = True) -> dict:
        """Teacher targets; with `need_gram` (w_gram > 0) also the Gram teacher's patches. The
        Gram teacher forward (2x the student resolution in the 7B recipe) is skipped while
        w_gram is 0: its loss would not be added."""
        amp = torch.autocast("cuda", dtype=torch.bfloat16,
                             enabled=batch.global_crops.is_cuda and self.engine is not None
                             and self.engine.dtype == torch.bfloat16)
        with amp:
            t = self.target_model.teacher_forward(batch.global_crops, batch.mask_indices)
            # bf16 teacher logits as they are (loss_logits): the SK / centering passes and the
            # student kernels read them 6-8 times, at half the bytes of an fp32 copy
            out = {"dino_targets": self.dino_loss.teacher_targets(loss_logits(t["cls_logits"]),
                                                                 teacher_temp),
                   "ibot_targets": self.ibot_patch_loss.teacher_targets(
                       loss_logits(t["patch_logits"]), teacher_temp, batch.n_masked_patches)}
            if self.cfg.gram.use and self.gram_ready and need_gram:
                if self.gram_teacher is None:  # gram.ema_teacher: the EMA teacher's patches
                    out["gram_patches"] = t["patches"]
                else:
                    crops = batch.gram_crops if batch.gram_crops is not None else batch.global_crops
                    with self._gram_autocast(crops):
                        out["gram_patches"] = self.gram_teacher.forward_features(crops)[
                            "x_norm_patchtokens"]
                    out["gram_hw"] = tuple(s // self.cfg.model.patch_size for s in crops.shape[-2:])
        return out

    def _gram_autocast(self, crops: torch.Tensor):
        """bf16 Linear / Conv weights compute under bf16 autocast. A CUDA bf16 run's teacher
        forward already runs under it (this one is then a no-op); it is opened here for the Gram
        forward where that one is not: gram.teacher_dtype=bf16 in an fp32 run, and a CPU bf16
        run (whose teachers otherwise run in fp32)."""
        if self.gram_dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(crops.device.type, dtype=torch.bfloat16)

    @property
    def target_model(self) -> nn.Module:
        """Where the DINO / iBOT targets come from: the EMA teacher, or the distillation
        teacher."""
        return self.distillation_teacher if self.distillation_teacher is not None else self.teacher

    def student_masks(self, batch):
        """The iBOT masks the student's global crops get: none in distillation runs (SPEC.md
        §1.4: the iBOT loss is still taken at batch.mask_indices, patch-level distillation)."""
        return None if self.distillation_teacher is not None else batch.masks

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        if self._ema_plan is None:
            self._ema_plan = EMAPlan(self.teacher, self.engine.module)
        ema_update(self.teacher, self.engine.module, momentum,
                   full_values=self.engine.full_values, plan=self._ema_plan)

    @torch.no_grad()
    def update_centers(self) -> None:
        """Softmax centering: fold the teacher means recorded over this optimizer step's
        micro-batches into the centers (once per step, after the EMA; collective). No-op under
        Sinkhorn-Knopp."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()

    def discard_center_updates(self) -> None:
        """A skipped step leaves the centers unchanged."""
        self.dino_loss.discard_center_update()
        self.ibot_patch_loss.discard_center_update()

    @torch.no_grad()
    def _start_gram_stage(self, start: int) -> None:
        """A checkpoint written without the Gram loss (DINOv3 stage 1) resumed with it (stage 2,
        SPEC.md §3.7): the Gram teacher is gram.ckpt's (loaded at build), or the resumed EMA
        teacher when gram.it_load_ema_teacher is at or before the resume iteration (the load
        "after iteration it_load - 1" already lies in stage 1), or comes later as usual."""
        g = self.cfg.gram
        self.gram_updates = 0
        if g.ckpt is not None:
            self.gram_ready = True
            logger.info("Gram stage from iteration %d: the Gram teacher is gram.ckpt %s", start,
                        g.ckpt)
            return
        if g.it_load_ema_teacher < 0 or g.it_load_ema_teacher > start:
            self.gram_ready = False  # loaded after iteration it_load_ema_teacher - 1
            return
        copy_params(self.gram_teacher, self.teacher.backbone)
        self.gram_ready = True
        if 0 < g.it_load_ema_teacher < start:
            logger.warning("gram.it_load_ema_teacher=%d lies before the resume iteration %d and "
                           "the checkpoint holds no Gram teacher: the Gram teacher is the EMA "
                           "teacher of iteration %d (for an earlier one, gram.ckpt = a teacher "
                           "snapshot, train.teacher_snapshot_every, or an earlier checkpoint "
                           "folder)", g.it_load_ema_teacher, start, start)
        else:
            logger.info("Gram stage from iteration %d: the Gram teacher is the resumed EMA "
                        "teacher", start)

    @torch.no_grad()
    def update_gram_teacher(self, it: int) -> bool:
        """Gram teacher load / refresh from the EMA teacher after step `it` (SPEC.md §1.6)."""
        g = self.cfg.gram
        if self.gram_teacher is None:
            return False
        load_now = g.it_load_ema_teacher >= 0 and it + 1 == g.it_load_ema_teacher
        refresh = self.gram_ready and gram_refresh_due(it, g.rep_update, g.it_first_update,
                                                       g.update_frequency, self.gram_updates,
                                                       g.max_updates)
        if load_now or refresh:
            copy_params(self.gram_teacher, self.teacher.backbone)
            self.gram_ready = True
            self.gram_updates += int(refresh)
            logger.info("Gram teacher %s from the EMA teacher after iteration %d",
                        "refreshed" if refresh else "loaded", it)
        return load_now or refresh

    # -------------------------------------------------------------------------------- losses
    def compute_losses(self, s: dict, t: dict, batch, v) -> tuple[torch.Tensor, dict]:
        """Total objective of SPEC.md §1.7 and the logged terms (official names, §3.1)."""
        cfg = self.cfg
        dino = self.dino_loss.forward_joint(loss_logits(s["dino_logits"]), t["dino_targets"],
                                            local_loss_weight=v.local_loss_weight)
        ibot = self.ibot_patch_loss(loss_logits(s["ibot_logits"]), t["ibot_targets"],
                                    batch.masks_weight, n_images=batch.global_crops.shape[0])
        B = batch.n_images
        cls = s["global_cls"].view(2, B, -1)  # [2, B, D]
        if cfg.koleo.distributed:
            koleo_sum = self.koleo_loss(cls[0]) + self.koleo_loss(cls[1])
        elif B < 2:  # one image per rank: no neighbour (config: only with koleo.loss_weight 0)
            koleo_sum = cls.new_zeros((), dtype=torch.float32)
        else:
            koleo_sum = self.koleo_loss(cls).sum()  # per crop, summed over the 2 global crops
        # official: koleo_loss = Σ_g KoLeo_g / n_g is logged, w·n_g·koleo_loss = w·Σ_g is added
        total = cfg.dino.loss_weight * dino["dino_loss"] + cfg.ibot.loss_weight * ibot \
            + cfg.koleo.loss_weight * koleo_sum
        terms = {"dino_local_crops_loss": dino["dino_local_crops_loss"],
                 "dino_global_crops_loss": dino["dino_global_crops_loss"],
                 "dino_local_loss_weight": v.local_loss_weight,
                 "koleo_loss": koleo_sum / 2, "ibot_loss": ibot}
        if cfg.gram.use:
            gram = torch.zeros((), device=total.device)
            if "gram_patches" in t and v.gram_weight > 0:
                hw = tuple(x // cfg.model.patch_size for x in batch.global_crops.shape[-2:])
                dt = torch.bfloat16 if cfg.gram.compute_dtype == "bf16" else torch.float32
                gram = self.gram_loss(s["global_patches"].to(dt), t["gram_patches"].to(dt),
                                      student_hw=hw, teacher_hw=t.get("gram_hw", hw),
                                      masks=batch.masks, mask_indices=batch.mask_indices)
                total = total + v.gram_weight * gram
            terms.update(gram_loss=gram, gram_loss_weight=v.gram_weight)
        terms["total_loss"] = total
        # collapse indicators (USERS.md §3): teacher entropy, KoLeo nearest-neighbour distances
        terms["dino_teacher_entropy"] = t["dino_targets"].entropy()
        terms["ibot_teacher_entropy"] = t["ibot_targets"].entropy()
        terms.update(self.koleo_loss.last_stats or {})
        return total, {k: x.detach() if torch.is_tensor(x) else x for k, x in terms.items()}

    # ---------------------------------------------------------------------------- checkpoint
    def state_for_checkpoint(self) -> dict:
        st = {"teacher": self.teacher.state_dict(), "gram_updates": self.gram_updates,
              "gram_ready": self.gram_ready}
        if self.gram_teacher is not None:  # in the dtypes it is held in (bf16 weights: half)
            st["gram_teacher"] = self.gram_teacher.state_dict()
        for name in ("dino_loss", "ibot_patch_loss"):
            loss = getattr(self, name)
            st[name] = loss.state_dict()
            # None between optimizer steps (the trainer folds it in at every step's end)
            st[name + "_pending_center"] = loss.pending_center_state()
        return st

    def load_from_checkpoint(self, st: dict) -> None:
        self.teacher.load_state_dict(st["teacher"])
        self._ema_plan = None  # (load_state_dict copies in place; re-paired once, to be safe)
        self.gram_updates, self.gram_ready = st["gram_updates"], st["gram_ready"]
        if self.gram_teacher is None:  # Gram off, or gram.ema_teacher: nothing to restore
            self.gram_ready = self.cfg.gram.use
        elif "gram_teacher" in st:
            # saved in the dtypes it is held in; load_state_dict copies into ours, casting (an
            # fp32 Gram teacher of an older checkpoint or an fp32 run: rounded as autocast would)
            self.gram_teacher.load_state_dict(st["gram_teacher"])
        else:  # written without the Gram loss: the Gram stage starts here
            self._start_gram_stage(st["iteration"])
        for name in ("dino_loss", "ibot_patch_loss"):
            loss = getattr(self, name)
            loss.load_state_dict(st[name])
            loss.load_pending_center_state(st[name + "_pending_center"])
        # checkpoints of the lazy update hold the last step's mean: fold it in now (the lazy
        # update did at the next call, before the center was used); collective, all ranks load
        self.update_centers()

