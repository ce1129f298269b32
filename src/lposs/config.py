"""The one settings dataclass with the paper's defaults, and every limit lposs enforces."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["LPOSSConfig", "UNKNOWN", "MAX_CLASSES", "MAX_NAMES", "MAX_CLASS_FILE_BYTES",
           "MAX_PIXEL_WINDOW", "DEFAULT_MAX_PIXELS", "DEMO_MAX_PIXELS",
           "BAND_PIXELS", "CHOICES"]

UNKNOWN = 255
"""Label of "unknown" pixels (below the abstain threshold) and of ignored ground truth (VOC's
"void"), shared by the segmenter, the saved PNGs, the datasets and the metrics."""

# Limits: no input may ask for unbounded work.
MAX_CLASSES = UNKNOWN - 1
"""Most classes in one vocabulary (254): indices 0..253 and ``UNKNOWN`` fit an 8-bit PNG."""
MAX_NAMES = 512
"""Most text rows (classes and synonyms together) propagated at once: each is a column of
every solve (about 20 MB a row at the largest working size, 448 x 2048)."""
MAX_CLASS_FILE_BYTES = 4 << 20
"""Largest class-name file read (4 MiB): a list of 254 names is a few kilobytes."""
MAX_PIXEL_WINDOW = 31
"""Largest pixel neighbourhood side ``r``: 480 graph weights a pixel (the paper's 13: 84)."""
DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image (and label map) decoded, read from the file header before decoding."""
BAND_PIXELS = 1 << 22
"""Pixels per band wherever a full-size map is made piecewise (score resize, label PNG,
overlay, decoding): 16 MB a float32 plane; images up to this size are resized whole."""
DEMO_MAX_PIXELS = 16_000_000
"""Largest upload the web demo takes (a large phone photo): a page serves anyone."""

# Fields that decide an image's encoder outputs (``Segmenter.set_image``).
_ENCODER_FIELDS = ("clip", "clip_pretrained", "dino", "short_side", "long_side", "windows",
                   "patch_stage", "graph_features", "pixel_features", "depth_model")
# Fields that decide the graphs built from those outputs.
_GRAPH_FIELDS = ("patch_stage", "k", "gamma", "sigma", "distance_power", "pixel_stage", "r",
                 "tau", "alpha", "graph_features", "joint", "pixel_features", "depth_scale")
# Fields with a fixed set of values (the first is the default).
CHOICES = {"graph_features": ("dino", "clip"), "pixel_features": ("lab", "depth", "lab+depth")}
# Fields a sweep never varies: windows per pass, and the stages (chosen by the method).
_NOT_SWEPT = ("batch_size", "pixel_stage")


@dataclass(frozen=True)
class LPOSSConfig:
    """Every hyper-parameter of LPOSS / LPOSS+ (defaults: the paper's, see METHOD.md)."""

    # Models.
    clip: str = "ViT-B-16"  # OpenCLIP model name (the VLM)
    clip_pretrained: str = "laion2b_s34b_b88k"  # OpenCLIP pretrained tag
    dino: str = "dino_vitb16"  # vision model for the graph: dino_vitb16, dino_vitb8, dinov2_vitb14
    # Pre-processing and windows.
    short_side: int = 448  # the image is resized so that its shorter side has this many pixels
    long_side: int = 2048  # ... unless that makes the longer side exceed this (mmseg's cap)
    # (window size, stride) setups, averaged; None: the whole image in one pass (no windows)
    windows: tuple[tuple[int, int], ...] | None = ((224, 112),)
    batch_size: int = 16  # windows per encoder forward pass
    # LPOSS: patch graph.
    patch_stage: bool = True  # run label propagation over patches (False: MaskCLIP scores)
    k: int = 400  # neighbours per patch in the kNN graph
    gamma: float = 3.0  # power of the clamped appearance similarity
    sigma: float = 0.01  # spatial decay per pixel of patch-centre distance (0: S_p is all ones)
    distance_power: float = 1.0  # exponent of the distance in exp(-sigma * d**p)
    graph_features: str = "dino"  # appearance S_a from "dino" or "clip" (MaskCLIP's; no DINO)
    joint: bool = True  # one graph over all windows (False: one per window, k <= its patches-1)
    # LPOSS+: pixel graph.
    pixel_stage: bool = True  # run label propagation over pixels (LPOSS+)
    r: int = 13  # side of the square pixel neighbourhood (odd)
    tau: float = 0.01  # temperature of the pixel affinity exp(-||f_p - f_q|| / tau)
    pixel_features: str = "lab"  # f: "lab" (Lab / (100, 128, 128)), "depth" or "lab+depth"
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"  # Hub repo of the depth model
    depth_scale: float = 1.0  # depth in f: min-max normalised to [0, 1] per image, times this
    # Both solves.
    alpha: float = 0.95  # propagation strength in L = I - alpha * S
    tol: float = 1e-6  # conjugate-gradient relative residual tolerance
    max_iter: int = 10  # conjugate-gradient iterations (the paper's truncated solve)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wanted = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(f.type)
            if wanted and (not isinstance(value, wanted) or (
                    f.type != "bool" and isinstance(value, bool))):
                raise ConfigError(f"{f.name} must be {f.type}, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got "
                                  f"{getattr(self, name)!r}")
        _check_range(self)
        _check_windows(self.windows)

    @property
    def uses_dino(self) -> bool:
        """Whether the patch graph is built on DINO features (so DINO is loaded and run)."""
        return self.patch_stage and self.graph_features == "dino"

    @property
    def uses_depth(self) -> bool:
        """Whether the pixel graph needs predicted depth (so the depth model is loaded)."""
        return self.pixel_stage and "depth" in self.pixel_features

    def replace(self, **changes) -> LPOSSConfig:
        """A copy with some fields changed (validated like the original)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def encoder_key(self) -> tuple[tuple[str, Any], ...]:
        """``(field, value)`` pairs that decide an image's encoder outputs: two configs with
        the same key can share an ``EncodedImage``."""
        return tuple((name, getattr(self, name)) for name in _ENCODER_FIELDS)

    def graph_key(self) -> tuple:
        """The values that decide an encoded image's graphs."""
        return tuple(getattr(self, name) for name in _GRAPH_FIELDS)

    @classmethod
    def sweepable_fields(cls) -> tuple[str, ...]:
        """The fields a sweep may vary over one set of encoder outputs, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in _ENCODER_FIELDS and f.name not in _NOT_SWEPT)


def _check_range(cfg: LPOSSConfig) -> None:
    """Raise ``ConfigError`` naming the first field outside its range."""
    rules = [
        ("alpha", 0.0 < cfg.alpha < 1.0, "lie in (0, 1)"),
        ("k", cfg.k >= 1, "be >= 1"),
        ("r", 3 <= cfg.r <= MAX_PIXEL_WINDOW and cfg.r % 2 == 1,
         f"be odd, 3..{MAX_PIXEL_WINDOW} (the pixel graph costs r * r a pixel; the paper: 13)"),
        ("tau", cfg.tau > 0, "be > 0"),
        ("depth_scale", cfg.depth_scale > 0, "be > 0"),
        ("gamma", cfg.gamma > 0, "be > 0"),
        ("sigma", cfg.sigma >= 0, "be >= 0"),
        ("distance_power", cfg.distance_power > 0, "be > 0"),
        ("tol", cfg.tol > 0, "be > 0"),
    ] + [(name, getattr(cfg, name) >= 1, "be >= 1")
         for name in ("short_side", "long_side", "batch_size", "max_iter")]
    for name, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{name} must {rule}, got {getattr(cfg, name)!r}")


def _check_windows(windows: Any) -> None:
    """Raise ``ConfigError`` unless ``windows`` holds (size, stride) int pairs that cover
    the image (stride <= size), or is None."""
    if windows is None:
        return
    if not isinstance(windows, tuple) or not windows:
        raise ConfigError(f"windows must be a non-empty tuple of (size, stride) pairs or None, got "
                          f"{windows!r}")
    for pair in windows:
        if (not isinstance(pair, tuple) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ConfigError(f"each window setup must be a (size, stride) pair of ints, got "
                              f"{pair!r}")
        size, stride = pair
        if not 1 <= stride <= size:
            raise ConfigError(f"window ({size}, {stride}): size and stride must be >= 1 and "
                              "stride <= size, or pixels between windows get no score")
