"""LPOSS+ as a post-processor for any segmenter's scores: the pixel graph of an image and
one propagation, no encoder (``lposs refine``, METHOD.md LPOSS+)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LPOSSConfig
from ..output.segmentation import ScoreMaps
from ..propagation import pixel_propagation
from .checks import check_scores
from .images import DEFAULT_MAX_PIXELS, read_image
from .windows import working_image

__all__ = ["refine_score_maps", "refine_scores"]


@torch.inference_mode()
def refine_score_maps(
    image, scores: torch.Tensor, config: LPOSSConfig | None = None, *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ScoreMaps:
    """LPOSS+ as a standalone post-processor for any segmenter's scores, kept at the
    working size: the result's ``labels()`` and ``class_bands(c)`` resize them to the
    image's size a band of rows at a time, so a large image never holds ``(C, H, W)``.

    The image and scores are resized to the working size (shorter side
    ``config.short_side``, longer side at most ``config.long_side``) and propagated over
    the pixel graph.

    Args:
        image: what ``lposs.pipeline.images.load_image`` accepts, `(3, H, W)` once loaded.
        scores: `(C, h, w)` finite scores at any size of the image's aspect ratio
            (resized to the working size).
        config: r, tau, alpha, tol, max_iter, short_side and long_side are used.

    Returns:
        The refined scores, `(C, H, W)` once resized (``ScoreMaps.shape``).

    Raises:
        ScoresError: scores not `(C, h, w)` with C >= 1, not finite, or of another aspect
            ratio than the image (``lposs.pipeline.checks.check_scores``).
    """
    cfg = config or LPOSSConfig()
    image = read_image(image, max_pixels=max_pixels)
    height, width = image.shape[-2:]
    check_scores(scores, (height, width))
    working = working_image(image, cfg.short_side, cfg.long_side)
    y = F.interpolate(scores.float()[None], size=working.shape[-2:], mode="bilinear",
                      align_corners=False)[0]
    refined = pixel_propagation(working, y, r=cfg.r, tau=cfg.tau, alpha=cfg.alpha, tol=cfg.tol,
                                max_iter=cfg.max_iter)
    return ScoreMaps(refined, None, (height, width))


def refine_scores(
    image, scores: torch.Tensor, config: LPOSSConfig | None = None, *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """:func:`refine_score_maps` resized to the image: `(C, H, W)` float32 refined scores
    (C full-size maps; for a large image use ``refine_score_maps``)."""
    return refine_score_maps(image, scores, config, max_pixels=max_pixels).full()
