"""``lposs refine``: LPOSS+ boundary refinement of another segmenter's scores or label map."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import LPOSSConfig
from ..errors import LpossError
from .options import HelpFormatter, add_propagation_options, config_from, writing_to

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "LPOSS+ boundary refinement of any model's scores or label map"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``refine`` command to ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "refine", formatter_class=HelpFormatter, help=SUMMARY,
        description="Refine another segmenter's output with LPOSS+ (label propagation over "
                    "pixels).\nA label map is one-hot encoded first (values >= the number of "
                    "classes, e.g. 255,\nstart empty and are filled from their neighbours).",
    )
    p.add_argument("image", type=Path, metavar="IMAGE", help="the image the scores belong to")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", type=Path, metavar="S.npy",
                        help="float scores (C, H, W) as a .npy file (any H, W of the image's "
                             "aspect ratio: resized)")
    source.add_argument("--labels", type=Path, metavar="L.png",
                        help="a label map PNG (pixel value = class index; any size of the "
                             "image's aspect ratio: resized)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names for the legend (default: class0, ...)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes in --labels (default: largest label value below 255, + 1)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--save-scores", action="store_true", help="also write the refined scores")
    add_propagation_options(p, patch=False, preset=False)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lposs refine`` from parsed arguments; returns the exit status."""
    import torch

    from ..config import UNKNOWN
    from ..output.segmentation import Segmentation, provenance
    from ..pipeline.checks import check_scores
    from ..pipeline.images import read_image
    from ..pipeline.refine import refine_score_maps
    from ..pipeline.windows import working_size
    from ..vocab import MAX_NAMES, parse_class_names

    if args.num_classes is not None and args.scores is not None:
        raise LpossError("--num-classes only applies to --labels (scores give C themselves)")
    if args.num_classes is not None and not 1 <= args.num_classes <= MAX_NAMES:
        raise LpossError(f"--num-classes must be 1..{MAX_NAMES}, got {args.num_classes} (each "
                         "class is propagated separately, so memory and time grow with it)")
    config = config_from(args, LPOSSConfig())
    image = read_image(args.image)  # decoded once, for the refinement and the overlay
    size = tuple(image.shape[-2:])
    if args.scores is not None:
        scores = _load_scores(args.scores)
        try:
            check_scores(scores, size)
        except LpossError as err:
            raise LpossError(f"{args.scores}: {err}") from None
    else:
        working = working_size(*size, config.short_side, config.long_side)
        scores = _label_scores(args.labels, args.num_classes, size, working, args.image)
    n_classes = scores.shape[0]
    if args.classes is not None:
        classes = parse_class_names(args.classes)
        if len(classes) != n_classes:
            raise LpossError(f"--classes names {len(classes)} classes but the input has "
                             f"{n_classes}")
    else:
        classes = [f"class{i}" for i in range(n_classes)]
    with writing_to(args.out):
        start = time.perf_counter()
        refined = refine_score_maps(image, scores, config)
        labels = refined.labels(dtype=torch.uint8 if n_classes < UNKNOWN else torch.int64)
        result = Segmentation(labels, refined, classes,
                              {"refine": time.perf_counter() - start},
                              {"r": config.r, "tau": config.tau, "alpha": config.alpha,
                               "short_side": config.short_side},
                              source=str(args.image.resolve()),
                              provenance=provenance(device=refined.raw.device, precision="fp32"))
        result.save(args.out, args.image.stem, image, scores=args.save_scores)
    print(f"refined {args.image} ({n_classes} classes) in {result.timings['refine']:.1f} s "
          f"-> {args.out}")
    return 0


def _load_scores(path: Path):
    """`(C, H, W)` float32 scores from a ``.npy`` file (shape checked by the caller)."""
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise LpossError(f"cannot read scores {path}: {err}") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise LpossError(f"scores in {path} must be a numeric .npy array (C, H, W)")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise LpossError(f"scores in {path} are complex numbers; give real scores (C, H, W)")
    return torch.from_numpy(array).float()


def _label_scores(path: Path, num_classes: int | None, size: tuple[int, int],
                  working: tuple[int, int], image: Path):
    """A label map as one-hot `(C, h, w)` float scores at the ``working`` size (each class's
    indicator resized bilinearly, one class at a time: the same as resizing the full
    one-hot, without holding it); pixels with a value >= C (e.g. 255) get all zeros and
    are filled by the propagation.

    Raises:
        LpossError: a map of another aspect ratio than the image's ``size``, or one with no
            pixel below C (nothing to refine).
    """
    import torch

    from ..config import UNKNOWN
    from ..pipeline.checks import same_aspect_ratio
    from ..pipeline.images import load_label_map

    labels = load_label_map(path)
    height, width = labels.shape
    if not same_aspect_ratio((height, width), size):
        raise LpossError(f"label map {path} is {height}x{width} but {image} is "
                         f"{size[0]}x{size[1]}: another aspect ratio, so not a map of this "
                         "image (a map of the same aspect ratio at another size is resized)")
    valid = labels[labels < UNKNOWN]
    n = num_classes or (int(valid.max()) + 1 if valid.numel() else 1)
    if not bool((labels < n).any()):
        which = f"below {n}" if num_classes else "index (every pixel is 255, unknown)"
        raise LpossError(f"nothing to refine: no pixel of {path} holds a class {which}")
    scores = torch.empty((n, *working))
    for c in range(n):
        indicator = (labels == c).float()[None, None]
        scores[c] = torch.nn.functional.interpolate(indicator, size=working, mode="bilinear",
                                                    align_corners=False)[0, 0]
        del indicator
    return scores
