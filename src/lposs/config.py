"""The one settings dataclass, with the paper's defaults, the methods and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ConfigError

__all__ = ["LPOSSConfig", "Stages", "METHODS", "PRESETS", "get_preset", "UNKNOWN",
           "MAX_PIXEL_WINDOW"]

UNKNOWN = 255
"""Label value of "unknown" pixels (below the abstain threshold) and of ignored ground-truth
pixels (VOC's "void"): the one definition of 255 that the segmenter, the saved PNGs, the
datasets and the metrics share."""


class Stages(NamedTuple):
    """Which label propagations a method runs."""

    patch_stage: bool  # over patches (LPOSS)
    pixel_stage: bool  # over pixels (LPOSS+)


METHODS: dict[str, Stages] = {
    "lposs+": Stages(patch_stage=True, pixel_stage=True),
    "lposs": Stages(patch_stage=True, pixel_stage=False),
    "maskclip": Stages(patch_stage=False, pixel_stage=False),  # no propagation: the baseline
}
"""Method name -> the stages it runs (the one place that says so)."""

# Fields that decide the encoder outputs of an image (``Segmenter.set_image``): the models,
# the working size, the windows and whether DINO runs at all (it runs for the patch stage).
_ENCODER_FIELDS = ("clip", "clip_pretrained", "dino", "short_side", "long_side", "windows",
                   "patch_stage")
# Fields that decide the graphs built from those outputs (``Segmenter._graphs``).
_GRAPH_FIELDS = ("patch_stage", "k", "gamma", "sigma", "distance_power", "pixel_stage", "r",
                 "tau", "alpha")
# Fields that change neither the encoders' outputs nor the propagation's settings: how many
# windows go through an encoder at once, and the stages (chosen by the method, not swept).
_NOT_SWEPT = ("batch_size", "pixel_stage")


MAX_PIXEL_WINDOW = 31
"""Largest pixel neighbourhood side ``r``: 480 graph weights a pixel, 1.8 GB at the largest
working size (448 x 2048); the paper's 13 keeps 84."""


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
    windows: tuple[tuple[int, int], ...] = ((224, 112),)  # (window size, stride) setups, averaged
    batch_size: int = 16  # windows per encoder forward pass
    # LPOSS: patch graph.
    patch_stage: bool = True  # run label propagation over patches (False: MaskCLIP scores)
    k: int = 400  # neighbours per patch in the kNN graph
    gamma: float = 3.0  # power of the clamped appearance similarity
    sigma: float = 0.01  # spatial decay per pixel of patch-centre distance
    distance_power: float = 1.0  # exponent of the distance in exp(-sigma * d**p)
    # LPOSS+: pixel graph.
    pixel_stage: bool = True  # run label propagation over pixels (LPOSS+)
    r: int = 13  # side of the square pixel neighbourhood (odd)
    tau: float = 0.01  # temperature of the Lab colour affinity
    # Both solves.
    alpha: float = 0.95  # propagation strength in L = I - alpha * S
    tol: float = 1e-6  # conjugate-gradient relative residual tolerance
    max_iter: int = 10  # conjugate-gradient iterations (the paper's truncated solve)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or (f.type == "int" and not isinstance(value, int))
            ):
                raise ConfigError(f"{f.name} must be {'an int' if f.type == 'int' else 'a number'}"
                                  f", got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.r < 3 or self.r % 2 == 0 or self.r > MAX_PIXEL_WINDOW:
            raise ConfigError(f"r must be odd, 3..{MAX_PIXEL_WINDOW}, got {self.r}: the pixel "
                              "graph keeps (r * r - 1) / 2 weights a pixel and its product "
                              "costs r * r a pixel (the paper: 13)")
        if self.tau <= 0 or self.sigma < 0 or self.gamma <= 0:
            raise ConfigError("tau and gamma must be > 0 and sigma >= 0")
        if (self.short_side < 1 or self.long_side < 1 or self.batch_size < 1
                or self.max_iter < 1 or self.tol <= 0):
            raise ConfigError("short_side, long_side, batch_size, max_iter must be >= 1 "
                              "and tol > 0")
        if not self.windows:
            raise ConfigError("windows must hold at least one (size, stride) pair")
        for size, stride in self.windows:
            if size < 1 or stride < 1:
                raise ConfigError(f"window size and stride must be >= 1, got ({size}, {stride})")

    def replace(self, **changes) -> LPOSSConfig:
        """A copy with some fields changed (validated like the original)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def with_method(self, method: str) -> LPOSSConfig:
        """A copy running the stages of ``method`` (a key of ``METHODS``).

        Raises:
            ConfigError: an unknown method name.
        """
        try:
            stages = METHODS[method]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown method {method!r}; choose one of: "
                              f"{', '.join(METHODS)}") from None
        return self.replace(**stages._asdict())

    @property
    def method(self) -> str | None:
        """The name of the method whose stages this config runs (None for pixel stage only)."""
        stages = Stages(self.patch_stage, self.pixel_stage)
        return next((name for name, s in METHODS.items() if s == stages), None)

    def encoder_key(self) -> tuple[tuple[str, Any], ...]:
        """``(field, value)`` pairs that decide an image's encoder outputs: two configs with
        the same key can share an ``EncodedImage``."""
        return tuple((name, getattr(self, name)) for name in _ENCODER_FIELDS)

    def graph_key(self) -> tuple:
        """The values that decide an encoded image's graphs: two configs with the same key
        build the same graphs from the same ``EncodedImage``."""
        return tuple(getattr(self, name) for name in _GRAPH_FIELDS)

    @classmethod
    def sweepable_fields(cls) -> tuple[str, ...]:
        """The fields a sweep may vary over one set of encoder outputs: every field but the
        encoder fields, ``batch_size`` and the stages, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in _ENCODER_FIELDS and f.name not in _NOT_SWEPT)


_DEFAULT = LPOSSConfig()

PRESETS: dict[str, LPOSSConfig] = {
    "lposs+": _DEFAULT,
    "lposs": _DEFAULT.with_method("lposs"),
    "maskclip": _DEFAULT.with_method("maskclip"),
    "ensemble": _DEFAULT.replace(windows=((224, 112), (448, 224))),
    "dino-b16": _DEFAULT,
    "dino-b8": _DEFAULT.replace(dino="dino_vitb8", k=800),
    "dinov2-b14": _DEFAULT.replace(dino="dinov2_vitb14", gamma=7.0),
}


def get_preset(name: str) -> LPOSSConfig:
    """The preset called ``name``; raises ``ConfigError`` listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
