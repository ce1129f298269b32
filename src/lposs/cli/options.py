"""What the ``lposs`` commands share: the help layout, the model and propagation option
groups, their mapping onto ``LPOSSConfig``, exit codes and the one-line error."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..config import LPOSSConfig
from ..errors import LpossError
from ..methods import METHODS, PRESETS

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "HelpFormatter",
    "fail",
    "add_model_options",
    "add_propagation_options",
    "config_from",
    "ensure_writable",
    "writing_to",
    "memory_message",
    "rank_device",
]

EXIT_FAILED = 1  # some input failed (others may have succeeded)
EXIT_USAGE = 2  # the command line itself is wrong (argparse's exit status)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

# Option dest -> LPOSSConfig field, for the options of the two groups below.
_CONFIG_FIELDS = {"k": "k", "gamma": "gamma", "sigma": "sigma", "r": "r", "tau": "tau",
                  "alpha": "alpha", "clip_model": "clip", "clip_pretrained": "clip_pretrained",
                  "dino_model": "dino", "graph_features": "graph_features",
                  "pixel_features": "pixel_features", "depth_model": "depth_model",
                  "depth_scale": "depth_scale"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and adds "(default: X)" to an option's help only
    when X tells the user something: not for an unset option (None), an off switch (False)
    or help that states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def fail(message: str) -> None:
    """Print ``message`` as one ``lposs: error:`` line on stderr (line breaks in it become
    spaces)."""
    print(f"lposs: error: {' '.join(str(message).split())}", file=sys.stderr)


def memory_message(err: BaseException) -> str:
    """One line for an out-of-memory error (``lposs.errors.is_out_of_memory``): what ran
    out, and the allocator's first sentence."""
    detail = str(err).strip().split(". ")[0].split("\n")[0]
    return "out of memory" + (f" ({detail})" if detail else "") + \
        "; try a smaller image or another --device"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The ``models`` group: preset, device, precision, model names and local weights."""
    group = parser.add_argument_group("models")
    group.add_argument("--preset", default="lposs+", choices=list(PRESETS),
                       help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()))
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
    group.add_argument("--windows", type=_windows, default=None, metavar="SPEC",
                       help="sliding windows SIZE/STRIDE[,SIZE/STRIDE...], or none: the whole "
                            "working image in one pass (default: the preset's, 224/112)")
    group.add_argument("--clip-weights", type=Path, default=None, metavar="FILE",
                       help="local CLIP checkpoint (.safetensors, .pt, .pth, .bin) instead of the "
                            "OpenCLIP cache/download")
    group.add_argument("--dino-weights", type=Path, default=None, metavar="FILE",
                       help="local DINO checkpoint (.safetensors, .pt, .pth, .bin) instead of the "
                            "timm cache/download")
    group.add_argument("--depth-model", default=None, metavar="NAME",
                       help="Depth Anything Hub repository for --pixel-features with depth "
                            f"(default: {LPOSSConfig.depth_model})")
    group.add_argument("--depth-weights", type=Path, default=None, metavar="FILE",
                       help="local depth-model checkpoint (.safetensors, .pt, .pth, .bin) instead "
                            "of the Hub cache/download")


def _windows(text: str) -> tuple:
    """``--windows``: ``none`` -> ``()`` (no windows), else the ``SIZE/STRIDE`` pairs."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(tuple(int(v) for v in pair.split("/")) for pair in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected none or SIZE/STRIDE pairs such as 224/112, got {text!r}") from None


def add_propagation_options(parser: argparse.ArgumentParser, *, patch: bool,
                            preset: bool = True) -> None:
    """The ``propagation`` group: the pixel graph's settings and alpha, and with ``patch``
    the patch graph's. Unset options keep the ``--preset``'s values, or without ``preset``
    (a command with no ``--preset``) the paper's."""
    defaults = LPOSSConfig()
    group = parser.add_argument_group(
        "propagation (default: the preset's value; the paper's in brackets)" if preset
        else "propagation (default: the paper's value, in brackets)")
    if patch:
        group.add_argument("--k", type=int, default=None,
                           help=f"neighbours per patch (paper: {defaults.k})")
        group.add_argument("--gamma", type=float, default=None,
                           help=f"appearance power (paper: {defaults.gamma})")
        group.add_argument("--sigma", type=float, default=None,
                           help=f"spatial decay per pixel, 0: none (paper: {defaults.sigma})")
        group.add_argument("--graph-features", default=None, metavar="NAME",
                           help="features of the patch graph: dino, or clip (MaskCLIP's; DINO "
                                "is then not loaded) (paper: dino)")
        group.add_argument("--no-joint", action="store_true",
                           help="one patch graph per window instead of one over all windows")
        group.add_argument("--pixel-features", default=None, metavar="NAME",
                           help="features of the pixel graph: lab, depth or lab+depth (depth: "
                                "Depth Anything V2, pip install lposs[depth]) (paper: lab)")
        group.add_argument("--depth-scale", type=float, default=None,
                           help="weight of the depth (normalised to [0, 1] per image) in the "
                                f"pixel features (default: {defaults.depth_scale})")
    group.add_argument("--r", "--pixel-window", dest="r", type=int, default=None,
                       help=f"pixel neighbourhood side, odd (paper: {defaults.r})")
    group.add_argument("--tau", type=float, default=None,
                       help=f"colour affinity temperature (paper: {defaults.tau})")
    group.add_argument("--alpha", type=float, default=None,
                       help=f"propagation strength in (0, 1) (paper: {defaults.alpha})")


def config_from(args: argparse.Namespace, base: LPOSSConfig) -> LPOSSConfig:
    """``base`` with the options the user gave (and ``--no-refine``) applied.

    Raises:
        ConfigError: a value out of range.
    """
    changes = {field: getattr(args, dest) for dest, field in _CONFIG_FIELDS.items()
               if getattr(args, dest, None) is not None}
    if getattr(args, "windows", None) is not None:
        changes["windows"] = args.windows or None
    if getattr(args, "no_refine", False):
        changes["pixel_stage"] = False
    if getattr(args, "no_joint", False):
        changes["joint"] = False
    return base.replace(**changes)


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check that a file can be written there.

    Raises:
        LpossError: it cannot.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lposs-write-test-{os.getpid()}"  # one per torchrun process
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LpossError(f"cannot write to output folder {folder}: "
                         f"{err.strerror or err}") from None


@contextlib.contextmanager
def writing_to(folder: Path) -> Iterator[None]:
    """Hold ``folder`` as a command's output folder while the command runs.

    Creates it (with its missing parents) and checks that it is writable
    (:func:`ensure_writable`), holds its lock (``lposs.output.files.folder_lock``) so that a
    second lposs writing there stops at once, and on leaving removes the folders it
    created if nothing was written into them.

    Raises:
        LpossError: the folder cannot be written, or another lposs is writing to it.
    """
    from ..output.files import folder_lock

    folder = Path(folder)
    created = []  # the folders this call creates, innermost first
    for missing in (folder, *folder.parents):
        if missing.exists():
            break
        created.append(missing)
    try:
        ensure_writable(folder)
        with folder_lock(folder):
            yield
    finally:
        for path in created:  # innermost first; stops at the first one holding anything
            try:
                path.rmdir()
            except OSError:
                break
def rank_device(device: str | None, world: int, local_rank: int) -> str | None:
    """The device of one torchrun process: ``cuda:LOCAL_RANK`` for a plain ``cuda`` when
    there are several processes (one GPU each), else ``device`` as given."""
    if world > 1 and device == "cuda":
        return f"cuda:{local_rank}"
    return device
