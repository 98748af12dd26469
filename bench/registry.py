"""DINOv3 model configurations the benchmarks take their shapes from (SPEC.md §2.1, §2.5, §3.6;
KERNELS.md §2.1). Never hand-type a benchmark shape: derive it from an entry here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DinoShape:
    name: str
    embed_dim: int  # D
    depth: int
    num_heads: int
    batch_per_gpu: int  # B
    global_size: int  # global crop side (px)
    local_size: int  # local crop side (px)
    n_local: int  # local crops per image
    dino_K: int  # DINO prototypes
    dino_bottleneck: int
    ibot_K: int  # iBOT prototypes
    ibot_bottleneck: int
    n_storage_tokens: int = 4
    patch: int = 16
    gram_size: int | None = None  # Gram-teacher crop side

    @property
    def global_patches(self) -> int:  # P of a global crop
        return (self.global_size // self.patch) ** 2

    @property
    def local_patches(self) -> int:
        return (self.local_size // self.patch) ** 2

    @property
    def dino_student_rows(self) -> int:  # student CLS rows: (2 + n_local) * B
        return (2 + self.n_local) * self.batch_per_gpu

    @property
    def dino_teacher_rows(self) -> int:  # teacher CLS rows: 2 * B
        return 2 * self.batch_per_gpu

    @property
    def ibot_rows(self) -> int:
        """Masked tokens per rank, exactly as the v3 collate produces them (SPEC.md §1.4): half of
        the 2B global crops are masked with ratios linspace(0.1, 0.5, n+1)[1:]."""
        n_imgs = int(2 * self.batch_per_gpu * 0.5)
        n = self.global_patches
        step = (0.5 - 0.1) / n_imgs
        return sum(int(n * (0.1 + step * (i + 1))) for i in range(n_imgs))


# ImageNet recipe heads (65,536 prototypes) for S/B/L; the 7B recipe for 7B (SPEC.md §2.5, §3.6).
MODELS: dict[str, DinoShape] = {
    "vits16": DinoShape("vits16", 384, 12, 6, 64, 224, 96, 8, 65536, 256, 65536, 256),
    "vitb16": DinoShape("vitb16", 768, 12, 12, 64, 224, 96, 8, 65536, 256, 65536, 256),
    "vitl16": DinoShape("vitl16", 1024, 24, 16, 64, 224, 96, 8, 65536, 256, 65536, 256),
    "vit7b16": DinoShape("vit7b16", 4096, 40, 32, 16, 256, 112, 8, 262144, 512, 98304, 384,
                         gram_size=512),
}


def get(name: str) -> DinoShape:
    if name not in MODELS:
        raise KeyError(f"unknown DINOv3 shape {name!r}: allowed is one of {', '.join(MODELS)}")
    return MODELS[name]
