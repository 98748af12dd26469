"""Models: the DINOv3 ViT backbone, its factories, the DINO/iBOT head and checkpoint interop."""

from fastdino.models.backbones import (
    ARCH_TABLE,
    build_backbone,
    vit_7b,
    vit_base,
    vit_huge_plus,
    vit_large,
    vit_large_plus,
    vit_small,
    vit_small_plus,
    vit_test,
    vit_tiny,
)
from fastdino.models.dino_head import DINOHead, build_head
from fastdino.models.state_dict_io import extract_backbone_state_dict, load_backbone_state_dict
from fastdino.models.vision_transformer import DinoVisionTransformer

__all__ = [
    "ARCH_TABLE", "DINOHead", "DinoVisionTransformer", "build_backbone", "build_head",
    "extract_backbone_state_dict", "load_backbone_state_dict", "vit_7b",
    "vit_base", "vit_huge_plus", "vit_large", "vit_large_plus", "vit_small", "vit_small_plus",
    "vit_test", "vit_tiny",
]
