"""Evaluation over a dataset: mIoU, Boundary IoU and pixel accuracy, resumable and distributed.

``evaluate`` runs a ``Segmenter`` (or the patch-resolution oracle) over
a :class:`~lposs.evaluation.datasets.SegmentationDataset` and sums per-image integer counts
(:mod:`lposs.evaluation.metrics`) into one result.

With a ``run_dir``, every image's counts are written as soon as they exist, atomically, to
``run_dir/records/<image id>.json`` (sparse confusion-matrix counts, Boundary IoU band
intersections and unions, a SHA-256 checksum). Calling ``evaluate`` again with the same
settings reuses every valid record and computes only the rest, so an interrupted run
(Ctrl-C, crash, ``kill -9``) resumes where it stopped and ends with exactly the numbers an
uninterrupted run gives. ``run_dir/settings.json`` fingerprints the settings (dataset and
class list, method, every config field but ``batch_size``, a digest of the encoders'
weights); a run dir made with other settings is refused.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r evaluates images r, r + N, ... and writes
their records; after a barrier (gloo) every rank sums all records in dataset order and rank
0 writes ``results.json`` and ``results.md``.

With a ``cache_dir``, each image's encoder outputs (``EncodedImage``) are stored under a key
made of the encoder settings (``LPOSSConfig.encoder_key``) and the image file's content
hash, so that ``sweep`` over propagation settings (k, sigma, gamma, r, tau, alpha, ...) runs
the encoders once.

Modules: ``loop`` (``evaluate``), ``sweeps`` (``sweep``), ``results`` (what they return),
``settings`` (methods and the settings fingerprint), ``records`` (per-image records and
resuming), ``cache`` (encoder outputs on disk); ``lposs.distributed`` runs it under torchrun.
"""

from __future__ import annotations

from ..distributed import distributed_context
from .loop import evaluate
from .results import EvalResult, SweepResult
from .settings import METHODS, run_settings, settings_digest
from .sweeps import SWEEPABLE, sweep

__all__ = [
    "METHODS",
    "SWEEPABLE",
    "EvalResult",
    "SweepResult",
    "evaluate",
    "sweep",
    "run_settings",
    "settings_digest",
    "distributed_context",
]
