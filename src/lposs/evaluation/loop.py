"""The evaluation loop: a segmenter (or the patch-resolution oracle) over a dataset, with
per-image counts summed into mIoU, Boundary IoU and pixel accuracy.

Each process computes its share of the images that have no valid record yet (see
``records``), then every rank sums all records in dataset order, so that a resumed or
distributed run gives exactly the numbers of one uninterrupted process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import distributed_context, process_group
from ..errors import DatasetError, LpossError
from ..output.files import atomic_write, folder_lock, write_json
from ..output.segmentation import provenance
from ..pipeline.image import read_image
from ..pipeline.segmenter import Segmenter
from ..progress import Progress, StageCounter
from .cache import cache_folder, encode_cached
from .datasets import SegmentationDataset
from .metrics import oracle_labels
from .paper import paper_reference
from .records import (
    DamagedRecord,
    RecordSpec,
    claim_run_dir,
    file_name,
    make_record,
    read_record,
    record_state,
)
from .results import EvalResult
from .settings import (
    ORACLE_PATCH_SIZE,
    check_dataset,
    fingerprint,
    resolve_method,
    settings_digest,
)

__all__ = ["evaluate"]

_log = logging.getLogger(__name__)


def _image_counts(sample, dataset: SegmentationDataset, segmenter: Segmenter | None,
                  cache: Path | None, spec: RecordSpec) -> tuple[dict[str, Any], bool]:
    """One image's prediction compared to its label: (its metrics state, cache hit)."""
    gt = torch.from_numpy(sample.load_label())
    hit = False
    if segmenter is None:  # the image is decoded only to hold the label to its size
        size = tuple(read_image(sample.image_path, max_pixels=None).shape[-2:])
        pred = oracle_labels(gt, patch_size=ORACLE_PATCH_SIZE, ignore_index=dataset.ignore_index)
    else:
        hit = encode_cached(segmenter, sample.id, Path(sample.image_path), cache)
        pred = segmenter.predict(dataset.classes).labels
        size = tuple(pred.shape)
    if size != tuple(gt.shape):
        raise DatasetError(f"label {sample.label_path} is {tuple(gt.shape)} but image "
                           f"{sample.image_path} is {size} (H, W)")
    try:
        return spec.metrics().update(pred, gt), hit
    except ValueError as err:
        raise DatasetError(f"{sample.label_path}: {err}") from None


def evaluate(
    dataset: SegmentationDataset,
    segmenter: Segmenter | None = None,
    *,
    method: str | None = None,
    boundary: bool = False,
    limit: int | None = None,
    run_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate a segmenter (or the oracle) on a dataset.

    Per-image counts (``UNKNOWN`` = 255 is a miss) are summed exactly into IoUs. A run
    without ``boundary`` keeps the results of an earlier run with it (same mIoU, and more).

    Args:
        dataset: the images, labels and classes (``lposs.evaluation.datasets``).
        segmenter: runs the model methods (a copy with ``method``'s stages); None for the
            oracle.
        method: one of ``METHODS`` (``"oracle"``: the ground truth at ViT-B/16 patch
            resolution). Default: the segmenter's stages, or the oracle without one.
        boundary: also compute Boundary IoU.
        limit: evaluate only the first ``limit`` samples.
        run_dir: records, ``settings.json`` and ``results.{json,md}``; locked while the run
            writes there, resumed from the records there. Required under torchrun.
        cache_dir: keep each image's encoder outputs here and reuse them.
        progress: ``progress("evaluating images", done, total)`` over this process's
            share (``lposs.progress``), at the start and after each image.
        extra_settings: more JSON-serialisable settings recorded in the fingerprint.

    Returns:
        The result, on every rank.

    Raises:
        LpossError: ``run_dir`` holds another run's settings, is locked or unwritable.
        DatasetError: a bad label (unreadable, outside the classes, not its image's size).
        ImageError: an image is unreadable.
    """
    check_dataset(dataset)
    method, segmenter = resolve_method(segmenter, method)
    samples, ids, names = _samples(dataset, limit)
    settings = fingerprint(dataset, segmenter, method, extra_settings)
    rank, world, _ = distributed_context()
    if world > 1 and run_dir is None:
        raise ValueError("run_dir is required under torchrun: ranks exchange records through it")
    run_dir = Path(run_dir) if run_dir is not None else None
    spec = RecordSpec.of(settings_digest(settings), dataset, boundary)
    cache = None
    if cache_dir is not None and segmenter is not None:  # the oracle runs no encoder
        cache = cache_folder(cache_dir, segmenter.encoder_identity())
    with process_group(world) as group, _locked(run_dir, rank):
        if run_dir is not None:
            claim_run_dir(run_dir, settings, rank, group)
        start = time.perf_counter()
        share = _Share(dataset, segmenter, run_dir, cache, spec)
        counts = share.run(samples[rank::world], names[rank::world], progress)
        group.barrier()
        totals = group.sum(counts)
        metrics = _sum_records(spec, ids, names, run_dir, share.memory)
    stats = dict(zip(("computed", "reused", "redone", "cache_hits", "cache_misses"), totals))
    stats = {"images": len(samples), **stats, "seconds": round(time.perf_counter() - start, 3)}
    result = EvalResult(dataset.name, method, list(dataset.classes), metrics.compute(),
                        bool(boundary), settings, paper_reference(dataset.name, method), stats,
                        run_dir, provenance() if segmenter is None else segmenter.provenance())
    if run_dir is not None and rank == 0:
        _write_results(run_dir, result)
    return result


def _samples(dataset: SegmentationDataset, limit: int | None):
    """The first ``limit`` samples, their ids and their record file names."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    samples = dataset.samples[:limit]
    ids = [s.id for s in samples]
    names = [file_name(i) for i in ids]
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset {dataset.name!r} has repeated sample ids")
    return samples, ids, names


def _sum_records(spec: RecordSpec, ids: list[str], names: list[str], run_dir: Path | None,
                 memory: dict[str, dict]):
    """Every image's counts (from ``run_dir``, else ``memory``) summed in dataset order."""
    metrics = spec.metrics()
    for sample_id, name in zip(ids, names):
        if run_dir is None:
            metrics.merge(memory[sample_id])
            continue
        try:
            state = read_record(run_dir / "records" / f"{name}.json", sample_id, spec)
        except DamagedRecord as err:
            raise LpossError(f"record of {sample_id!r} in {run_dir} became unusable during "
                             f"the run ({err}); run the command again") from None
        if state is None:
            raise LpossError(f"record of {sample_id!r} is missing from {run_dir}/records "
                             "after every rank finished; run the command again")
        metrics.merge(state)
    return metrics


@contextlib.contextmanager
def _locked(run_dir: Path | None, rank: int):
    """Rank 0 holds the run folder's lock: a second ``evaluate`` there stops at once."""
    if run_dir is None or rank != 0:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LpossError(f"cannot write to run folder {run_dir}: {err.strerror or err}") from None
    with folder_lock(run_dir):
        yield


def _write_results(run_dir: Path, result: EvalResult) -> None:
    """Writes ``results.{json,md}``, unless a run without ``boundary`` would replace those
    of a run with it on the same records (the same mIoU, plus Boundary IoU)."""
    if not result.boundary:
        try:
            old = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if (isinstance(old, dict) and old.get("boundary_iou") is not None
                and old.get("num_images") == result.num_images
                and old.get("miou") == result.miou):
            return
    write_json(run_dir / "results.json", result.to_dict())
    atomic_write(run_dir / "results.md", lambda f: f.write(result.to_markdown().encode()))


class _Share:
    """Computes the records of one process's samples that are not valid on disk yet."""

    def __init__(self, dataset, segmenter, run_dir, cache, spec) -> None:
        self.dataset, self.segmenter, self.run_dir = dataset, segmenter, run_dir
        self.cache, self.spec = cache, spec
        self.memory: dict[str, dict] = {}  # the states computed, without a run_dir

    def todo(self, samples, names) -> tuple[list, int]:
        """The (sample, record path or None) pairs to compute, and how many were damaged."""
        todo, redone = [], 0
        for sample, name in zip(samples, names):
            if self.run_dir is None:
                todo.append((sample, None))
                continue
            path = self.run_dir / "records" / f"{name}.json"
            try:
                if read_record(path, sample.id, self.spec) is not None:
                    continue
            except DamagedRecord as err:
                _log.warning("lposs: record %s is damaged (%s); computing it again", path, err)
                redone += 1
            todo.append((sample, path))
        return todo, redone

    def run(self, samples, names, progress: Progress | None) -> list[int]:
        """Returns [computed, reused, redone, cache_hits, cache_misses]."""
        todo, redone = self.todo(samples, names)
        counter = StageCounter(progress, "evaluating images", len(samples))
        if len(todo) < len(samples):
            counter.advance(len(samples) - len(todo))  # the records reused
        hits = 0
        for sample, path in todo:
            start = time.perf_counter()
            state, hit = _image_counts(sample, self.dataset, self.segmenter, self.cache,
                                       self.spec)
            hits += hit
            record = make_record(sample.id, self.spec, state, time.perf_counter() - start)
            if path is None:
                self.memory[sample.id] = record_state(record, sample.id, self.spec)
            else:
                data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
                atomic_write(path, lambda f, data=data: f.write(data))
            counter.advance()
        misses = len(todo) - hits if self.cache is not None else 0
        return [len(todo), len(samples) - len(todo), redone, hits, misses]
