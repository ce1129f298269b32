"""The evaluation loop: a segmenter (or the patch-resolution oracle) over a dataset, with
per-image counts summed into mIoU, Boundary IoU and pixel accuracy.

Each process computes its share of the images that have no valid record yet (see
``records``), then every rank sums all records in dataset order, so that a resumed or
distributed run gives exactly the numbers of one uninterrupted process.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import distributed_context, process_group
from ..errors import DatasetError, LpossError
from ..output.files import atomic_write, write_json
from ..output.segmentation import provenance
from ..pipeline.segmenter import Segmenter
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
from .results import EvalResult, ProgressEvent
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
    if segmenter is None:
        pred = oracle_labels(gt, patch_size=ORACLE_PATCH_SIZE, ignore_index=dataset.ignore_index)
    else:
        hit = encode_cached(segmenter, sample.id, Path(sample.image_path), cache)
        pred = segmenter.predict(dataset.classes).labels
    if pred.shape != gt.shape:
        raise DatasetError(f"label {sample.label_path} is {tuple(gt.shape)} but image "
                           f"{sample.image_path} is {tuple(pred.shape)} (H, W)")
    try:
        return spec.metrics().update(pred, gt), hit
    except ValueError as err:
        raise DatasetError(f"{sample.label_path}: {err}") from None


def _make_progress(progress: Any, rank: int, total: int, initial: int, desc: str):
    """(bar or None, callback or None) for the ``progress`` argument."""
    if progress is None or progress is False:
        return None, None
    if progress is True:
        if rank != 0:
            return None, None
        from tqdm import tqdm

        bar = tqdm(total=total, initial=initial, unit="img", desc=desc, file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        return bar, None
    if callable(progress):
        return None, progress
    raise TypeError(f"progress must be a bool, None or a callable, got {type(progress).__name__}")


def evaluate(
    dataset: SegmentationDataset,
    segmenter: Segmenter | None = None,
    *,
    method: str | None = None,
    boundary: bool = False,
    limit: int | None = None,
    run_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | Callable[[ProgressEvent], None] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate a segmenter (or the oracle) on a dataset.

    For each sample: the label (``sample.load_label()``), the prediction at the original
    size (``segmenter.predict(dataset.classes).labels``, ``UNKNOWN`` = 255 is a miss), their
    confusion matrix and, with ``boundary``, Boundary IoU band counts. The counts of all
    images are summed exactly (int64) and turned into IoUs (METHOD.md conventions).

    Args:
        dataset: the images, labels and classes (``lposs.evaluation.datasets``).
        segmenter: runs the model methods; None for ``method="oracle"``. Its stages are set
            from ``method`` (a copy sharing the encoders; the argument is not changed).
        method: ``"lposs+"``, ``"lposs"``, ``"maskclip"`` (no propagation) or ``"oracle"``
            (the ground truth at ViT-B/16 patch resolution, no model). Default: the
            segmenter's stages, or the oracle without a segmenter.
        boundary: also compute Boundary IoU.
        limit: evaluate only the first ``limit`` samples.
        run_dir: write per-image records, ``settings.json`` and ``results.{json,md}`` here
            and resume from the records already there. Required under torchrun.
        cache_dir: keep each image's encoder outputs here and reuse them.
        progress: True for a progress bar on stderr, or a callable given a
            ``ProgressEvent`` after each image this process computes.
        extra_settings: more JSON-serialisable settings recorded in the fingerprint.

    Returns:
        The result, on every rank.

    Raises:
        LpossError: ``run_dir`` holds another run's settings, or cannot be written.
        DatasetError: a label is unreadable, has labels outside the classes, or a size
            other than its image's.
        ImageError: an image is unreadable.
    """
    check_dataset(dataset)
    method, segmenter = resolve_method(segmenter, method)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    samples = dataset.samples[:limit]
    ids = [s.id for s in samples]
    names = [file_name(i) for i in ids]
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset {dataset.name!r} has repeated sample ids")
    if cache_dir is not None and segmenter is None:
        cache_dir = None  # the oracle runs no encoder
    settings = fingerprint(dataset, segmenter, method, extra_settings)
    digest = settings_digest(settings)
    rank, world, _ = distributed_context()
    if world > 1 and run_dir is None:
        raise ValueError("run_dir is required under torchrun: ranks exchange records through it")
    run_dir = Path(run_dir) if run_dir is not None else None
    spec = RecordSpec.of(digest, dataset, boundary)
    cache = None
    if cache_dir is not None:
        cache = cache_folder(cache_dir, segmenter.encoder_identity())
    with process_group(world) as group:
        if run_dir is not None:
            claim_run_dir(run_dir, settings, rank, group)
        start = time.perf_counter()
        memory: dict[str, dict] = {}
        counts = _evaluate_share(dataset, segmenter, samples[rank::world], names[rank::world],
                                 run_dir, cache, spec, memory, progress, rank,
                                 f"{dataset.name} {method}")
        group.barrier()
        totals = group.sum(counts)
        metrics = spec.metrics()
        for sample_id, name in zip(ids, names):  # dataset order on every rank
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
    stats = dict(zip(("computed", "reused", "redone", "cache_hits", "cache_misses"), totals))
    stats = {"images": len(samples), **stats, "seconds": round(time.perf_counter() - start, 3)}
    result = EvalResult(dataset.name, method, list(dataset.classes), metrics.compute(),
                        bool(boundary), settings, paper_reference(dataset.name, method), stats,
                        run_dir,
                        provenance() if segmenter is None else segmenter.provenance())
    if run_dir is not None and rank == 0:
        write_json(run_dir / "results.json", result.to_dict())
        atomic_write(run_dir / "results.md", lambda f: f.write(result.to_markdown().encode()))
    return result


def _evaluate_share(dataset, segmenter, samples, names, run_dir, cache, spec, memory, progress,
                    rank, desc) -> list[int]:
    """Computes the records of this rank's samples that are not valid on disk yet.

    Returns:
        [computed, reused, redone, cache_hits, cache_misses].
    """
    todo, redone = [], 0
    for sample, name in zip(samples, names):
        if run_dir is None:
            todo.append((sample, None))
            continue
        path = run_dir / "records" / f"{name}.json"
        try:
            if read_record(path, sample.id, spec) is not None:
                continue
        except DamagedRecord as err:
            _log.warning("lposs: record %s is damaged (%s); computing it again", path, err)
            redone += 1
        todo.append((sample, path))
    bar, callback = _make_progress(progress, rank, len(samples), len(samples) - len(todo), desc)
    hits = 0
    try:
        for done, (sample, path) in enumerate(todo, start=len(samples) - len(todo) + 1):
            start = time.perf_counter()
            state, hit = _image_counts(sample, dataset, segmenter, cache, spec)
            seconds = time.perf_counter() - start
            hits += hit
            record = make_record(sample.id, spec, state, seconds)
            if path is None:
                memory[sample.id] = record_state(record, sample.id, spec)
            else:
                data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
                atomic_write(path, lambda f, data=data: f.write(data))
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(ProgressEvent(sample.id, done, len(samples), seconds, bool(hit)))
    finally:
        if bar is not None:
            bar.close()
    misses = len(todo) - hits if cache is not None else 0
    return [len(todo), len(samples) - len(todo), redone, hits, misses]
