"""What an evaluation run is: its method, and the settings fingerprint that a run folder
is tied to (dataset, method, config, the encoders' ``weights_id``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from ..methods import METHODS as _TABLE
from ..methods import method_of, with_method
from ..pipeline.segmenter import Segmenter
from .datasets import SegmentationDataset

__all__ = [
    "METHODS",
    "RECORD_FORMAT",
    "DILATION_RATIO",
    "ORACLE_PATCH_SIZE",
    "resolve_method",
    "check_dataset",
    "fingerprint",
    "run_settings",
    "settings_digest",
    "canonical_json",
]

METHODS = (*(name for name, m in _TABLE.items() if not m.protocol), "oracle")
"""Evaluation methods: the base rows of ``lposs.methods.METHODS`` and the ground-truth oracle."""

RECORD_FORMAT = 1  # version of the settings and record files
DILATION_RATIO = 0.02  # Boundary IoU band width (fraction of the image diagonal)
ORACLE_PATCH_SIZE = 16  # the oracle row of the paper: ViT-B/16 patches

def resolve_method(segmenter: Segmenter | None,
                   method: str | None) -> tuple[str, Segmenter | None]:
    """The method name and a segmenter whose stages match it (None for the oracle).

    The segmenter is a copy sharing the encoders when its stages are another method's.
    """
    if segmenter is not None and not isinstance(segmenter, Segmenter):
        raise TypeError(f"segmenter must be a lposs Segmenter or None, got "
                        f"{type(segmenter).__name__}")
    if method is None:
        if segmenter is None:
            return "oracle", None
        method = method_of(segmenter.config)
        if method is None:
            raise ValueError("method: the segmenter's config (patch_stage=False, "
                             "pixel_stage=True) is none of the methods; pass method=")
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    method = method.lower()
    if method == "oracle":
        return method, None
    if segmenter is None:
        raise ValueError(f"method {method!r} needs a segmenter (only 'oracle' runs without)")
    config = with_method(segmenter.config, method)
    if config != segmenter.config:
        segmenter = Segmenter(segmenter.clip, segmenter.dino, config, segmenter.depth)
    if config.uses_dino and segmenter.dino is None:
        raise ValueError(f"method {method!r} needs a segmenter with a DINO encoder")
    return method, segmenter


def check_dataset(dataset: Any) -> None:
    """Raises ``TypeError`` unless ``dataset`` is a ``SegmentationDataset``."""
    if not isinstance(dataset, SegmentationDataset):
        raise TypeError(f"dataset must be a SegmentationDataset (datasets.get_dataset or "
                        f"FolderDataset), got {type(dataset).__name__}")


def fingerprint(dataset: SegmentationDataset, segmenter: Segmenter | None, method: str,
                extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``run_settings`` once the method is resolved (JSON-normalised: tuples are lists)."""
    settings: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "dataset": {
            "name": dataset.name,
            "root": str(dataset.root.resolve()) if dataset.root is not None else None,
            "classes": list(dataset.classes),
            "ignore_index": dataset.ignore_index,
            "reduce_zero_label": dataset.reduce_zero_label,
        },
        "method": method,
        "boundary_dilation_ratio": DILATION_RATIO,
    }
    if segmenter is None:
        settings["oracle_patch_size"] = ORACLE_PATCH_SIZE
    else:
        config = dataclasses.asdict(segmenter.config)
        config.pop("batch_size")  # how many windows per forward pass: not a setting of the result
        settings["config"] = config
        settings["models"] = {
            "clip": segmenter.clip.weights_id,
            "dino": segmenter.dino.weights_id if segmenter.config.uses_dino else None,
            **({"depth": segmenter.depth.weights_id} if segmenter.config.uses_depth else {}),
        }
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra_settings must be a mapping, got {type(extra).__name__}")
        settings["extra"] = dict(extra)
    try:  # normalise (tuples -> lists) so that it compares equal to its JSON round trip
        return json.loads(json.dumps(settings, allow_nan=False, default=os.fspath))
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra_settings must be JSON-serialisable: {err}") from None


def run_settings(
    dataset: SegmentationDataset,
    segmenter: Segmenter | None = None,
    *,
    method: str | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings fingerprint that ``evaluate`` writes to ``run_dir/settings.json``.

    Args:
        dataset: the dataset.
        segmenter: the segmenter (None for the oracle).
        method: as for ``evaluate``.
        extra_settings: more JSON-serialisable settings to record (and compare on resume).

    Returns:
        dataset (name, root, classes, ignore_index, reduce_zero_label), method, the config
        fields but ``batch_size`` and the encoders' ``weights_id`` (or the
        oracle's patch size), plus ``extra``.
    """
    check_dataset(dataset)
    method, segmenter = resolve_method(segmenter, method)
    return fingerprint(dataset, segmenter, method, extra_settings)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a settings dict in canonical JSON."""
    return hashlib.sha256(canonical_json(settings)).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """``obj`` as compact JSON with sorted keys (what digests and checksums hash)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
