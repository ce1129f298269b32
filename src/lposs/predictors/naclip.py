"""NACLIP (Hajimiri et al., WACV 2025): neighbourhood-aware key-key attention, reduced block.

A transcription of sinahmr/NACLIP ``clip/model.py`` (``VisionTransformer.forward`` with
``arch='reduced'``, ``attn_strategy='naclip'``; ``custom_attn``, ``gaussian_window``,
``get_attention_addition``, ``interpolate_pos_encoding``) and ``naclip.py`` (``NACLIP``).
The last block's output is ``out_proj(softmax(k k^T / sqrt(d) + omega) v)`` alone (no
residual, no MLP), then ``ln_post`` and the projection. ``omega`` adds, between patches
``(i, j)`` and ``(k, l)``, ``exp(-((i-k)^2 + (j-l)^2) / (2 std^2))`` (the official
convolution of a ``(2gh-1, 2gw-1)`` Gaussian window with one-hot maps), 0 in the class
token's row and column. Positional embedding: the ``(g + 0.1) / g0`` scale rule.

Text side: 80 OpenAI ImageNet templates, each prompt L2-normalised, averaged, renormalised;
class-name files split on ``", "``, max over synonyms after the softmax. The segmentor
L2-normalises patch features, takes cosine logits, upsamples bilinearly to the window,
averages windows (``slide_crop=0``: the whole image at once), resizes the logits bilinearly
to the original image size, then PAMR on those cosine logits with the CLIP-normalised
input image resized bilinearly to the same size (10 iterations, dilations (8, 16)); then
``softmax(logit_scale * logits)`` over classes, max over synonyms, ``prob_thd`` to class 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import attend, check_pixels, heads_qkv, project, tokens_before_last_block

__all__ = ["PROTOCOL", "neighbourhood_bias", "dense_features"]

# Defaults of NACLIP.__init__ (naclip.py), configs/base_config.py and the test pipelines of
# configs/cfg_*.py. Per-dataset entries override the defaults.
PROTOCOL = {
    "clip": "ViT-B/16 (OpenAI)",  # configs/base_config.py clip_path
    "arch": "reduced",  # naclip.py arch
    "attn_strategy": "naclip",  # naclip.py attn_strategy
    "gaussian_std": 5.0,  # naclip.py gaussian_std
    "pos_rule": "scale",  # clip/model.py interpolate_pos_encoding
    "short_side": 336,  # configs/cfg_context59.py Resize scale=(2048, 336), keep_ratio
    "window": 224,  # naclip.py slide_crop
    "stride": 112,  # naclip.py slide_stride
    "logit_scale": 40,  # naclip.py logit_scale
    "prob_thd": 0.0,  # naclip.py prob_thd
    "pamr_steps": 10,  # naclip.py pamr_steps
    "pamr_dilations": (8, 16),  # naclip.py pamr_stride
    "templates": "openai_imagenet_template (80)",  # prompts/imagenet_template.py
    "per_dataset": {
        "context59": {},  # configs/cfg_context59.py
        "context60": {"prob_thd": 0.1},  # configs/cfg_context60.py
        "voc20": {"window": 0},  # configs/cfg_voc20.py slide_crop=0 (whole image)
        "voc21": {"prob_thd": 0.1, "window": 0},  # configs/cfg_voc21.py
        "coco_object": {"prob_thd": 0.1},  # configs/cfg_coco_object.py
        "coco_stuff164k": {},  # configs/cfg_coco_stuff164k.py
        "ade20k": {},  # configs/cfg_ade20k.py
        "cityscapes": {"short_side": 560},  # configs/cfg_city_scapes.py
    },
}


def neighbourhood_bias(gh: int, gw: int, std: float) -> Tensor:
    """``(1 + gh*gw, 1 + gh*gw)`` float32 Gaussian attention addition ``omega``, class token 0."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()
    gauss = torch.exp(-torch.cdist(cells, cells).square() / (2 * std**2))
    return F.pad(gauss, (1, 0, 1, 0))


def dense_features(visual: nn.Module, pixels: Tensor, *, gaussian_std: float = 5.0) -> Tensor:
    """NACLIP dense features.

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size P.
        gaussian_std: the neighbourhood's standard deviation in patches, > 0.

    Returns:
        ``(B, E, H/P, W/P)`` unnormalised features, in the model's dtype.
    """
    check_pixels(pixels)
    x, grid = tokens_before_last_block(visual, pixels, pos_rule="scale")
    block = visual.transformer.resblocks[-1]
    _, k, v = heads_qkv(block.attn, block.ln_1(x))
    omega = neighbourhood_bias(*grid, gaussian_std).to(k)
    weights = F.softmax(k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + omega, dim=-1)
    return project(visual, attend(block.attn, weights, v), grid)
