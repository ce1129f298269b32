"""SCLIP (Wang et al., ECCV 2024): correlative self-attention in CLIP's last block.

A transcription of wangf3014/SCLIP ``clip/model.py`` (``VisionTransformer.forward`` with
``csa=True``, ``custom_attn``, ``interpolate_pos_encoding``) and ``clip_segmentor.py``
(``CLIPForSegmentation``). The last block keeps its residuals and feed-forward; its attention
weights are ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))`` per head:
``x = x + out_proj(A v); x = x + mlp(ln_2(x))``; then ``ln_post`` and the projection.
Positional embedding: the ``(g + 0.1) / g0`` scale rule.

Text side: 80 OpenAI ImageNet templates (``prompts/imagenet_template.py``), each prompt
L2-normalised, averaged, renormalised; class-name files split on ``", "`` into synonyms, a
class scoring the max over its synonyms after the softmax. The segmentor L2-normalises each
patch feature, takes cosine logits, upsamples them bilinearly to the window, averages the
windows, resizes to the original image size; PAMR (off by default, ``pamr_steps=0``) would
run there, on the cosine logits, with the CLIP-normalised image resized bilinearly to that
size; then ``softmax(logit_scale * logits)`` over classes; ``prob_thd`` sets pixels whose max
probability is below it to class 0 (background); ``area_thd`` (VOC21) zeroes the scores of
foreground classes covering less than that fraction of the predicted foreground.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import attend, check_pixels, heads_qkv, project, tokens_before_last_block

__all__ = ["PROTOCOL", "dense_features"]

# Defaults of CLIPForSegmentation.__init__ (clip_segmentor.py) and configs/base_config.py,
# test pipelines of configs/cfg_*.py. Per-dataset entries override the defaults.
PROTOCOL = {
    "clip": "ViT-B/16 (OpenAI)",  # configs/base_config.py clip_path
    "pos_rule": "scale",  # clip/model.py interpolate_pos_encoding
    "short_side": 336,  # configs/cfg_context59.py Resize scale=(2048, 336), keep_ratio
    "window": 224,  # clip_segmentor.py slide_crop
    "stride": 112,  # clip_segmentor.py slide_stride
    "logit_scale": 40,  # clip_segmentor.py logit_scale
    "prob_thd": 0.0,  # clip_segmentor.py prob_thd
    "area_thd": None,  # clip_segmentor.py area_thd
    "pamr_steps": 0,  # clip_segmentor.py pamr_steps (PAMR off)
    "pamr_dilations": (8, 16),  # clip_segmentor.py pamr_stride
    "templates": "openai_imagenet_template (80)",  # prompts/imagenet_template.py
    "per_dataset": {
        "context59": {},  # configs/cfg_context59.py
        "context60": {"logit_scale": 50, "prob_thd": 0.1},  # configs/cfg_context60.py
        "voc20": {},  # configs/cfg_voc20.py
        "voc21": {"logit_scale": 65, "prob_thd": 0.1, "area_thd": 0.1},  # configs/cfg_voc21.py
        "coco_object": {"logit_scale": 50, "prob_thd": 0.1},  # configs/cfg_coco_object.py
        "coco_stuff10k": {},  # configs/cfg_coco_stuff10k.py
        "coco_stuff164k": {"short_side": 448},  # configs/cfg_coco_stuff164k.py
        "ade20k": {},  # configs/cfg_ade20k.py
        "cityscapes": {"short_side": 560},  # configs/cfg_city_scapes.py
    },
}


def dense_features(visual: nn.Module, pixels: Tensor) -> Tensor:
    """SCLIP dense features.

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size P.

    Returns:
        ``(B, E, H/P, W/P)`` unnormalised features, in the model's dtype.
    """
    check_pixels(pixels)
    x, grid = tokens_before_last_block(visual, pixels, pos_rule="scale")
    block = visual.transformer.resblocks[-1]
    q, k, v = heads_qkv(block.attn, block.ln_1(x))
    scale = q.shape[-1] ** -0.5
    weights = F.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
    weights = weights + F.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
    x = x + block.ls_1(attend(block.attn, weights, v))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return project(visual, x, grid)
