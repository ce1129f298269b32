"""Two eval run folders of one dataset compared image by image and class by class (the
paper's Figs. 5 and 6), from the per-image counts in their records.

A per-image mIoU (or Boundary IoU) is the mean over the classes present in that image's
prediction or ground truth (a non-zero union); an image with none has no value (empty in
the CSV, not drawn). Per-class IoUs are summed over the images present in both runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path

from ..errors import LpossError
from ..output.files import atomic_write
from .datasets import SegmentationDataset
from .plots import scatter_plot
from .records import DamagedRecord, RecordSpec, record_state

__all__ = ["RunRecords", "Comparison", "read_run", "compare_runs", "write_comparison"]


@dataclasses.dataclass
class RunRecords:
    """The per-image results of one run folder.

    Attributes:
        path: the run folder.
        dataset: the dataset's name.
        method: the run's method.
        classes: the class names, in label order.
        spec: how the folder's records read.
        files: sample id -> its record file.
        miou: sample id -> the image's mIoU in [0, 1] (NaN: no class present).
        boundary_iou: sample id -> the image's Boundary IoU, for records that have it.
    """

    path: Path
    dataset: str
    method: str
    classes: list[str]
    spec: RecordSpec
    files: dict[str, Path]
    miou: dict[str, float]
    boundary_iou: dict[str, float]


def _state(path: Path, spec: RecordSpec) -> tuple[str, dict, bool]:
    """A record file's sample id, metrics state and whether it has Boundary IoU counts."""
    try:
        record = json.loads(path.read_bytes())
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise DamagedRecord("no sample id")
        state = record_state(record, record["id"], spec)
        return record["id"], state, record.get("boundary") is True
    except (OSError, UnicodeDecodeError, ValueError, DamagedRecord) as err:
        raise LpossError(f"record {path} is damaged ({err}); run the same lposs eval "
                         "again to redo it") from None


def read_run(path: str | os.PathLike) -> RunRecords:
    """Reads an eval run folder (``settings.json`` and ``records/``).

    Raises:
        LpossError: not a run folder, or a damaged record (named).
    """
    path = Path(path)
    try:
        settings = json.loads((path / "settings.json").read_text(encoding="utf-8"))
        digest, data = settings["digest"], settings["settings"]["dataset"]
        method = settings["settings"]["method"]
        dataset = SegmentationDataset(data["name"], [], data["classes"],
                                      ignore_index=data["ignore_index"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        hint = " (a sweep: pass one of its settings' folders)" \
            if (path / "sweep.json").is_file() else ""
        raise LpossError(f"{path} is not an lposs eval run folder (no readable "
                         f"settings.json){hint}") from None
    spec = RecordSpec.of(digest, dataset, boundary=False)
    run = RunRecords(path, dataset.name, method, list(dataset.classes), spec, {}, {}, {})
    for file in sorted((path / "records").glob("*.json")):
        sample_id, state, has_boundary = _state(file, spec)
        values = spec.metrics_for(len(dataset.classes), dataset.ignore_index,
                                  has_boundary).merge(state).compute()
        run.files[sample_id] = file
        run.miou[sample_id] = values["miou"]
        if has_boundary:
            run.boundary_iou[sample_id] = values["boundary_miou"]
    return run


@dataclasses.dataclass
class Comparison:
    """Two runs over the images present in both.

    Attributes:
        a, b: the runs.
        ids: the sample ids present in both, sorted.
        class_iou: per run, IoU per class over ``ids`` (NaN: class absent from both gt and
            prediction).
        boundary: whether both runs have Boundary IoU for every image of ``ids``.
    """

    a: RunRecords
    b: RunRecords
    ids: list[str]
    class_iou: tuple[list[float], list[float]]
    boundary: bool

    def labels(self) -> tuple[str, str]:
        """The runs' names on plots: their methods, with the folder names when those agree."""
        a, b = self.a, self.b
        if a.method != b.method:
            return a.method, b.method
        return f"{a.method} ({a.path.name})", f"{b.method} ({b.path.name})"


def compare_runs(a: RunRecords, b: RunRecords) -> Comparison:
    """The comparison of two runs of one dataset over the sample ids they share.

    Raises:
        LpossError: the runs are of different datasets (or class lists), or share no image.
    """
    if a.dataset != b.dataset or a.classes != b.classes:
        what = f"{a.dataset!r} and {b.dataset!r}" if a.dataset != b.dataset else \
            "one dataset with different class lists"
        raise LpossError(f"{a.path} and {b.path} are runs of {what}: compare runs of one "
                         "dataset")
    ids = sorted(a.files.keys() & b.files.keys())
    if not ids:
        raise LpossError(f"{a.path} and {b.path} have no image in common "
                         f"({len(a.files)} and {len(b.files)} records)")
    ious = []
    for run in (a, b):
        metrics = run.spec.metrics()
        for sample_id in ids:
            metrics.merge(_state(run.files[sample_id], run.spec)[1])
        ious.append(metrics.compute()["iou"])
    boundary = all(i in a.boundary_iou and i in b.boundary_iou for i in ids)
    return Comparison(a, b, ids, (ious[0], ious[1]), boundary)


def _cell(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{x:.6f}"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    return path


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> list[Path]:
    """Writes the tables (fractions in [0, 1]) and plots (percent) into ``out_dir``.

    ``per_image.csv`` (id, mIoU of A and B, and their Boundary IoUs when both have them),
    ``per_class.csv`` (index, class, IoU of A and B), ``miou_per_image.png`` (Figs. 5a,
    6 left), ``iou_per_class.png`` (Fig. 6 right) and, with Boundary IoU,
    ``boundary_iou_per_image.png`` (Fig. 5b); ``miou_vs_boundary_iou_{a,b}.png`` (Fig. 5c)
    for each run with Boundary IoU on every common image.

    Returns:
        The files written.

    Raises:
        LpossError: ``out_dir`` cannot be written, or matplotlib is missing.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LpossError(f"cannot write to {out}: {err.strerror or err}") from None
    c, ids = comparison, comparison.ids
    label_a, label_b = c.labels()
    title = f"{c.a.dataset}: {len(ids)} images"
    header, rows = ["id", "miou_a", "miou_b"], [[i, _cell(c.a.miou[i]), _cell(c.b.miou[i])]
                                                for i in ids]
    if c.boundary:
        header += ["boundary_iou_a", "boundary_iou_b"]
        for row, i in zip(rows, ids):
            row += [_cell(c.a.boundary_iou[i]), _cell(c.b.boundary_iou[i])]
    written = [_write_csv(out / "per_image.csv", header, rows)]
    written.append(_write_csv(out / "per_class.csv", ["index", "class", "iou_a", "iou_b"], [
        [k, name, _cell(x), _cell(y)]
        for k, (name, x, y) in enumerate(zip(c.a.classes, *c.class_iou))]))

    def percent(values):
        return [100 * v for v in values]

    plots = [("miou_per_image", c.a.miou, c.b.miou, "mIoU per image"),
             ("iou_per_class", None, None, "IoU per class")]
    if c.boundary:
        plots.append(("boundary_iou_per_image", c.a.boundary_iou, c.b.boundary_iou,
                      "Boundary IoU per image"))
    for name, a, b, what in plots:
        x, y = (c.class_iou if a is None else ([a[i] for i in ids], [b[i] for i in ids]))
        written.append(scatter_plot(out / f"{name}.png", percent(x), percent(y),
                                    xlabel=f"{label_a}: {what} (%)",
                                    ylabel=f"{label_b}: {what} (%)", title=title))
    for suffix, run, label in (("a", c.a, label_a), ("b", c.b, label_b)):
        if all(i in run.boundary_iou for i in ids):
            written.append(scatter_plot(
                out / f"miou_vs_boundary_iou_{suffix}.png",
                percent(run.miou[i] for i in ids), percent(run.boundary_iou[i] for i in ids),
                xlabel=f"{label}: mIoU per image (%)",
                ylabel=f"{label}: Boundary IoU per image (%)", title=title))
    return written
