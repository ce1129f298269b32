"""What the CLIP-based predictors share, on an OpenCLIP ``VisionTransformer`` (``model.visual``).

Each predictor runs CLIP up to the input of its last residual block
(``tokens_before_last_block``), changes that block, then ``project``s the patch tokens.
The positional embedding is resized from CLIP's pre-training grid ``g0`` by one of two rules:

- ``"size"``: bicubic resize to exactly ``(gh, gw)``, ``align_corners=False``, as MaskCLIP's
  ``resize_pos_embed`` (mmseg ``vit.py``) does (MaskCLIP, ``ClipEncoder``);
- ``"scale"``: bicubic with ``scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0)``, the rule of
  SCLIP, ClearCLIP, NACLIP and ProxyCLIP (``interpolate_pos_encoding`` in their ``model.py``
  / ``transformer.py``, copied from facebookresearch/dino): :func:`lposs.encoders.dino.
  interpolate_pos_encoding`. The output has ``(gh, gw)`` cells but samples slightly
  different positions; skipped where the grid is ``g0 x g0``, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..encoders.dino import interpolate_pos_encoding
from ..propagation.graph import check_shape

__all__ = [
    "POS_RULES",
    "blocks_batch_first",
    "resized_positional_embedding",
    "tokens_before_last_block",
    "heads_qkv",
    "attend",
    "project",
    "check_pixels",
]

POS_RULES = ("size", "scale")


def check_pixels(pixels: Tensor) -> None:
    """Raise ``ValueError`` unless ``pixels`` is a ``(B, 3, H, W)`` floating-point tensor."""
    check_shape(pixels, "pixels", (None, 3, None, None))


def blocks_batch_first(transformer: nn.Module) -> bool:
    """Whether the residual blocks take ``(B, L, D)`` (open_clip >= 2.24) or ``(L, B, D)``."""
    attn = transformer.resblocks[0].attn
    if isinstance(attn, nn.MultiheadAttention):
        return bool(attn.batch_first)
    return bool(getattr(transformer, "batch_first", True))


def resized_positional_embedding(visual: nn.Module, gh: int, gw: int, *, pos_rule: str) -> Tensor:
    """``(1 + gh*gw, width)`` positional embedding for a ``gh x gw`` grid, class row unchanged."""
    pos = visual.positional_embedding
    if pos_rule == "scale":  # facebookresearch/dino's rule, which these methods copy
        return interpolate_pos_encoding(pos, gh, gw)
    if pos_rule != "size":
        raise ValueError(f"pos_rule must be one of {POS_RULES}, got {pos_rule!r}")
    if (gh, gw) == tuple(visual.grid_size):
        return pos
    grid = pos[1:].float().reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.flatten(2)[0].T.to(pos.dtype)])


def tokens_before_last_block(
    visual: nn.Module, pixels: Tensor, *, pos_rule: str
) -> tuple[Tensor, tuple[int, int]]:
    """Patch embedding, class token, positional embedding, ``ln_pre`` and all blocks but the last.

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        pixels: ``(B, 3, H, W)`` CLIP-normalised, H and W multiples of the patch size.
        pos_rule: ``"size"`` or ``"scale"`` (module docstring).

    Returns:
        ``(B, 1 + gh*gw, width)`` tokens, batch-first, and the grid ``(gh, gw)``.
    """
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # (B, width, gh, gw)
    batch, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
    pos = resized_positional_embedding(visual, gh, gw, pos_rule=pos_rule)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))  # patch dropout: identity
    batch_first = blocks_batch_first(visual.transformer)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return (x if batch_first else x.transpose(0, 1)), (gh, gw)


def heads_qkv(attn: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q, k, v``, each ``(B, heads, L, head_dim)``, of ``(B, L, width)`` ``x`` (fused weights)."""
    batch, length, width = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(batch, length, 3, attn.num_heads, width // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def attend(attn: nn.MultiheadAttention, weights: Tensor, v: Tensor) -> Tensor:
    """``out_proj(weights @ v)`` with heads merged: ``(B, heads, L, L)``, ``(B, heads, L, hd)``
    -> ``(B, L, width)``."""
    out = (weights @ v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


def project(visual: nn.Module, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``ln_post`` and the visual projection of the patch tokens (class token dropped).

    Args:
        visual: an OpenCLIP ``VisionTransformer``.
        tokens: ``(B, 1 + gh*gw, width)`` output of the last block.
        grid: ``(gh, gw)``.

    Returns:
        ``(B, E, gh, gw)`` unnormalised features.
    """
    x = visual.ln_post(tokens)[:, 1:]
    if visual.proj is not None:
        x = x @ visual.proj
    return x.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
