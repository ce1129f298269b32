"""The one method table: a method is an initial predictor, refiners in order, and a protocol.

Every list of methods in lposs comes from ``METHODS``: the presets of
``Segmenter.from_pretrained``, ``lposs segment --preset``, ``lposs eval --method`` and the
demo's menu. Adding a method is one row.
"""

from __future__ import annotations

from typing import NamedTuple

from .config import LPOSSConfig
from .errors import ConfigError

__all__ = ["Method", "METHODS", "PRESETS", "REFINERS", "get_preset", "with_method",
           "method_of"]


class Method(NamedTuple):
    """One row of the method table."""

    predictor: str  # the initial per-window patch scores ("maskclip": MaskCLIP's)
    refiners: tuple[str, ...]  # applied in order, names of ``REFINERS``
    protocol: tuple[tuple[str, object], ...]  # ``LPOSSConfig`` fields the method fixes
    summary: str  # one line for --help and the demo


REFINERS = {"lposs": "patch_stage", "lposs+": "pixel_stage"}
"""Refiner -> the ``LPOSSConfig`` stage it runs: LPOSS over the patches of all windows
jointly, LPOSS+ over the pixels of the working image."""

_BOTH = ("lposs", "lposs+")
METHODS: dict[str, Method] = {
    "lposs+": Method("maskclip", _BOTH, (), "LPOSS+: MaskCLIP, LPOSS over patches, then pixels"),
    "lposs": Method("maskclip", ("lposs",), (), "LPOSS: MaskCLIP, then LPOSS over patches"),
    "maskclip": Method("maskclip", (), (), "MaskCLIP alone (no propagation)"),
    "ensemble": Method("maskclip", _BOTH, (("windows", ((224, 112), (448, 224))),),
                       "LPOSS+ averaging 224/112 and 448/224 windows"),
    "dino-b8": Method("maskclip", _BOTH, (("dino", "dino_vitb8"), ("k", 800)),
                      "LPOSS+ with a DINO ViT-B/8 graph (k = 800)"),
    "dinov2-b14": Method("maskclip", _BOTH, (("dino", "dinov2_vitb14"), ("gamma", 7.0)),
                         "LPOSS+ with a DINOv2 ViT-B/14 graph (gamma = 7)"),
}

_ALIASES = {"dino-b16": "lposs+"}  # the paper's name for the default graph model


def _config(method: Method, base: LPOSSConfig) -> LPOSSConfig:
    stages = {stage: name in method.refiners for name, stage in REFINERS.items()}
    return base.replace(**dict(method.protocol), **stages)


PRESETS: dict[str, LPOSSConfig] = {
    name: _config(METHODS[_ALIASES.get(name, name)], LPOSSConfig())
    for name in (*METHODS, *_ALIASES)
}
"""Preset name -> its settings: one per method, and the alias ``dino-b16``."""


def get_preset(name: str) -> LPOSSConfig:
    """The settings of preset ``name``; ``ConfigError`` lists the known names."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; choose one of: "
                          f"{', '.join(PRESETS)}") from None


def with_method(config: LPOSSConfig, method: str) -> LPOSSConfig:
    """``config`` with the predictor and refiners of ``method`` (its models and protocol
    kept): ``lposs eval --preset dino-b8 --method lposs``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return _config(METHODS[method]._replace(protocol=()), config)


def method_of(config: LPOSSConfig) -> str | None:
    """The name of the first method whose refiners ``config`` runs (None: pixels only)."""
    refiners = tuple(name for name, stage in REFINERS.items() if getattr(config, stage))
    return next((name for name, m in METHODS.items() if m.refiners == refiners), None)
