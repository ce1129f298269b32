"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020).

A transcription of visinf/1-stage-wseg ``models/mods/pamr.py`` (``PAMR``, ``LocalAffinityAbs``,
``LocalAffinityCopy``, ``LocalStDev``), as copied into SCLIP's and NACLIP's ``pamr.py``.
For each dilation ``d``, a pixel's neighbours are the 8 pixels at offsets ``d * (dy, dx)``
(replicate padding). The affinity to neighbour ``p`` is
``softmax_p(mean_channels(-|I - I_p| / (1e-8 + 0.1 * std)))``, with ``std`` the unbiased
standard deviation, per channel, of the 9 taps (centre included) of every dilation together;
each iteration replaces the masks by the affinity-weighted sum of their neighbours.
SCLIP and NACLIP apply it to the cosine logits (before ``logit_scale`` and softmax), resized
to the original image size, with the CLIP-normalised image resized bilinearly to that size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import check_shape

__all__ = ["pamr"]

_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(x: Tensor, dilations: tuple[int, ...], *, centre: bool) -> Tensor:
    """``(B, K, P, H, W)`` values of ``(B, K, H, W)`` ``x`` at the offsets of every dilation."""
    height, width = x.shape[-2:]
    taps = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        offsets = _OFFSETS[:4] + ((0, 0),) + _OFFSETS[4:] if centre else _OFFSETS
        for dy, dx in offsets:
            taps.append(padded[..., d + d * dy:d + d * dy + height, d + d * dx:d + d * dx + width])
    return torch.stack(taps, dim=2)


def pamr(image: Tensor, masks: Tensor, *, iterations: int, dilations: tuple[int, ...]) -> Tensor:
    """Refine masks by ``iterations`` steps of image-adaptive neighbour averaging.

    Args:
        image: ``(B, 3, H, W)`` the guiding image (SCLIP, NACLIP: CLIP-normalised).
        masks: ``(B, C, h, w)`` scores; resized bilinearly (``align_corners=True``) to H x W.
        iterations: number of refinement steps, >= 0.
        dilations: neighbourhood distances in pixels, each >= 1.

    Returns:
        ``(B, C, H, W)`` refined masks.
    """
    check_shape(image, "image", (None, None, None, None))
    check_shape(masks, "masks", (image.shape[0], None, None, None))
    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    std = _neighbours(image, dilations, centre=True).std(2, keepdim=True)
    diff = (image.unsqueeze(2) - _neighbours(image, dilations, centre=False)).abs()
    affinity = F.softmax((-diff / (1e-8 + 0.1 * std)).mean(1, keepdim=True), dim=2)
    for _ in range(iterations):
        masks = (_neighbours(masks, dilations, centre=False) * affinity).sum(2)
    return masks
