"""The one settings dataclass, with the paper's defaults, and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["LPOSSConfig", "PRESETS", "get_preset"]


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
        if self.r < 3 or self.r % 2 == 0:
            raise ConfigError(f"r must be odd and >= 3, got {self.r}")
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


_DEFAULT = LPOSSConfig()

PRESETS: dict[str, LPOSSConfig] = {
    "lposs+": _DEFAULT,
    "lposs": _DEFAULT.replace(pixel_stage=False),
    "maskclip": _DEFAULT.replace(patch_stage=False, pixel_stage=False),
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
