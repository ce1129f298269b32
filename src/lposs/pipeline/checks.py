"""Checks of the arrays and numbers users give next to an image: score maps and label maps
(their shape against the image's) and the abstain threshold. No model code."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, ScoresError
from ..vocab import MAX_NAMES

__all__ = ["same_aspect_ratio", "check_scores", "check_unknown_threshold"]


def same_aspect_ratio(size: tuple[int, int], reference: tuple[int, int]) -> bool:
    """Whether an ``(h, w)`` map can be the ``(H, W)`` reference resized.

    Each side of a resized map is off by less than a pixel from the exact scale (rounding
    down, up or to nearest), so ``|h * W - w * H|`` stays below ``H + W`` when the map was
    scaled down from the reference and below ``h + w`` when the reference was the smaller.

    Args:
        size: ``(h, w)`` of the map.
        reference: ``(H, W)`` of the image.

    Returns:
        True for the same aspect ratio, within rounding.
    """
    h, w = (int(v) for v in size)
    height, width = (int(v) for v in reference)
    return abs(h * width - w * height) < max(height + width, h + w)


def check_scores(scores: torch.Tensor, image_size: tuple[int, int]) -> None:
    """Check per-class scores given for an image of ``image_size``.

    Args:
        scores: ``(C, h, w)`` scores, any ``h, w`` of the image's aspect ratio.
        image_size: ``(H, W)`` of the image.

    Raises:
        TypeError: ``scores`` is not a tensor.
        ScoresError: not three axes, no classes or no pixels, more than
            :data:`lposs.vocab.MAX_NAMES` (512) classes, NaN or infinite values, or a map of
            another aspect ratio (with the fix when it looks like ``(H, W, C)``).
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor (C, H, W), got {type(scores).__name__}")
    shape = tuple(scores.shape)
    if scores.ndim == 2:
        raise ScoresError(f"scores must have shape (C, H, W), got {shape}: a single map "
                          "needs a class axis first, e.g. scores[None]")
    if scores.ndim != 3:
        raise ScoresError(f"scores must have shape (C, H, W), got {shape}")
    if 0 in shape:
        raise ScoresError(f"scores of shape {shape} are empty: (C, H, W) needs at least "
                          "one class and one pixel")
    height, width = (int(v) for v in image_size)
    if not same_aspect_ratio(shape[1:], (height, width)):
        if same_aspect_ratio(shape[:2], (height, width)) and shape[2] < max(shape[:2]):
            raise ScoresError(f"scores have shape {shape}, which for this {height}x{width} "
                              "image looks like (H, W, C); transpose to (C, H, W), e.g. "
                              "scores.transpose(2, 0, 1) in numpy")
        raise ScoresError(f"scores of shape {shape} do not fit the {height}x{width} image: "
                          f"a {shape[1]}x{shape[2]} map has another aspect ratio; give "
                          "(C, H, W) scores of this image (any size of its aspect ratio)")
    if shape[0] > MAX_NAMES:
        raise ScoresError(f"scores of shape {shape} hold {shape[0]} classes; at most "
                          f"{MAX_NAMES} are refined at once (each is propagated separately, "
                          "so memory and time grow with their number): refine them in groups")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise ScoresError(f"scores hold {bad} NaN or infinite value(s) of {scores.numel()}; "
                          "give finite numbers (e.g. numpy.nan_to_num)")


def check_unknown_threshold(unknown_threshold: float | None) -> None:
    """Check an abstain threshold: None (off) or a number in [-1, 1] (the scores are
    propagation-weighted averages of cosine similarities, so they lie in [-1, 1]).

    Raises:
        ConfigError: anything else (a bool, a string, NaN, infinity, e.g. 30 meant as %).
    """
    if unknown_threshold is None:
        return
    if isinstance(unknown_threshold, bool) or not isinstance(unknown_threshold, (int, float)):
        raise ConfigError(f"unknown_threshold must be a number or None, got "
                          f"{unknown_threshold!r}")
    if not math.isfinite(unknown_threshold):
        raise ConfigError(f"unknown_threshold must be a finite number, got {unknown_threshold}")
    if not -1.0 <= unknown_threshold <= 1.0:
        raise ConfigError(f"unknown_threshold is on the scale of cosine similarity, -1..1, "
                          f"got {unknown_threshold}: every pixel would be "
                          f"{'unknown' if unknown_threshold > 1 else 'labelled'}; a useful "
                          "threshold lies between the scores of Segmentation.scores (e.g. 0.2)")
