"""The calling convention every backbone shares (the official DINOv3 one), for the ViT
(vision_transformer.py) and the ConvNeXt students (convnext.py): each implements
`forward_features_list(x_list, masks_list)` and its own intermediate outputs."""

from __future__ import annotations

import torch


class BackboneCalls:
    def forward_features(self, x: torch.Tensor | list[torch.Tensor], masks=None):
        """One crop batch -> its output dict; a list of crop batches (one per resolution) ->
        a list of them."""
        if isinstance(x, torch.Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks if masks is not None else [None] * len(x))

    def forward(self, x, masks=None, *, is_training: bool = False):
        ret = self.forward_features(x, masks)
        return ret if is_training else self.head(ret["x_norm_clstoken"])


def pack_intermediates(outputs: list, class_tokens: list, extra_tokens: list,
                       return_class_token: bool, return_extra_tokens: bool) -> tuple:
    """get_intermediate_layers' result: the patch outputs, zipped with the CLS and / or the
    storage tokens when asked for."""
    if return_class_token and return_extra_tokens:
        return tuple(zip(outputs, class_tokens, extra_tokens, strict=True))
    if return_class_token:
        return tuple(zip(outputs, class_tokens, strict=True))
    if return_extra_tokens:
        return tuple(zip(outputs, extra_tokens, strict=True))
    return tuple(outputs)
