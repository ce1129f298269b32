"""The ``lposs`` command line: thin wrappers that parse, call the library and print.

Every user mistake becomes one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS, LPOSSConfig
from .errors import LpossError

__all__ = ["main", "build_parser"]

EXIT_FAILED = 1  # some input failed (others may have succeeded)
EXIT_USAGE = 2  # the command line itself is wrong


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _fail(message: str) -> None:
    print(f"lposs: error: {message}", file=sys.stderr)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--preset", default="lposs+", choices=list(PRESETS),
                       help="named settings (lposs: no pixel stage; ensemble: 224/112 + "
                            "448/224 windows; dino-b8 / dinov2-b14: other vision models)")
    group.add_argument("--device", default=None,
                       help="torch device for the models, e.g. cpu, cuda, cuda:1, mps "
                            "(default: cpu)")
    group.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                       help="encoder precision: fp16 on GPU only; auto: fp16 on CUDA, bf16 on "
                            "CPUs with native bf16, else fp32")
    group.add_argument("--clip-model", default=None, metavar="NAME",
                       help="OpenCLIP model name, or local-dir:/path to an OpenCLIP folder "
                            "(default: the preset's, ViT-B-16)")
    group.add_argument("--clip-pretrained", default=None, metavar="TAG",
                       help="OpenCLIP pretrained tag (default: the preset's, laion2b_s34b_b88k)")
    group.add_argument("--dino-model", default=None, metavar="NAME",
                       help="dino_vitb16, dino_vitb8, dinov2_vitb14 or a timm ViT name "
                            "(default: the preset's)")
    group.add_argument("--clip-weights", type=Path, default=None, metavar="FILE",
                       help="local CLIP checkpoint (.safetensors, .pt, .bin) instead of the "
                            "OpenCLIP cache/download")
    group.add_argument("--dino-weights", type=Path, default=None, metavar="FILE",
                       help="local DINO checkpoint (.safetensors, .pt, .bin) instead of the "
                            "timm cache/download")


def _add_propagation_options(parser: argparse.ArgumentParser, *, patch: bool) -> None:
    defaults = LPOSSConfig()
    group = parser.add_argument_group("propagation (defaults: the paper's; None keeps the "
                                      "preset's value)")
    if patch:
        group.add_argument("--k", type=int, default=None,
                           help=f"neighbours per patch (paper: {defaults.k})")
        group.add_argument("--gamma", type=float, default=None,
                           help=f"appearance power (paper: {defaults.gamma})")
        group.add_argument("--sigma", type=float, default=None,
                           help=f"spatial decay per pixel (paper: {defaults.sigma})")
    group.add_argument("--r", type=int, default=None,
                       help=f"pixel neighbourhood side, odd (paper: {defaults.r})")
    group.add_argument("--tau", type=float, default=None,
                       help=f"colour affinity temperature (paper: {defaults.tau})")
    group.add_argument("--alpha", type=float, default=None,
                       help=f"propagation strength in (0, 1) (paper: {defaults.alpha})")


def _config_from(args: argparse.Namespace, base: LPOSSConfig) -> LPOSSConfig:
    fields = {"k": "k", "gamma": "gamma", "sigma": "sigma", "r": "r", "tau": "tau",
              "alpha": "alpha", "clip_model": "clip", "clip_pretrained": "clip_pretrained",
              "dino_model": "dino"}
    changes = {field: getattr(args, flag) for flag, field in fields.items()
               if getattr(args, flag, None) is not None}
    if getattr(args, "no_refine", False):
        changes["pixel_stage"] = False
    return base.replace(**changes)


def _class_names(args: argparse.Namespace) -> list[str]:
    from .datasets import load_class_names
    from .segmenter import parse_class_names

    if args.classes_file is not None:
        return parse_class_names(load_class_names(args.classes_file))
    return parse_class_names(args.classes)


# --------------------------------------------------------------------------- segment
def _segment_parser(sub) -> None:
    p = sub.add_parser(
        "segment", formatter_class=_Formatter,
        help="segment images into free-text classes",
        description="Segment images into free-text classes with LPOSS+ (or LPOSS).\n\n"
                    "Per image, OUT gets <name>.png (palette label map, pixel = class index, "
                    "255 = unknown),\n<name>_overlay.png (image, class colours, legend) and "
                    "<name>.json (classes, colours,\nshares, timings, settings); "
                    "--save-scores adds <name>_scores.npy (C, H, W) float32.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively) or glob patterns")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help='comma-separated names, ";" joins synonyms: '
                                         '"cat,dog,grass;lawn"')
    vocab.add_argument("--classes-file", type=Path, metavar="FILE",
                       help="one class name per line (';' synonyms, '#' comments)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-refine", action="store_true",
                   help="skip the pixel stage (LPOSS instead of LPOSS+)")
    p.add_argument("--save-scores", action="store_true", help="also write the float scores")
    p.add_argument("--unknown-threshold", type=float, default=None, metavar="T",
                   help="label pixels whose best score (cosine scale) is below T as unknown")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels (default: lposs.io.DEFAULT_MAX_PIXELS; "
                        "0 disables the cap)")
    _add_model_options(p)
    _add_propagation_options(p, patch=True)
    p.set_defaults(run=_run_segment)


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, made unique with the parent folder when stems repeat."""
    counts: dict[str, int] = {}
    for path in paths:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    stems, used = [], set()
    for path in paths:
        stem = path.stem if counts[path.stem] == 1 else f"{path.parent.name}_{path.stem}"
        base, i = stem, 1
        while stem in used:
            i += 1
            stem = f"{base}_{i}"
        used.add(stem)
        stems.append(stem)
    return stems


def _max_pixels(args) -> int | None:
    from .io import DEFAULT_MAX_PIXELS

    if args.max_pixels is None:
        return DEFAULT_MAX_PIXELS
    return None if args.max_pixels <= 0 else args.max_pixels


def _run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import get_preset
    from .io import find_images
    from .segmenter import Segmenter

    classes = _class_names(args)
    config = _config_from(args, get_preset(args.preset))
    images, missing = find_images(args.images)
    failed = 0
    for pattern in missing:
        _fail(f"{pattern}: no such image file, folder or pattern")
        failed += 1
    if not images:
        _fail("no images to segment")
        return EXIT_FAILED
    _ensure_writable(args.out)
    segmenter = Segmenter.from_pretrained(config, clip_weights=args.clip_weights,
                                          dino_weights=args.dino_weights, device=args.device,
                                          precision=args.precision)
    start = time.perf_counter()
    done = 0
    bar = tqdm(zip(images, _unique_stems(images)), total=len(images), unit="img",
               disable=len(images) < 2, file=sys.stderr)
    for path, stem in bar:
        try:
            result = segmenter(path, classes, unknown_threshold=args.unknown_threshold,
                               max_pixels=_max_pixels(args))
            result.save(args.out, stem, path, scores=args.save_scores)
            done += 1
        except (LpossError, OSError) as err:
            bar.clear()
            _fail(f"{path}: {err}")
            failed += 1
    elapsed = time.perf_counter() - start
    print(f"segmented {done} of {done + failed} image(s) into {len(classes)} classes in "
          f"{elapsed:.1f} s -> {args.out}" + (f" ({failed} failed)" if failed else ""))
    return EXIT_FAILED if failed else 0


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".lposs-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LpossError(f"cannot write to output folder {folder}: "
                         f"{err.strerror or err}") from None


# ---------------------------------------------------------------------------- refine
def _refine_parser(sub) -> None:
    p = sub.add_parser(
        "refine", formatter_class=_Formatter,
        help="LPOSS+ boundary refinement of any model's scores or label map",
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
    _add_propagation_options(p, patch=False)
    p.set_defaults(run=_run_refine)


def _run_refine(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .io import load_label_map
    from .segmenter import Segmentation, parse_class_names, refine_scores

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
        valid = labels[labels < 255]
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
    _ensure_writable(args.out)
    start = time.perf_counter()
    config = _config_from(args, LPOSSConfig())
    refined = refine_scores(args.image, scores, config)
    result = Segmentation(refined.argmax(dim=0), refined, classes,
                          {"refine": time.perf_counter() - start},
                          {"r": config.r, "tau": config.tau, "alpha": config.alpha,
                           "short_side": config.short_side})
    result.save(args.out, args.image.stem, args.image, scores=args.save_scores)
    print(f"refined {args.image} ({n_classes} classes) in {result.timings['refine']:.1f} s "
          f"-> {args.out}")
    return 0


# --------------------------------------------------------------------------- convert
_CONVERTERS = ("coco_stuff", "coco_object", "cityscapes")


def _convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", formatter_class=_Formatter,
        help="make the label files some benchmarks need (train ids)",
        description="Convert raw annotations into the label files `lposs eval` reads:\n"
                    "  coco_stuff   annotations/<split>/<id>.png -> <id>_labelTrainIds.png "
                    "(171 classes)\n"
                    "  coco_object  COCO-Stuff PNGs (or --instances-json) -> "
                    "<id>_instanceTrainIds.png (81)\n"
                    "  cityscapes   gtFine/*_labelIds.png -> *_labelTrainIds.png (19)\n"
                    "Existing outputs are kept unless --overwrite; files are written atomically.",
    )
    p.add_argument("dataset", choices=_CONVERTERS, help="which annotations to convert")
    p.add_argument("--data-root", type=Path, required=True, metavar="DIR",
                   help="folder holding coco_stuff164k / cityscapes (or that folder itself)")
    p.add_argument("--splits", nargs="+", default=None, metavar="SPLIT",
                   help="splits to convert (default: every split present)")
    p.add_argument("--instances-json", type=Path, default=None, metavar="FILE",
                   help="coco_object: rasterise COCO instance annotations from this file "
                        "instead of deriving them from the COCO-Stuff PNGs")
    p.add_argument("--overwrite", action="store_true", help="redo existing outputs")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import convert

    kwargs = {"splits": args.splits, "overwrite": args.overwrite}
    if args.dataset == "coco_object":
        kwargs["instances_json"] = args.instances_json
    elif args.instances_json is not None:
        raise LpossError("--instances-json only applies to coco_object")
    with tqdm(unit="file", file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = getattr(convert, f"convert_{args.dataset}")(args.data_root, progress=progress,
                                                             **kwargs)
    print(f"{args.dataset}: wrote {result.written} file(s), kept {result.skipped} existing")
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lposs", formatter_class=_Formatter,
        description="Training-free open-vocabulary semantic segmentation (LPOSS, LPOSS+).",
    )
    parser.add_argument("--version", action="version", version=f"lposs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _segment_parser(sub)
    _refine_parser(sub)
    # These modules import this one's helpers: import them here, not at the top.
    from .cli_demo import add_demo_parser
    from .cli_eval import add_eval_parser

    add_eval_parser(sub)
    _convert_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LpossError as err:
        _fail(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
