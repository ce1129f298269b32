"""``lposs refine``: LPOSS+ boundary refinement of another segmenter's scores or label map."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import LPOSSConfig
from ..errors import LpossError
from .options import HelpFormatter, add_propagation_options, config_from, ensure_writable

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
                        help="float scores (C, H, W) as a .npy file (any H, W: resized)")
    source.add_argument("--labels", type=Path, metavar="L.png",
                        help="a label map PNG (pixel value = class index)")
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
    import numpy as np
    import torch

    from ..config import UNKNOWN
    from ..images import load_label_map, read_image
    from ..segmentation import provenance
    from ..segmenter import Segmentation, refine_scores
    from ..vocab import parse_class_names

    if args.scores is not None:
        try:
            scores = torch.from_numpy(np.load(args.scores, allow_pickle=False)).float()
        except (OSError, ValueError) as err:
            raise LpossError(f"cannot read scores {args.scores}: {err}") from None
        if scores.ndim != 3:
            raise LpossError(f"scores in {args.scores} must have shape (C, H, W), "
                             f"got {tuple(scores.shape)}")
    else:
        labels = load_label_map(args.labels)
        valid = labels[labels < UNKNOWN]
        n = args.num_classes or (int(valid.max()) + 1 if valid.numel() else 1)
        one_hot = torch.nn.functional.one_hot(torch.where(labels < n, labels, n), n + 1)
        scores = one_hot[..., :n].permute(2, 0, 1).float()  # (C, H, W); others all zero
    n_classes = scores.shape[0]
    if args.classes is not None:
        classes = parse_class_names(args.classes)
        if len(classes) != n_classes:
            raise LpossError(f"--classes names {len(classes)} classes but the input has "
                             f"{n_classes}")
    else:
        classes = [f"class{i}" for i in range(n_classes)]
    ensure_writable(args.out)
    start = time.perf_counter()
    config = config_from(args, LPOSSConfig())
    image = read_image(args.image)  # decoded once, for the refinement and the overlay
    refined = refine_scores(image, scores, config)
    result = Segmentation(refined.argmax(dim=0), refined, classes,
                          {"refine": time.perf_counter() - start},
                          {"r": config.r, "tau": config.tau, "alpha": config.alpha,
                           "short_side": config.short_side},
                          source=str(args.image.resolve()),
                          provenance=provenance(device=refined.device, precision="fp32"))
    result.save(args.out, args.image.stem, image, scores=args.save_scores)
    print(f"refined {args.image} ({n_classes} classes) in {result.timings['refine']:.1f} s "
          f"-> {args.out}")
    return 0
