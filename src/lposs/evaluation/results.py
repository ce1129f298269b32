"""What an evaluation returns: per-run metrics (``EvalResult``), sweep tables
(``SweepResult``), with their JSON and markdown forms."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["EvalResult", "SweepResult"]

_BACKGROUND_FIRST = ("voc", "coco_object")  # class 0 is "background" expanded into synonyms


@dataclasses.dataclass
class EvalResult:
    """Metrics of one evaluation run.

    Attributes:
        dataset: the dataset name.
        method: one of ``lposs.evaluation.METHODS``.
        classes: the class names, in label order.
        metrics: ``SegmentationMetrics.compute()`` over all images (fractions in [0, 1]).
        boundary: whether Boundary IoU was computed.
        settings: the settings fingerprint (see ``run_settings``).
        paper: the paper's numbers for this dataset and method in percent, or None.
        stats: images, computed, reused, redone (damaged records), cache_hits,
            cache_misses (summed over processes), seconds (this process's wall time).
        run_dir: where records and results were written, or None.
        provenance: what made it (``lposs.output.segmentation.provenance``): package versions,
            device, precision and where each encoder's weights came from (file path or
            Hub repository, revision and file, sha256).
    """

    dataset: str
    method: str
    classes: list[str]
    metrics: dict[str, Any]
    boundary: bool
    settings: dict[str, Any]
    paper: dict[str, float | None] | None
    stats: dict[str, float]
    run_dir: Path | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def miou(self) -> float:
        """Mean IoU over the classes present, in [0, 1]."""
        return self.metrics["miou"]

    @property
    def boundary_iou(self) -> float | None:
        """Mean Boundary IoU in [0, 1], or None when not computed."""
        return self.metrics["boundary_miou"] if self.boundary else None

    @property
    def pixel_accuracy(self) -> float:
        """Correct pixels / non-ignored pixels."""
        return self.metrics["pixel_accuracy"]

    @property
    def num_images(self) -> int:
        return int(self.metrics["num_images"])

    @property
    def per_class(self) -> dict[str, float]:
        """IoU per class name (NaN for classes absent from ground truth and prediction)."""
        return dict(zip(self.classes, self.metrics["iou"]))

    @property
    def per_class_boundary(self) -> dict[str, float] | None:
        """Boundary IoU per class name, or None when not computed."""
        return dict(zip(self.classes, self.metrics["boundary_iou"])) if self.boundary else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (fractions in [0, 1]; NaN as None; paper numbers in percent)."""
        boundary = self.metrics.get("boundary_iou") if self.boundary else None
        per_class = [
            {"index": i, "name": name, "iou": _finite(iou),
             "boundary_iou": _finite(boundary[i]) if boundary else None}
            for i, (name, iou) in enumerate(zip(self.classes, self.metrics["iou"]))
        ]
        return {
            "dataset": self.dataset,
            "method": self.method,
            "num_images": self.num_images,
            "num_pixels": self.metrics["num_pixels"],
            "miou": _finite(self.miou),
            "boundary_iou": _finite(self.boundary_iou),
            "pixel_accuracy": _finite(self.pixel_accuracy),
            "mean_accuracy": _finite(self.metrics["mean_accuracy"]),
            "per_class": per_class,
            "paper_percent": self.paper,
            "stats": self.stats,
            "settings": self.settings,
            "provenance": self.provenance,
        }

    def to_markdown(self) -> str:
        """The summary table next to the paper's number, per-class IoUs and the settings."""
        paper = self.paper or {}
        lines = [
            f"## {self.dataset}, {self.method}: {self.num_images} images",
            "",
            "| metric | this run (%) | paper (%) |",
            "|---|---:|---:|",
            f"| mIoU | {_pct(self.miou)} | {_num(paper.get('miou'))} |",
        ]
        if self.boundary:
            lines.append(f"| Boundary IoU | {_pct(self.boundary_iou)} | "
                         f"{_num(paper.get('boundary_iou'))} |")
        lines += [f"| pixel accuracy | {_pct(self.pixel_accuracy)} | - |", ""]
        header = "| class | IoU (%) |" + (" Boundary IoU (%) |" if self.boundary else "")
        lines += [header, "|---|---:|" + ("---:|" if self.boundary else "")]
        boundary = self.per_class_boundary
        for i, (name, iou) in enumerate(self.per_class.items()):
            row = f"| {_display_name(self.dataset, i, name)} | {_pct(iou)} |"
            if boundary is not None:
                row += f" {_pct(boundary[name])} |"
            lines.append(row)
        lines += ["", "Settings: " + _settings_line(self.settings)]
        if self.paper is not None:
            lines.append("Paper: the full split of the benchmark, pretrained ViT-B/16 models.")
        return "\n".join(lines) + "\n"


@dataclasses.dataclass
class SweepResult:
    """One ``EvalResult`` per combination of the swept settings.

    Attributes:
        names: the swept config fields, in the order given.
        rows: (setting values by name, result) per combination, in grid order.
    """

    names: list[str]
    rows: list[tuple[dict[str, Any], EvalResult]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "rows": [{"values": values, "miou": _finite(r.miou),
                      "boundary_iou": _finite(r.boundary_iou),
                      "pixel_accuracy": _finite(r.pixel_accuracy),
                      "run_dir": r.run_dir} for values, r in self.rows],
        }

    def to_markdown(self) -> str:
        """One table: a row per combination with mIoU (and Boundary IoU, pixel accuracy)."""
        first = self.rows[0][1] if self.rows else None
        boundary = bool(first and first.boundary)
        title = f"## sweep: {first.dataset}, {first.method}: {first.num_images} images" \
            if first else "## sweep"
        head = [*self.names, "mIoU (%)"] + (["Boundary IoU (%)"] if boundary else [])
        head.append("pixel acc. (%)")
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for values, result in self.rows:
            cells = [str(values[n]) for n in self.names] + [_pct(result.miou)]
            if boundary:
                cells.append(_pct(result.boundary_iou))
            cells.append(_pct(result.pixel_accuracy))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _display_name(dataset: str, index: int, name: str) -> str:
    if index == 0 and dataset in _BACKGROUND_FIRST and ";" in name:
        name = "background"
    if len(name) > 40:
        name = name[:39] + "..."
    return name.replace("|", "\\|")


def _settings_line(settings: Mapping[str, Any]) -> str:
    parts = [f"method={settings['method']}", f"dataset={settings['dataset']['name']}",
             f"classes={len(settings['dataset']['classes'])}"]
    if "oracle_patch_size" in settings:
        parts.append(f"oracle_patch_size={settings['oracle_patch_size']}")
    for key, value in settings.get("config", {}).items():
        parts.append(f"{key}={value}")
    for key, value in (settings.get("models") or {}).items():
        if value is not None:
            parts.append(f"{key}_weights={value}")
    for key, value in (settings.get("extra") or {}).items():
        parts.append(f"{key}={value}")
    return ", ".join(parts)
