"""ClearCLIP (Lan et al., ECCV 2024): query-query attention, no residual, no feed-forward.

A transcription of mc-lan/ClearCLIP ``open_clip/transformer.py`` (``VisionTransformer.forward``
with ``model_type='ClearCLIP'``, ``ignore_residual=True``, ``last_n_layers=1``;
``custom_attn``, ``interpolate_pos_encoding``) and ``clearclip_segmentor.py``
(``ClearCLIPSegmentation``). The last block's output is ``out_proj(softmax(q q^T / sqrt(d)) v)``
alone (the residual stream and the MLP are dropped), then ``ln_post`` and the projection.
Positional embedding: the ``(g + 0.1) / g0`` scale rule. The repo's ``configs/base_config.py``
sets ``model_type='vanilla'`` (plain q-k attention, no residual); ClearCLIP itself is
``model_type='ClearCLIP'``, which is what this module computes (paper, Sec. 3).

Text side: OpenCLIP tokenizer, 80 OpenAI ImageNet templates (``prompts/imagenet_template.py``),
each prompt L2-normalised, averaged, renormalised; class-name files split on ``","`` (not
``", "``: synonyms keep their leading space). The segmentor runs in float16, pads each window
(centred) to a multiple of P and crops the logits back, L2-normalises patch features, takes
cosine logits, upsamples bilinearly to the window, averages windows, resizes to the original
size, then ``softmax(logit_scale * logits)``, max over synonyms, ``prob_thd`` to class 0.
No PAMR.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import attend, check_pixels, heads_qkv, project, tokens_before_last_block

__all__ = ["PROTOCOL", "dense_features"]

# Defaults of ClearCLIPSegmentation.__init__ (clearclip_segmentor.py), configs/base_config.py
# and the test pipelines of configs/cfg_*.py. Per-dataset entries override the defaults.
PROTOCOL = {
    "clip": "ViT-B/16 (OpenAI, fp16)",  # configs/base_config.py clip_type, vit_type
    "model_type": "ClearCLIP",  # paper; configs/base_config.py says 'vanilla' (see docstring)
    "pos_rule": "scale",  # open_clip/transformer.py interpolate_pos_encoding
    "short_side": 448,  # configs/cfg_context59.py Resize scale=(2048, 448), keep_ratio
    "window": 448,  # clearclip_segmentor.py slide_crop
    "stride": 224,  # clearclip_segmentor.py slide_stride
    "logit_scale": 50,  # clearclip_segmentor.py logit_scale
    "prob_thd": 0.0,  # clearclip_segmentor.py prob_thd
    "pamr_steps": 0,  # clearclip_segmentor.py has no PAMR
    "templates": "openai_imagenet_template (80)",  # prompts/imagenet_template.py
    "per_dataset": {
        "context59": {},  # configs/cfg_context59.py
        "context60": {"prob_thd": 0.15},  # configs/cfg_context60.py
        "voc20": {},  # configs/cfg_voc20.py
        "voc21": {"prob_thd": 0.5},  # configs/cfg_voc21.py
        "coco_object": {"prob_thd": 0.4},  # configs/cfg_coco_object.py
        "coco_stuff164k": {},  # configs/cfg_coco_stuff164k.py
        "ade20k": {},  # configs/cfg_ade20k.py
        "cityscapes": {"window": 224},  # configs/cfg_city_scapes.py slide_crop=224
    },
}


def dense_features(visual: nn.Module, pixels: Tensor) -> Tensor:
    """ClearCLIP dense features.

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size P.

    Returns:
        ``(B, E, H/P, W/P)`` unnormalised features, in the model's dtype.
    """
    check_pixels(pixels)
    x, grid = tokens_before_last_block(visual, pixels, pos_rule="scale")
    block = visual.transformer.resblocks[-1]
    q, _, v = heads_qkv(block.attn, block.ln_1(x))
    weights = F.softmax(q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return project(visual, attend(block.attn, weights, v), grid)
