"""``lposs demo``: serve the web demo (Gradio, the optional ``lposs[demo]`` extra, imported
only when this command runs)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import LpossError
from ..methods import PRESETS
from .options import HelpFormatter, add_model_options, add_propagation_options, config_from

__all__ = ["SUMMARY", "add_parser", "run"]

SUMMARY = "web page to try LPOSS on your own images (needs lposs[demo])"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` command to ``subparsers`` (from ``add_subparsers``)."""
    from ..config import DEMO_MAX_PIXELS
    from ..demo import DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_QUEUE

    p = subparsers.add_parser(
        "demo", formatter_class=HelpFormatter, help=SUMMARY,
        description="Serve a web page where you upload an image, type class names and see "
                    "the segmentation,\nthe share of each class and the timings, and download "
                    "the label PNG and JSON summary.\nNeeds Gradio: pip install "
                    '"lposs[demo]". Local only by default (127.0.0.1).\n\n'
                    "--clip-weights / --dino-weights are the models of --preset (or of "
                    "--clip-model /\n--dino-model, which then hold for every preset in the "
                    "page); presets naming other\nmodels load them on first use.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves your whole network")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max-pixels", type=int, default=DEMO_MAX_PIXELS, metavar="N",
                   help="refuse images with more pixels (height x width)")
    p.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE, metavar="SIZE",
                   help="refuse larger uploads, e.g. 10mb, 1gb")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help="requests that may wait while one is computed; more are refused "
                        "until the line shortens")
    p.add_argument("--short-side", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="working resolution: the image's shorter side is resized to N pixels "
                        "(default: the preset's, 448 as in the paper; smaller is faster on a "
                        "CPU, and coarser)")
    add_model_options(p)
    add_propagation_options(p, patch=True)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lposs demo`` from parsed arguments (serves until interrupted); returns the exit
    status."""
    from ..demo import DemoBackend, launch, require_gradio

    require_gradio()  # before loading any model: a missing extra is one line, at once
    if not 1 <= args.port <= 65535:
        raise LpossError(f"--port must be in 1..65535, got {args.port}")
    if args.max_pixels < 1:
        raise LpossError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    if args.max_queue < 1:
        raise LpossError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not re.fullmatch(r"\d+ *([kmgt]?b)?", str(args.max_file_size).strip(), re.IGNORECASE):
        raise LpossError(f"--max-file-size must be a size such as 500kb, 25mb or 1gb, got "
                         f"{args.max_file_size!r}")
    max_file_size = str(args.max_file_size).strip()
    if max_file_size.isdigit():  # plain bytes
        max_file_size = int(max_file_size)
    short_side = getattr(args, "short_side", None)
    if short_side is not None and short_side < 1:
        raise LpossError(f"--short-side must be >= 1, got {short_side}")
    presets = {name: config_from(args, preset) for name, preset in PRESETS.items()}
    if short_side is not None:
        presets = {name: c.replace(short_side=short_side) for name, c in presets.items()}
    backend = DemoBackend(presets, args.preset, clip_weights=args.clip_weights,
                          dino_weights=args.dino_weights, device=args.device,
                          precision=args.precision, max_pixels=args.max_pixels)
    try:
        print(f"loading the models of preset {args.preset!r} ...", flush=True)
        backend.load()
    except BaseException:
        backend.close()
        raise
    method = "LPOSS+" if presets[args.preset].pixel_stage else "LPOSS"
    try:
        status = launch(backend, host=args.host, port=args.port, method=method,
                        max_file_size=max_file_size, max_queue=args.max_queue)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise LpossError(f"cannot serve on {args.host}:{args.port}: "
                         f"{err.strerror or 'the port is in use'}; choose another --port or "
                         "--host") from None
    if not backend.wait_idle(0):
        # A request is still computing in a server thread: leave now rather than let the
        # interpreter tear down under it (C++ aborts with "terminate called without an
        # active exception"). Everything lposs wrote is cleaned up by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
