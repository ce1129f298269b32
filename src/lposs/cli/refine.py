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
                   help="comma-separated class names for the legend (default: class0, ...); "
                        "with --labels they give the number of classes")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes in --labels (default: the --classes given, else the largest "
                        "label value below 255, + 1)")
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
    from ..pipeline.image import load_label_map, read_image
    from ..pipeline.refine import refine_labels, refine_score_maps
    from ..vocab import MAX_NAMES, parse_class_names

    if args.num_classes is not None and args.scores is not None:
        raise LpossError("--num-classes only applies to --labels (scores give C themselves)")
    if args.num_classes is not None and not 1 <= args.num_classes <= MAX_NAMES:
        raise LpossError(f"--num-classes must be 1..{MAX_NAMES}, got {args.num_classes} (each "
                         "class is propagated separately, so memory and time grow with it)")
    classes = None if args.classes is None else parse_class_names(args.classes)
    if classes and args.num_classes is not None and args.num_classes != len(classes):
        raise LpossError(f"--classes names {len(classes)} classes but --num-classes is "
                         f"{args.num_classes}")
    if args.out.exists() and not args.out.is_dir():
        raise LpossError(f"--out {args.out} is a file, not a folder")
    config = config_from(args, LPOSSConfig())
    image = read_image(args.image)  # decoded once, for the refinement and the overlay
    with writing_to(args.out):
        start = time.perf_counter()
        if args.scores is not None:
            scores = _load_scores(args.scores)
            try:
                check_scores(scores, tuple(image.shape[-2:]))
            except LpossError as err:
                raise LpossError(f"{args.scores}: {err}") from None
            refined = refine_score_maps(image, scores, config)
        else:
            num_classes = args.num_classes or (len(classes) if classes else None)
            try:
                refined = refine_labels(image, load_label_map(args.labels), num_classes, config)
            except LpossError as err:
                raise LpossError(f"{args.labels}: {err}") from None
        n_classes = refined.shape[0]
        if classes is not None and len(classes) != n_classes:
            raise LpossError(f"--classes names {len(classes)} classes but the input has "
                             f"{n_classes}")
        labels = refined.labels(dtype=torch.uint8 if n_classes < UNKNOWN else torch.int64)
        result = Segmentation(labels, refined, classes or [f"class{i}" for i in range(n_classes)],
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
    """`(C, H, W)` float32 scores from a ``.npy`` file (shape checked by the caller): the
    header is read first, so a file that is no array, or shorter than its header claims,
    is refused before anything is allocated."""
    import numpy as np
    import torch

    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            except ValueError:
                raise LpossError(f"{path} is not a .npy array file (save scores with "
                                 "numpy.save)") from None
            header = f.tell()
        if dtype.hasobject or not np.issubdtype(dtype, np.number):
            raise LpossError(f"scores in {path} must be a numeric .npy array (C, H, W)")
        if np.issubdtype(dtype, np.complexfloating):
            raise LpossError(f"scores in {path} are complex numbers; give real scores (C, H, W)")
        claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
        actual = path.stat().st_size - header
        if claimed > actual:
            raise LpossError(f"{path}: the header claims {claimed:,} bytes of {shape} scores but "
                             f"the file has {actual:,}: it is truncated or not what it says")
        array = np.load(path, allow_pickle=False)
    except OSError as err:
        raise LpossError(f"cannot read scores {path}: {err.strerror or err}") from None
    return torch.from_numpy(array).float()
