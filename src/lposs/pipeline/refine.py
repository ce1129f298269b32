"""LPOSS+ as a post-processor for any segmenter's scores or label map: the pixel graph of
an image and one propagation, no encoder (``lposs refine``, METHOD.md LPOSS+)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DEFAULT_MAX_PIXELS, UNKNOWN, LPOSSConfig
from ..errors import ScoresError
from ..propagation import pixel_propagation
from ..vocab import MAX_NAMES
from .checks import check_scores, same_aspect_ratio
from .image import read_image, working_image, working_size
from .scores import ScoreMaps

__all__ = ["refine_score_maps", "refine_scores", "refine_labels"]


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
        image: what ``lposs.pipeline.image.read_image`` accepts, `(3, H, W)` once read.
        scores: `(C, h, w)` finite scores at any size of the image's aspect ratio.
        config: r, tau, alpha, tol, max_iter, short_side and long_side are used.

    Returns:
        The refined scores, `(C, H, W)` once resized (``ScoreMaps.shape``).

    Raises:
        ScoresError: scores not `(C, h, w)` with C >= 1, not finite, or of another aspect
            ratio than the image (``lposs.pipeline.checks.check_scores``).
    """
    image = read_image(image, max_pixels=max_pixels)
    check_scores(scores, tuple(image.shape[-2:]))
    return _refine(image, scores, config or LPOSSConfig())


def _refine(image: torch.Tensor, scores: torch.Tensor, cfg: LPOSSConfig) -> ScoreMaps:
    working = working_image(image, cfg.short_side, cfg.long_side)
    if tuple(scores.shape[-2:]) != tuple(working.shape[-2:]):
        scores = F.interpolate(scores.float()[None], size=working.shape[-2:], mode="bilinear",
                               align_corners=False)[0]
    refined = pixel_propagation(working, scores.float(), r=cfg.r, tau=cfg.tau, alpha=cfg.alpha,
                                tol=cfg.tol, max_iter=cfg.max_iter)
    return ScoreMaps(refined, None, tuple(image.shape[-2:]))


def refine_scores(
    image, scores: torch.Tensor, config: LPOSSConfig | None = None, *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """:func:`refine_score_maps` resized to the image: `(C, H, W)` float32 refined scores
    (C full-size maps; for a large image use ``refine_score_maps``)."""
    return refine_score_maps(image, scores, config, max_pixels=max_pixels).full()


@torch.inference_mode()
def refine_labels(
    image, labels: torch.Tensor, num_classes: int | None = None,
    config: LPOSSConfig | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ScoreMaps:
    """LPOSS+ refinement of a label map: each class's indicator is resized bilinearly to
    the working size (one class at a time: the same as resizing the one-hot scores,
    without holding them) and propagated; pixels with a value >= ``num_classes`` (e.g.
    255, unknown) start with all zeros and are filled from their neighbours.

    Args:
        image: what ``lposs.pipeline.image.read_image`` accepts, `(3, H, W)` once read.
        labels: `(h, w)` integer class indices at any size of the image's aspect ratio.
        num_classes: C, the number of classes (e.g. the class names given); None takes
            the largest value below 255, plus one.
        config: as for :func:`refine_score_maps`.

    Returns:
        The refined scores, `(C, H, W)` once resized.

    Raises:
        ScoresError: a map of another aspect ratio, C outside 1..512, or no pixel below C.
    """
    cfg = config or LPOSSConfig()
    image = read_image(image, max_pixels=max_pixels)
    size = tuple(image.shape[-2:])
    if labels.ndim != 2 or not same_aspect_ratio(tuple(labels.shape), size):
        raise ScoresError(f"the label map is {'x'.join(map(str, labels.shape))} but the image "
                          f"is {size[0]}x{size[1]}: another aspect ratio, so not a map of this "
                          "image (a map of the same aspect ratio at another size is resized)")
    valid = labels[labels < UNKNOWN]
    n = num_classes or (int(valid.max()) + 1 if valid.numel() else 1)
    if not 1 <= n <= MAX_NAMES:
        raise ScoresError(f"the number of classes must be 1..{MAX_NAMES}, got {n} (each class "
                          "is propagated separately, so memory and time grow with it)")
    if not bool((labels < n).any()):
        which = f"below {n}" if num_classes else "index (every pixel is 255, unknown)"
        raise ScoresError(f"nothing to refine: no pixel of the label map holds a class {which}")
    working = working_size(*size, cfg.short_side, cfg.long_side)
    scores = torch.empty((n, *working))
    for c in range(n):
        indicator = (labels == c).float()[None, None]
        scores[c] = F.interpolate(indicator, size=working, mode="bilinear",
                                  align_corners=False)[0, 0]
    return _refine(image, scores, cfg)
