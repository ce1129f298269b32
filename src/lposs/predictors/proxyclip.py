"""ProxyCLIP (Lan et al., ECCV 2024): CLIP's last attention replaced by a vision model's.

A transcription of mc-lan/ProxyCLIP ``open_clip/transformer.py`` (``VisionTransformer.forward``
with ``ex_feats``, ``custom_attn``, ``interpolate_pos_encoding``) and
``proxyclip_segmentor.py`` (``forward_feature``, the DINO branch). CLIP runs up to its last
block; there the attention weights come from the vision foundation model's (VFM) patch
features: their cosine similarities, shifted by ``beta`` times their mean, scaled by
``gamma``, negative entries masked, softmax. They mix CLIP's values (``ln_1``, ``W_v``),
resized bilinearly from CLIP's grid to the VFM's; then ``out_proj`` (no residual, no MLP),
``ln_post`` and the projection, one feature per VFM patch.

Differences from the official code, each where it is undefined or batch-dependent:

- statistics per window: the official ``torch.mean(similarity)`` is over the whole batch,
  and it runs one window at a time; here the mean is taken per window, so a batch of
  windows gives what each window gives alone;
- no NaN: where a row has no non-negative entry (``beta * mean >= 1``, e.g. a flat window
  whose VFM features all point one way) the official softmax of an all ``-inf`` row is
  NaN. Here the mask threshold of such a row is lowered from 0 to the row's maximum, so
  the token attends (uniformly) to its most similar tokens, itself for non-zero features:
  it keeps its own CLIP value. Rows with a non-negative entry are unchanged;
- grids: the official code reshapes CLIP's values as (W/P, H/P) and the VFM's as
  (H/P, H/P), exact for the square windows it runs; here (H/P, W/P) throughout;
- float32 where the official model runs in float16.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders.dino import dino_tokens
from .common import tokens_before_last_block

__all__ = ["PROTOCOL", "dino_output_features", "proxy_attention", "dense_features"]

# The official defaults for PASCAL Context-59 (configs/cfg_context59.py over
# configs/base_config.py and ProxyCLIPSegmentation's defaults in proxyclip_segmentor.py).
PROTOCOL = {
    "clip": "ViT-B-16",  # configs/base_config.py model_type='ViT-B/16'
    "clip_pretrained": "openai",  # configs/base_config.py clip_type='openai'
    "precision": "fp16",  # proxyclip_segmentor.py create_model(precision='fp16'), vfm.half()
    "vfm": "dino_vitb8",  # configs/base_config.py vfm_model='dino'; segmentor: hub dino_vitb8
    "vfm_features": "last block, final norm",  # segmentor: get_intermediate_layers(x)[0][:, 1:]
    "vfm_pixels": "imagenet",  # segmentor: self.norm(self.unnorm(img)), ImageNet mean/std
    "templates": "openai_imagenet_template",  # segmentor (prompts/imagenet_template.py, 80)
    "short_side": 336,  # configs/cfg_context59.py Resize scale=(2048, 336), keep_ratio=True
    "long_side": 2048,  # configs/cfg_context59.py Resize scale=(2048, 336)
    "window": 336,  # proxyclip_segmentor.py slide_crop=336
    "stride": 112,  # proxyclip_segmentor.py slide_stride=112
    "pad_multiple": 56,  # segmentor forward_slide compute_padsize(H, W, 56), centred, zeros
    "average": "logits",  # segmentor forward_slide: cosine logits, bilinear to crop, averaged
    "logit_scale": 40.0,  # proxyclip_segmentor.py logit_scale=40
    "beta": 1.2,  # proxyclip_segmentor.py beta=1.2
    "gamma": 3.0,  # proxyclip_segmentor.py gamma=3.0
    "prob_thd": 0.0,  # proxyclip_segmentor.py prob_thd=0.0 (no background threshold)
    "pamr": False,  # proxyclip_segmentor.py postprocess_result: softmax, max over synonyms
    # Per dataset: configs/cfg_<file> (Resize scale=(2048, short side); model overrides).
    "datasets": {
        "voc": {"short_side": 336, "prob_thd": 0.2},  # cfg_voc21.py
        "voc20": {"short_side": 336},  # cfg_voc20.py
        "context": {"short_side": 336, "prob_thd": 0.15},  # cfg_context60.py
        "context59": {"short_side": 336},  # cfg_context59.py
        "coco_object": {"short_side": 336, "prob_thd": 0.25},  # cfg_coco_object.py
        "coco_stuff": {"short_side": 336},  # cfg_coco_stuff164k.py
        "cityscapes": {"short_side": 448, "window": 224, "stride": 112},  # cfg_city_scapes.py
        "ade20k": {"short_side": 448},  # cfg_ade20k.py
    },
}


def dino_output_features(model: nn.Module, pixels: Tensor) -> Tensor:
    """ProxyCLIP's VFM features from DINO: ``get_intermediate_layers(x)[0]`` without the class
    token, i.e. the last block's output after the final norm.

    Args:
        model: a timm DINO ViT (see :func:`lposs.encoders.dino.dino_tokens`;
            positional embeddings resampled the facebookresearch/dino way).
        pixels: ``(B, 3, H, W)`` ImageNet-normalised, H and W multiples of the patch size P.

    Returns:
        ``(B, D, H/P, W/P)``.
    """
    x = dino_tokens(model, pixels)
    for block in model.blocks:
        x = block(x)
    x = model.norm(x)[:, 1:]
    patch = model.patch_embed.patch_size[0]
    return x.transpose(1, 2).reshape(x.shape[0], -1, pixels.shape[-2] // patch,
                                     pixels.shape[-1] // patch)


def proxy_attention(vfm_features: Tensor, *, gamma: float, beta: float) -> Tensor:
    """``custom_attn``'s attention weights from the VFM's features, per window.

    Args:
        vfm_features: ``(B, C, H, W)``, one window each.
        gamma: scale of the shifted similarities.
        beta: the shift, in units of the window's mean similarity.

    Returns:
        ``(B, H*W, H*W)`` row-stochastic weights: ``softmax`` of
        ``s = gamma * (cos - beta * mean(cos))`` with ``s < min(0, max of the row)`` masked.
    """
    feats = F.normalize(vfm_features.flatten(2), dim=1)
    similarity = feats.transpose(1, 2) @ feats
    similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    floor = similarity.amax(dim=-1, keepdim=True).clamp(max=0.0)
    return similarity.masked_fill(similarity < floor, float("-inf")).softmax(dim=-1)


def dense_features(visual: nn.Module, pixels_clip: Tensor, vfm_features: Tensor, *,
                   gamma: float = 3.0, beta: float = 1.2) -> Tensor:
    """ProxyCLIP's dense CLIP features of a batch of windows, on the VFM's grid.

    Args:
        visual: an OpenCLIP ``VisionTransformer`` (plain ViT, ``nn.MultiheadAttention``).
        pixels_clip: ``(B, 3, H, W)`` CLIP-normalised windows, H and W multiples of its patch.
        vfm_features: ``(B, C, h, w)`` the VFM's features of the same windows
            (:func:`dino_output_features`).
        gamma: ``PROTOCOL["gamma"]``.
        beta: ``PROTOCOL["beta"]``.

    Returns:
        ``(B, E, h, w)`` unnormalised (ProxyCLIP L2-normalises them before the cosine).
    """
    x, (grid_h, grid_w) = tokens_before_last_block(visual, pixels_clip, pos_rule="scale")
    block = visual.transformer.resblocks[-1]
    attn, width = block.attn, x.shape[-1]
    heads, batch = attn.num_heads, x.shape[0]
    h, w = vfm_features.shape[-2:]
    w_v, b_v = attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :]
    v = F.linear(block.ln_1(x), w_v, b_v)[:, 1:]  # (B, gh*gw, width), heads side by side
    v = v.transpose(1, 2).reshape(batch * heads, width // heads, grid_h, grid_w)
    v = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
    v = v.reshape(batch, width, h * w).transpose(1, 2)
    # One set of weights for every head: weights @ v mixes each head's slice alike.
    out = attn.out_proj(proxy_attention(vfm_features, gamma=gamma, beta=beta) @ v)
    out = visual.ln_post(out)
    out = out @ visual.proj if visual.proj is not None else out
    return out.transpose(1, 2).reshape(batch, -1, h, w)
