"""MaskCLIP (Zhou et al., ECCV 2022) as lposs runs it: the last block's attention is its value path.

Follows ``ClipEncoder._features`` / ``_value_path`` in ``lposs/encoders/clip.py`` (METHOD.md,
Encoders) line by line: ``v = out_proj(W_v ln_1(x) + b_v); x = x + v; x = x + mlp(ln_2(x))``,
positional embedding resized to the grid (``pos_rule="size"``), then ``ln_post`` and the
projection.
Text side: lposs's 80 ImageNet templates, each prompt L2-normalised, averaged, renormalised.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import check_pixels, project, tokens_before_last_block

__all__ = ["PROTOCOL", "dense_features"]

# lposs's own MaskCLIP setup (config.py LPOSSConfig defaults; METHOD.md, Encoders).
PROTOCOL = {
    "pos_rule": "size",  # encoders/clip.py ClipEncoder._positional_embedding
    "short_side": 448,  # config.py LPOSSConfig.short_side (long_side 2048)
    "window": 224,  # config.py LPOSSConfig.windows
    "stride": 112,  # config.py LPOSSConfig.windows
    "templates": "imagenet80",  # data/prompt_templates.json
}


def dense_features(visual: nn.Module, pixels: Tensor) -> Tensor:
    """MaskCLIP dense features.

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size P.

    Returns:
        ``(B, E, H/P, W/P)`` unnormalised features, in the model's dtype.
    """
    check_pixels(pixels)
    x, grid = tokens_before_last_block(visual, pixels, pos_rule="size")
    block = visual.transformer.resblocks[-1]
    attn, width = block.attn, x.shape[-1]
    v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    x = x + block.ls_1(attn.out_proj(v))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return project(visual, x, grid)
