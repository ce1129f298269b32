"""lposs: training-free open-vocabulary semantic segmentation by label propagation.

Public names are imported lazily, so that ``import lposs`` (and ``lposs --help``)
does not pay for torch, OpenCLIP or timm until they are used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # settings
    "LPOSSConfig": "config",
    "PRESETS": "methods",
    "get_preset": "methods",
    "UNKNOWN": "config",
    # errors
    "LpossError": "errors",
    "ImageError": "errors",
    "ClassNamesError": "errors",
    "WeightsNotFoundError": "errors",
    "UnsafeCheckpointError": "errors",
    "DatasetError": "errors",
    "ConfigError": "errors",
    "ScoresError": "errors",
    "OutputError": "errors",
    # label propagation
    "patch_propagation": "propagation",
    "pixel_propagation": "propagation",
    "patch_graph": "propagation",
    "pixel_graph": "propagation",
    "PatchGraph": "propagation",
    "PixelGraph": "propagation",
    "knn_affinity": "propagation",
    "pixel_affinity": "propagation",
    "normalized_adjacency": "propagation",
    "conjugate_gradient": "propagation",
    "CGInfo": "propagation",
    "rgb_to_lab": "propagation",
    # encoders
    "load_clip": "encoders",
    "load_dino": "encoders",
    "ClipEncoder": "encoders",
    "DinoEncoder": "encoders",
    # pipeline
    "Segmenter": "pipeline.segmenter",
    "Segmentation": "output.segmentation",
    "ScoreMaps": "output.segmentation",
    "load_image": "pipeline.images",
    "EncodedImage": "pipeline.encoded",
    "refine_scores": "pipeline.refine",
    "refine_score_maps": "pipeline.refine",
    "find_images": "pipeline.images",
    # evaluation
    "mean_iou": "evaluation.metrics",
    "boundary_iou": "evaluation.metrics",
    "oracle_labels": "evaluation.metrics",
    "get_dataset": "evaluation.datasets",
    "FolderDataset": "evaluation.datasets",
    "DATASETS": "evaluation.datasets",
    "load_class_names": "vocab",
    "paper_reference": "evaluation.paper",
    "evaluate": "evaluation",
    "sweep": "evaluation",
    "EvalResult": "evaluation",
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
