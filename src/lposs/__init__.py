"""lposs: training-free open-vocabulary semantic segmentation by label propagation.

Public names are imported lazily, so that ``import lposs`` (and ``lposs --help``)
does not pay for torch, OpenCLIP or timm until they are used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # settings and methods
    "LPOSSConfig": "config",
    "UNKNOWN": "config",
    "METHODS": "methods",
    "PRESETS": "methods",
    # errors (all of them: lposs.errors)
    "LpossError": "errors",
    "ImageError": "errors",
    "ClassNamesError": "errors",
    "WeightsNotFoundError": "errors",
    "ConfigError": "errors",
    "ScoresError": "errors",
    "OutputError": "errors",
    "DatasetError": "errors",
    # the pipeline
    "Segmenter": "pipeline.segmenter",
    "Segmentation": "output.segmentation",
    "EncodedImage": "pipeline.encoded",
    "read_image": "pipeline.image",
    "load_class_names": "vocab",
    "refine_scores": "pipeline.refine",
    "load_clip": "encoders",
    "load_dino": "encoders",
    # label propagation (the building blocks: lposs.propagation)
    "patch_propagation": "propagation",
    "pixel_propagation": "propagation",
    "patch_graph": "propagation",
    "pixel_graph": "propagation",
    # evaluation (more: lposs.evaluation)
    "evaluate": "evaluation",
    "get_dataset": "evaluation.datasets",
    "mean_iou": "evaluation.metrics",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lposs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
