"""The result of a segmentation: labels, scores resized on demand, what made it."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import UNKNOWN
from ..pipeline.scores import ScoreMaps
from .drawing import class_shares, overlay, palette
from .files import save_result

__all__ = ["Segmentation", "provenance"]

# The packages whose versions a provenance record lists: {record key: distribution name}.
# torch reports its own (with the build, e.g. "2.4.1+cu121").
_VERSIONED = {"open_clip": "open_clip_torch", "timm": "timm", "numpy": "numpy",
              "pillow": "pillow"}


def provenance(
    *,
    weights: Mapping[str, dict | None] | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
) -> dict:
    """The provenance record of a result: what made it, for its JSON.

    ``Segmenter.provenance`` fills it from the encoders; ``lposs refine`` and the oracle
    evaluation, which run no encoder, call it without ``weights``.

    Args:
        weights: per encoder (``"clip"``, ``"dino"``), where its weights came from (the
            encoder's ``weights_info``: ``source`` and, where they apply, ``path``,
            ``repo``, ``revision``, ``file``, ``sha256``, plus the model name), or None
            for an encoder that did not run.
        device: where the computation ran (e.g. ``"cuda:0"``).
        precision: what the encoders computed in (``"fp32"``, ``"bf16"``, ``"fp16"``;
            never ``"auto"``), or None without encoders.

    Returns:
        ``{"versions": {"lposs", "torch", "open_clip", "timm", "numpy", "pillow"},
        "device", "precision", "weights"}``; a package that is not installed has version
        None.
    """
    from .. import __version__

    versions: dict[str, str | None] = {"lposs": __version__, "torch": torch.__version__}
    for key, distribution in _VERSIONED.items():
        try:
            versions[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return {
        "versions": versions,
        "device": None if device is None else str(device),
        "precision": precision,
        "weights": {name: (None if info is None else dict(info))
                    for name, info in (weights or {}).items()},
    }


@dataclass
class Segmentation:
    """The result of one prediction.

    Attributes:
        labels: `(H, W)` class index per pixel at the original size: uint8 below 255
            classes (one byte a pixel on a large image), int64 otherwise; ``UNKNOWN``
            (255) where the abstain threshold rejected every class.
        scores: the per-class scores, resized to the original size on demand
            (``scores.full()`` is the `(C, H, W)` float32 tensor on the cosine scale;
            ``class_scores(c)`` one class; a `(C, H, W)` tensor given here is wrapped).
        classes: the C class names, in label order.
        timings: seconds per stage.
        settings: the configuration that produced it.
        convergence: per propagation stage that ran (``"patch"``, ``"pixel"``), the
            conjugate-gradient report ``{"iterations": most iterations of any column,
            "max_relative_residual": worst column's ||r|| / ||b||}`` (the worst over
            window setups for the patch stage).
        source: the image file it was made from (absolute path), or None for an image
            given in memory.
        provenance: what made it (:func:`provenance`): package versions, device,
            precision and where each encoder's weights came from.
    """

    labels: torch.Tensor
    scores: ScoreMaps
    classes: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    convergence: dict[str, dict[str, int | float]] = field(default_factory=dict)
    source: str | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.scores, torch.Tensor):
            self.scores = ScoreMaps(self.scores, None, tuple(self.scores.shape[-2:]))

    def colors(self):
        """`(C, 3)` uint8 colour per class (the palette of the saved PNG)."""
        return palette(len(self.classes))

    def class_shares(self) -> dict[str, float]:
        """Share of pixels per class name (and "unknown" when present)."""
        shares = class_shares(self.labels, len(self.classes))
        named = dict(zip(self.classes, shares))
        if len(shares) > len(self.classes) and shares[-1] > 0:
            named["unknown"] = shares[-1]
        return named

    def summary(self, colors=None, shares: list[float] | None = None) -> dict:
        """A JSON-ready summary (what ``save`` writes to ``<stem>.json``).

        Keys: ``source`` (the image file, or None), ``height`` and ``width`` (pixels of
        the image and of the label map), ``classes`` (per class: ``index`` = its value in
        the label PNG, ``name``, ``color`` as in the label PNG's palette and the overlay,
        ``share`` of pixels), ``unknown`` (index 255 and share), ``timings_s``,
        ``settings`` (the configuration), ``convergence`` (the solver per stage) and
        ``provenance`` (versions, device, precision, weights; see :func:`provenance`).

        Args:
            colors: the `(C, 3)` colours, when the caller has them (else :meth:`colors`).
            shares: the C + 1 pixel shares, unknown last, when the caller has them.
        """
        colors = (self.colors() if colors is None else colors).tolist()
        if shares is None:
            shares = class_shares(self.labels, len(self.classes))
        height, width = self.labels.shape
        return {
            "source": self.source,
            "height": int(height),
            "width": int(width),
            "classes": [
                {"index": i, "name": name, "color": colors[i], "share": shares[i]}
                for i, name in enumerate(self.classes)
            ],
            "unknown": {"index": UNKNOWN, "share": shares[-1]},
            "timings_s": self.timings,
            "settings": self.settings,
            "convergence": self.convergence,
            "provenance": self.provenance,
        }

    def overlay(self, image):
        """The image blended with the class colours, with a legend (a PIL image).

        Args:
            image: the `(3, H, W)` image (uint8 or float in [0, 1]) already in memory (e.g.
                ``Segmenter.image``), or anything ``lposs.pipeline.image.read_image``
                accepts, at the labels' size.
        """
        return overlay(image, self.labels, self.classes, self.colors())

    def save(self, out_dir: str | Path, stem: str, image=None, *,
             scores: bool = False) -> list[Path]:
        """:func:`lposs.output.files.save_result` of this result: ``<stem>.png``,
        ``<stem>.json``, ``<stem>_overlay.png`` given the image, ``<stem>_scores.npy``."""
        return save_result(self, out_dir, stem, image, scores=scores)
