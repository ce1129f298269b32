"""The MESS benchmark (Blumenstiel et al., 2023; the paper's Tables 7-8) through the
``mess-benchmark`` package (``pip install 'lposs[mess]'``; detectron2 not needed).

Everything about a dataset comes from the package: its registered names (each PAXRay
subset is its own dataset), the folders its preparation scripts write
(``python -m mess.prepare_all_datasets --dataset_dir DIR``), how images pair with labels
(its own loader, called on ``data_root``), the class names (the prompts, verbatim), the
ignore label, the display names and domains. The metric is the mIoU over all classes.
``MessResult`` gives the per-dataset table (PAXRay-4 = the mean of the four subsets, as
MESS combines them) and Table 7's domain averages, with the paper's numbers beside ours.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..distributed import distributed_context
from ..errors import DatasetError
from ..output.files import atomic_write, write_json
from .datasets import Sample, SegmentationDataset
from .loop import evaluate
from .results import EvalResult

__all__ = ["mess_names", "load_mess", "present_mess_datasets", "evaluate_mess", "MessResult"]

_PAXRAY = "paxray_combined"  # MESS's name of the four PAXRay subsets' mean (PAXRay-4)
_NON_GENERAL, _MEAN = "Non-general", "Mean"
# The paper with DINO ViT-B/16, by method and windows (224 x 224, or the ensemble of 224 and
# 448): Table 8 (per dataset, MESS's display names) and Table 7 (per domain; Non-general:
# the mean over the datasets outside General).
_TABLE8 = ("BDD100K", "Dark Zurich", "MHP v1", "FoodSeg103", "ATLANTIS", "DRAM", "iSAID",
           "ISPRS Potsdam", "WorldFloods", "FloodNet", "UAVid", "Kvasir-Instrument",
           "CHASE DB1", "CryoNuSeg", "PAXRay-4", "Corrosion CS", "DeepCrack", "PST900",
           "ZeroWaste-f", "SUIM", "CUB-200", "CWFID", _MEAN)
_TABLE7 = ("General", "Earth Monitoring", "Medical Sciences", "Engineering",
           "Agriculture and Biology", _NON_GENERAL)
_WINDOWS = {((224, 112),): "224 x 224", ((224, 112), (448, 224)): "ensemble"}
_PAPER = {
    ("lposs", "224 x 224"): (
        (36.2, 17.6, 20.9, 25.6, 33.3, 44.1, 13.0, 25.4, 37.7, 28.9, 38.2, 61.1, 27.0, 32.1,
         47.2, 13.6, 55.6, 19.6, 24.7, 39.7, 11.7, 41.1, 31.6),
        (29.6, 28.6, 41.9, 28.4, 30.8, 32.3)),
    ("lposs+", "224 x 224"): (
        (37.2, 17.4, 21.8, 26.1, 34.2, 44.9, 13.5, 25.8, 37.8, 29.2, 39.0, 61.0, 26.9, 31.8,
         47.5, 13.6, 56.8, 19.6, 25.1, 40.3, 12.0, 41.5, 32.0),
        (30.3, 29.1, 41.8, 28.8, 31.3, 32.6)),
    ("lposs", "ensemble"): (
        (35.9, 16.5, 20.5, 25.1, 33.9, 47.5, 13.7, 25.0, 37.2, 29.4, 38.1, 66.8, 28.4, 34.2,
         46.7, 15.1, 58.5, 19.6, 24.6, 40.1, 13.5, 38.6, 32.2),
        (29.9, 28.7, 44.0, 29.5, 30.7, 33.1)),
    ("lposs+", "ensemble"): (
        (36.6, 16.5, 21.3, 25.5, 34.7, 48.2, 14.1, 25.3, 37.4, 29.7, 38.7, 67.2, 28.4, 34.1,
         46.9, 15.3, 59.6, 19.5, 24.8, 40.6, 13.8, 39.0, 32.6),
        (30.5, 29.0, 44.2, 29.8, 31.1, 33.4)),
}


@dataclasses.dataclass(frozen=True)
class _Mess:
    catalog: Any  # the DatasetCatalog the package registered into (detectron2's or its own)
    metadata: Any  # its MetadataCatalog
    root: str  # the data root the package registered under (DETECTRON2_DATASETS)
    titles: dict[str, str]  # benchmark name (and paxray_combined) -> display name
    domains: dict[str, str]  # benchmark name (and paxray_combined) -> domain

    @property
    def benchmark(self) -> list[str]:
        """The benchmark's registered names, in MESS's order."""
        return [name for name in self.titles if name in self.catalog]


@functools.lru_cache(maxsize=1)
def _mess() -> _Mess:
    try:
        import mess.datasets  # noqa: F401  registers every dataset
        from mess.datasets import register_suim as registered
        from mess.evaluation import mess_evaluation as tables
    except ImportError as err:
        raise DatasetError(f"MESS datasets need mess-benchmark ({err}): pip install "
                           "'lposs[mess]'") from None
    return _Mess(registered.DatasetCatalog, registered.MetadataCatalog, registered._root,
                 dict(tables.dataset_names), dict(tables.dataset_domains))


def _short(name: str, names: Sequence[str]) -> str:
    """``suim_sem_seg_test`` -> ``suim``; ``paxray_sem_seg_test_lungs`` -> ``paxray_lungs``."""
    prefix = name.split("_sem_seg_")[0]
    shared = sum(n.split("_sem_seg_")[0] == prefix for n in names) > 1
    return f"{prefix}_{name.rsplit('_', 1)[1]}" if shared else prefix


def mess_names() -> dict[str, str]:
    """Short name -> registered name of the benchmark's datasets, in MESS's order."""
    names = _mess().benchmark
    return {_short(n, names): n for n in names}


def _registered(name: str) -> str:
    mess = _mess()
    if name in mess.catalog:  # any dataset MESS registers, of any split
        return name
    short = mess_names()
    if name not in short:
        raise ValueError(f"unknown MESS dataset {name!r}; choose from {', '.join(short)} (or "
                         "a name MESS registers, e.g. suim_sem_seg_test)")
    return short[name]


def load_mess(name: str, data_root: str | os.PathLike) -> SegmentationDataset:
    """A MESS dataset in the layout its preparation scripts write under ``data_root``.

    Args:
        name: a registered name (``suim_sem_seg_test``) or its short form (``suim``,
            ``paxray_lungs``); see ``mess_names``.
        data_root: the folder given to ``mess.prepare_all_datasets --dataset_dir``.

    Raises:
        ValueError: unknown name.
        DatasetError: mess-benchmark is missing, or the dataset is not under ``data_root``.
    """
    mess, name = _mess(), _registered(name)
    meta, root = mess.metadata.get(name), Path(data_root).expanduser()
    images, labels = (root / os.path.relpath(folder, mess.root)
                      for folder in (meta.image_root, meta.sem_seg_root))
    if not root.is_dir():
        raise DatasetError(f"data root not found: {root}")
    try:  # MESS's own loader (its registered function, on these folders) pairs the files
        pairs = mess.catalog[name](x=str(images), y=str(labels))
    except (FileNotFoundError, AssertionError):
        pairs = []
    if not pairs:
        raise DatasetError(f"MESS dataset {name} not found: expected images in {images} and "
                           f"labels in {labels} (python -m mess.prepare_all_datasets "
                           f"--dataset_dir {root})")
    samples = [Sample(os.path.splitext(os.path.relpath(pair["file_name"], images))[0],
                      Path(pair["file_name"]), Path(pair["sem_seg_file_name"]))
               for pair in pairs]
    return SegmentationDataset(name, samples, list(meta.stuff_classes),
                               ignore_index=meta.ignore_label, root=root)


def present_mess_datasets(data_root: str | os.PathLike) -> list[SegmentationDataset]:
    """Every dataset of the benchmark found under ``data_root``, in MESS's order.

    Raises:
        DatasetError: none is there (or mess-benchmark is missing).
    """
    found = []
    for name in _mess().benchmark:
        try:
            found.append(load_mess(name, data_root))
        except DatasetError:
            continue
    if not found:
        raise DatasetError(f"no MESS dataset found under {data_root} (python -m "
                           f"mess.prepare_all_datasets --dataset_dir {data_root})")
    return found


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclasses.dataclass
class MessResult:
    """One ``EvalResult`` per MESS dataset present, in MESS's order."""

    results: list[EvalResult]

    def scores(self) -> list[tuple[str, str, float]]:
        """(display name, domain, mIoU in percent) per dataset; the four PAXRay subsets
        become PAXRay-4, their mean, when all four are present (MESS's ``combine_paxray``)."""
        mess = _mess()
        rows = [(r.dataset, 100 * r.miou) for r in self.results]
        paxray = [v for n, v in rows if n.startswith("paxray_sem_seg_")]
        if len(paxray) == 4 and _PAXRAY in mess.titles:
            at = next(i for i, (n, _) in enumerate(rows) if n.startswith("paxray_sem_seg_"))
            rows = [r for r in rows if not r[0].startswith("paxray_sem_seg_")]
            rows.insert(at, (_PAXRAY, sum(paxray) / 4))
        return [(mess.titles[n], mess.domains[n], v) for n, v in rows]

    def domains(self) -> dict[str, tuple[float | None, int]]:
        """Domain (and Non-general, Mean) -> (mean mIoU over its datasets present, how many)."""
        scores = self.scores()
        groups = {d: [v for _, dd, v in scores if dd == d] for d in _TABLE7[:-1]}
        groups[_NON_GENERAL] = [v for _, d, v in scores if d != "General"]
        groups[_MEAN] = [v for _, _, v in scores]
        return {d: (_mean(v), len(v)) for d, v in groups.items()}

    def _row(self) -> tuple[str, str] | None:
        """The paper's row for these runs: (method, windows) with a DINO ViT-B/16 graph."""
        config = self.results[0].settings.get("config", {}) if self.results else {}
        windows = _WINDOWS.get(tuple(map(tuple, config.get("windows", ()))))
        row = (self.results[0].method, windows) if windows else None
        return row if config.get("dino") == "dino_vitb16" and row in _PAPER else None

    def _paper(self) -> tuple[dict[str, float], dict[str, float]]:
        table8, table7 = _PAPER.get(self._row(), ((), ()))
        mean = dict(zip(_TABLE8, table8)).get(_MEAN)
        return dict(zip(_TABLE8, table8)), {**dict(zip(_TABLE7, table7)), _MEAN: mean}

    def to_dict(self) -> dict[str, Any]:
        paper8, paper7 = self._paper()
        return {
            "method": self.results[0].method if self.results else None,
            "datasets": [{"name": name, "domain": domain, "miou_percent": value,
                          "paper_percent": paper8.get(name)}
                         for name, domain, value in self.scores()],
            "domains": {d: {"miou_percent": v, "datasets": n, "paper_percent": paper7.get(d)}
                        for d, (v, n) in self.domains().items()},
            "runs": {r.dataset: str(r.run_dir) if r.run_dir else None for r in self.results},
        }

    def to_markdown(self) -> str:
        """The per-dataset table (Table 8) and the domain averages (Table 7), in percent."""
        paper8, paper7, scores = *self._paper(), self.scores()
        method = self.results[0].method if self.results else "-"
        lines = [f"## MESS, {method}: {len(scores)} datasets", "",
                 "| dataset | domain | mIoU (%) | paper (%) |", "|---|---|---:|---:|"]
        lines += [f"| {name} | {domain} | {_pct(value)} | {_num(paper8.get(name))} |"
                  for name, domain, value in scores]
        lines += ["", "| domain | datasets | mIoU (%) | paper (%) |", "|---|---:|---:|---:|"]
        lines += [f"| {d} | {n} | {_pct(v)} | {_num(paper7.get(d))} |"
                  for d, (v, n) in self.domains().items()]
        row = self._row()
        lines += ["", (f"Paper: Tables 7-8, {row[0]} with DINO ViT-B/16, {row[1]} windows. "
                       if row else "The paper has no row for these settings. ")
                  + "A domain's average is over its datasets present."]
        return "\n".join(lines) + "\n"


def evaluate_mess(datasets: Sequence[SegmentationDataset], segmenter=None, *,
                  run_dir: str | os.PathLike | None = None, **options) -> MessResult:
    """``evaluate`` on each MESS dataset (``present_mess_datasets``), each in its own run
    folder ``run_dir/<registered name>`` (resumable), then ``run_dir/mess.{json,md}``.

    Args:
        datasets: the MESS datasets.
        segmenter: as for ``evaluate`` (None for the oracle).
        run_dir: the parent of the datasets' run folders.
        **options: ``evaluate``'s other keyword arguments (method, boundary, limit, ...).
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    results = [evaluate(dataset, segmenter, run_dir=run_dir / dataset.name if run_dir else None,
                        **options) for dataset in datasets]
    out = MessResult(results)
    if run_dir is not None and distributed_context()[0] == 0:
        write_json(run_dir / "mess.json", out.to_dict())
        atomic_write(run_dir / "mess.md", lambda f: f.write(out.to_markdown().encode()))
    return out
