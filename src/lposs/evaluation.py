"""Evaluation over a dataset: mIoU, Boundary IoU and pixel accuracy, resumable and distributed.

``evaluate`` runs a :class:`~lposs.segmenter.Segmenter` (or the patch-resolution oracle) over
a :class:`~lposs.datasets.SegmentationDataset` and sums per-image integer counts
(:mod:`lposs.metrics`) into one result.

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
made of the encoder-relevant settings and the image file's content hash, so that ``sweep``
over propagation settings (k, sigma, gamma, r, tau, alpha, ...) runs the encoders once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .datasets import SegmentationDataset, paper_reference
from .errors import ConfigError, DatasetError, LpossError
from .files import atomic_write, file_sha256, write_json
from .metrics import SegmentationMetrics, oracle_labels
from .segmenter import EncodedImage, Segmenter

__all__ = [
    "METHODS",
    "SWEEPABLE",
    "EvalResult",
    "SweepResult",
    "ProgressEvent",
    "evaluate",
    "sweep",
    "run_settings",
    "settings_digest",
    "distributed_context",
]

METHODS = ("lposs+", "lposs", "maskclip", "oracle")
"""Evaluation methods: the three pipelines (by their stages) and the ground-truth oracle."""

SWEEPABLE = ("k", "gamma", "sigma", "distance_power", "r", "tau", "alpha", "tol", "max_iter")
"""Config fields ``sweep`` may vary: they change the propagation, not the encoder outputs."""

_STAGES = {"lposs+": (True, True), "lposs": (True, False), "maskclip": (False, False)}
_ENCODER_FIELDS = ("clip", "clip_pretrained", "dino", "short_side", "windows", "patch_stage")
_RECORD_FORMAT = 1
_DILATION_RATIO = 0.02  # Boundary IoU band width (fraction of the image diagonal)
_ORACLE_PATCH_SIZE = 16  # the oracle row of the paper: ViT-B/16 patches
_BACKGROUND_FIRST = ("voc", "coco_object")  # class 0 is "background" expanded into synonyms
_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class ProgressEvent:
    """Passed to a ``progress`` callback after each image this process computed.

    Attributes:
        sample_id: the image's id.
        done: images of this process's share finished (reused records included).
        total: images in this process's share.
        seconds: time spent on this image (prediction and metrics).
        cache_hit: the encoder outputs came from the cache.
    """

    sample_id: str
    done: int
    total: int
    seconds: float
    cache_hit: bool


@dataclasses.dataclass
class EvalResult:
    """Metrics of one evaluation run.

    Attributes:
        dataset: the dataset name.
        method: one of ``METHODS``.
        classes: the class names, in label order.
        metrics: ``SegmentationMetrics.compute()`` over all images (fractions in [0, 1]).
        boundary: whether Boundary IoU was computed.
        settings: the settings fingerprint (see ``run_settings``).
        paper: the paper's numbers for this dataset and method in percent, or None.
        stats: images, computed, reused, redone (damaged records), cache_hits,
            cache_misses (summed over processes), seconds (this process's wall time).
        run_dir: where records and results were written, or None.
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
            parts.append(f"{key}_weights_sha256={value[:12]}")
    for key, value in (settings.get("extra") or {}).items():
        parts.append(f"{key}={value}")
    return ", ".join(parts)


# -------------------------------------------------------------------------- settings
_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes); memoised until a
    tensor changes in place."""
    tensors = list(module.state_dict(keep_vars=True).items())
    try:
        version = tuple((id(t), t._version) for _, t in tensors)
    except RuntimeError:  # inference tensors keep no version counter: no memo
        version = None
    cached = _DIGESTS.get(module)
    if version is not None and cached is not None and cached[0] == version:
        return cached[1]
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    _DIGESTS[module] = (version, digest)
    return digest


def _resolve(segmenter: Segmenter | None, method: str | None) -> tuple[str, Segmenter | None]:
    """The method name and a segmenter whose stages match it (None for the oracle)."""
    if segmenter is not None and not isinstance(segmenter, Segmenter):
        raise TypeError(f"segmenter must be a lposs Segmenter or None, got "
                        f"{type(segmenter).__name__}")
    if method is None:
        if segmenter is None:
            return "oracle", None
        stages = (segmenter.config.patch_stage, segmenter.config.pixel_stage)
        method = next((m for m, s in _STAGES.items() if s == stages), None)
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
    patch, pixel = _STAGES[method]
    config = segmenter.config
    if (config.patch_stage, config.pixel_stage) != (patch, pixel):
        config = config.replace(patch_stage=patch, pixel_stage=pixel)
        segmenter = Segmenter(segmenter.clip, segmenter.dino, config)
    if patch and segmenter.dino is None:
        raise ValueError(f"method {method!r} needs a segmenter with a DINO encoder")
    return method, segmenter


def _check_dataset(dataset: Any) -> None:
    if not isinstance(dataset, SegmentationDataset):
        raise TypeError(f"dataset must be a SegmentationDataset (lposs.datasets.get_dataset or "
                        f"FolderDataset), got {type(dataset).__name__}")


def _settings(dataset: SegmentationDataset, segmenter: Segmenter | None, method: str,
              extra: Mapping[str, Any] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "format": _RECORD_FORMAT,
        "dataset": {
            "name": dataset.name,
            "root": str(dataset.root.resolve()) if dataset.root is not None else None,
            "classes": list(dataset.classes),
            "ignore_index": dataset.ignore_index,
            "reduce_zero_label": dataset.reduce_zero_label,
        },
        "method": method,
        "boundary_dilation_ratio": _DILATION_RATIO,
    }
    if segmenter is None:
        settings["oracle_patch_size"] = _ORACLE_PATCH_SIZE
    else:
        config = dataclasses.asdict(segmenter.config)
        config.pop("batch_size")  # how many windows per forward pass: not a setting of the result
        settings["config"] = config
        settings["models"] = {
            "clip": _module_digest(segmenter.clip),
            "dino": _module_digest(segmenter.dino) if config["patch_stage"] else None,
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
        fields but ``batch_size`` and SHA-256 digests of the encoders' weights (or the
        oracle's patch size), plus ``extra``.
    """
    _check_dataset(dataset)
    method, segmenter = _resolve(segmenter, method)
    return _settings(dataset, segmenter, method, extra_settings)


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a settings dict in canonical JSON."""
    return hashlib.sha256(_canonical(settings)).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two settings dicts differ (a whole subtree when one side lacks it)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                out.append(prefix + key)
            else:
                out += _differences(a[key], b[key], f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix[:-1]]


# ---------------------------------------------------------------------- distribution
def distributed_context() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without.

    Raises:
        LpossError: the variables are set but malformed.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise LpossError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LpossError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


class _Group:
    """A gloo process group for barriers and small sums (None members without torchrun)."""

    def __init__(self, world: int, handle: Any = None) -> None:
        self.world, self.handle = world, handle

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier(group=self.handle)

    def sum(self, values: list[int]) -> list[int]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, group=self.handle)
        return t.tolist()


@contextlib.contextmanager
def _process_group(world: int) -> Iterator[_Group]:
    """Joins (or starts, and then ends) the default process group when ``world`` > 1.

    Only CPU tensors are exchanged, so a gloo group is used whatever the models' device.
    """
    if world == 1:
        yield _Group(1)
        return
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:  # long timeout: ranks can wait at the final barrier for a slow neighbour
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    elif dist.get_world_size() != world:
        raise LpossError(f"the process group has {dist.get_world_size()} ranks, "
                         f"WORLD_SIZE says {world}")
    handle = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        yield _Group(world, handle)
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- records
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


def _file_name(sample_id: str) -> str:
    """A file-system-safe name for a sample id (the id itself when it is already safe)."""
    if _SAFE_NAME.fullmatch(sample_id):
        return sample_id
    tag = hashlib.sha256(sample_id.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:100].lstrip(".") + "-" + tag


class _DamagedRecord(Exception):
    """A record file that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class _RecordSpec:
    """What a valid record of this run looks like."""

    digest: str  # settings digest
    num_classes: int
    ignore_index: int
    boundary: bool  # Boundary IoU counts required
    shapes: dict[str, tuple[int, ...]]  # SegmentationMetrics state tensors

    @classmethod
    def of(cls, digest: str, dataset: SegmentationDataset, boundary: bool) -> _RecordSpec:
        state = cls.metrics_for(len(dataset.classes), dataset.ignore_index, boundary).state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        return cls(digest, len(dataset.classes), dataset.ignore_index, bool(boundary), shapes)

    @staticmethod
    def metrics_for(num_classes: int, ignore_index: int, boundary: bool) -> SegmentationMetrics:
        try:
            return SegmentationMetrics(num_classes, ignore_index=ignore_index,
                                       boundary=boundary, dilation_ratio=_DILATION_RATIO)
        except ValueError as err:
            raise DatasetError(f"dataset settings: {err}") from None

    def metrics(self) -> SegmentationMetrics:
        return self.metrics_for(self.num_classes, self.ignore_index, self.boundary)


def _make_record(sample_id: str, spec: _RecordSpec, state: Mapping[str, Any],
                 seconds: float) -> dict:
    """A JSON record of one image's counts (``SegmentationMetrics.update``'s return value);
    each count tensor stored sparsely as flat indices and values."""
    counts = {}
    for name in spec.shapes:
        flat = torch.as_tensor(state[name]).reshape(-1).cpu()
        index = torch.nonzero(flat).reshape(-1)
        counts[name] = {"index": index.tolist(), "count": flat[index].tolist()}
    record = {
        "format": _RECORD_FORMAT,
        "id": sample_id,
        "settings": spec.digest,
        "num_classes": spec.num_classes,
        "boundary": spec.boundary,
        "counts": counts,
        "seconds": round(float(seconds), 6),
    }
    record["checksum"] = hashlib.sha256(_canonical(record)).hexdigest()
    return record


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise _DamagedRecord(f"{what} is not a list of non-negative integers")
    return value


def _record_state(record: Any, sample_id: str, spec: _RecordSpec) -> dict[str, Any]:
    """Checks a parsed record and returns its counts as a ``SegmentationMetrics`` state."""
    if not isinstance(record, dict) or not isinstance(record.get("checksum"), str):
        raise _DamagedRecord("no checksum")
    body = {k: v for k, v in record.items() if k != "checksum"}
    if hashlib.sha256(_canonical(body)).hexdigest() != record["checksum"]:
        raise _DamagedRecord("checksum mismatch")
    if record.get("format") != _RECORD_FORMAT or record.get("id") != sample_id:
        raise _DamagedRecord("written for another image or in another format")
    if record.get("settings") != spec.digest or record.get("num_classes") != spec.num_classes:
        raise _DamagedRecord("written with other settings")
    if spec.boundary and record.get("boundary") is not True:
        raise _DamagedRecord("no Boundary IoU counts (made without boundary=True)")
    counts = record.get("counts")
    if not isinstance(counts, dict) or set(counts) != set(spec.shapes):
        raise _DamagedRecord("malformed counts")
    state: dict[str, Any] = {"num_images": 1}
    for name, shape in spec.shapes.items():
        entry = counts[name]
        if not isinstance(entry, dict):
            raise _DamagedRecord(f"malformed {name} counts")
        index = _int_list(entry.get("index"), f"{name} index")
        count = _int_list(entry.get("count"), f"{name} count")
        size = math.prod(shape)
        if len(index) != len(count) or any(b <= a for a, b in zip(index, index[1:])) or \
                (index and index[-1] >= size):
            raise _DamagedRecord(f"{name} indices out of order or out of range")
        flat = torch.zeros(size, dtype=torch.int64)
        flat[torch.tensor(index, dtype=torch.int64)] = torch.tensor(count, dtype=torch.int64)
        state[name] = flat.view(shape)
    if "boundary_union" in state and bool((state["boundary_intersection"]
                                           > state["boundary_union"]).any()):
        raise _DamagedRecord("boundary intersection exceeds union")
    return state


def _read_record(path: Path, sample_id: str, spec: _RecordSpec) -> dict[str, Any] | None:
    """The record's state, None when absent; raises ``_DamagedRecord``."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _DamagedRecord(f"unreadable ({err})") from None
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise _DamagedRecord("not valid JSON") from None
    return _record_state(record, sample_id, spec)


def _claim_run_dir(run_dir: Path, settings: dict, rank: int, group: _Group) -> None:
    """Creates ``run_dir`` with ``settings.json``, or checks that it holds the same settings."""
    path = run_dir / "settings.json"
    try:
        existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LpossError(f"cannot read {path} ({err}); choose another --out (run_dir) or "
                         "delete the folder") from None
    if existing is not None:
        old = existing.get("settings") if isinstance(existing, dict) else None
        if not isinstance(old, dict) or old != settings:
            diff = _differences(old, settings) if isinstance(old, dict) else ["settings"]
            shown = ", ".join(diff[:6]) + (", ..." if len(diff) > 6 else "")
            raise LpossError(f"{run_dir} holds records made with other settings (differs in: "
                             f"{shown}); choose another --out (run_dir) or delete the folder")
    group.barrier()  # every rank has read the file before rank 0 may create it
    if rank == 0:
        try:
            (run_dir / "records").mkdir(parents=True, exist_ok=True)
            if existing is None:
                write_json(path, {"digest": settings_digest(settings), "settings": settings})
        except OSError as err:
            raise LpossError(f"cannot write to run folder {run_dir}: {err}") from None
    group.barrier()


# ------------------------------------------------------------------------ evaluation
def _encode(segmenter: Segmenter, sample_id: str, image_path: Path, cache: Path | None) -> bool:
    """Encodes the image into the segmenter, through the cache; returns whether it hit.

    The cache file is named by the sample id and the image file's content hash (the folder
    by the encoder settings), so a changed image is encoded again.
    """
    path = None
    if cache is not None:
        try:
            path = cache / f"{_file_name(sample_id)}-{file_sha256(image_path)[:16]}.pt"
        except OSError as err:
            raise DatasetError(f"cannot read image {image_path}: {err}") from None
        if path.is_file():
            try:
                segmenter.set_encoded(EncodedImage.load(path, segmenter.device))
                return True
            except Exception as err:  # any damage to a cache file: encode again
                _log.warning("lposs: cache file %s is unusable (%s); encoding again", path, err)
    encoded = segmenter.set_image(image_path)
    if path is not None:
        try:
            encoded.save(path)
        except OSError as err:
            _log.warning("lposs: cannot write cache file %s (%s)", path, err)
    return False


def _image_counts(sample, dataset: SegmentationDataset, segmenter: Segmenter | None,
                  cache: Path | None, spec: _RecordSpec) -> tuple[dict[str, Any], bool]:
    """One image's prediction compared to its label: (its metrics state, cache hit)."""
    gt = torch.from_numpy(sample.load_label())
    hit = False
    if segmenter is None:
        pred = oracle_labels(gt, patch_size=_ORACLE_PATCH_SIZE, ignore_index=dataset.ignore_index)
    else:
        hit = _encode(segmenter, sample.id, Path(sample.image_path), cache)
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
        dataset: the images, labels and classes (``lposs.datasets``).
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
    _check_dataset(dataset)
    method, segmenter = _resolve(segmenter, method)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    samples = dataset.samples[:limit]
    ids = [s.id for s in samples]
    names = [_file_name(i) for i in ids]
    if len(set(names)) != len(names):
        raise DatasetError(f"dataset {dataset.name!r} has repeated sample ids")
    if cache_dir is not None and segmenter is None:
        cache_dir = None  # the oracle runs no encoder
    settings = _settings(dataset, segmenter, method, extra_settings)
    digest = settings_digest(settings)
    rank, world, _ = distributed_context()
    if world > 1 and run_dir is None:
        raise ValueError("run_dir is required under torchrun: ranks exchange records through it")
    run_dir = Path(run_dir) if run_dir is not None else None
    spec = _RecordSpec.of(digest, dataset, boundary)
    cache = _cache_folder(cache_dir, settings) if cache_dir is not None else None
    with _process_group(world) as group:
        if run_dir is not None:
            _claim_run_dir(run_dir, settings, rank, group)
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
                state = _read_record(run_dir / "records" / f"{name}.json", sample_id, spec)
            except _DamagedRecord as err:
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
                        run_dir)
    if run_dir is not None and rank == 0:
        write_json(run_dir / "results.json", result.to_dict())
        atomic_write(run_dir / "results.md", lambda f: f.write(result.to_markdown().encode()))
    return result


def _cache_folder(cache_dir: str | os.PathLike, settings: dict) -> Path:
    key = {name: settings["config"][name] for name in _ENCODER_FIELDS}
    key["models"] = settings["models"]
    folder = Path(cache_dir) / f"encoded-{settings_digest(key)[:16]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LpossError(f"cannot write to cache folder {cache_dir}: {err}") from None
    return folder


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
            if _read_record(path, sample.id, spec) is not None:
                continue
        except _DamagedRecord as err:
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
            record = _make_record(sample.id, spec, state, seconds)
            if path is None:
                memory[sample.id] = _record_state(record, sample.id, spec)
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


# ----------------------------------------------------------------------------- sweep
def _sweep_grid(grid: Any) -> list[tuple[str, list]]:
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("sweep grid must be a non-empty mapping of setting -> values")
    items = []
    for name, values in grid.items():
        if name not in SWEEPABLE:
            raise ConfigError(f"cannot sweep {name!r}: choose from {', '.join(SWEEPABLE)} "
                              "(the encoder outputs must stay the same)")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"sweep values of {name!r} must be a non-empty list")
        items.append((name, list(values)))
    return items


def _combo_name(values: Mapping[str, Any]) -> str:
    return "_".join(f"{k}={v}" for k, v in values.items()).replace("/", "_")


def sweep(
    dataset: SegmentationDataset,
    segmenter: Segmenter,
    grid: Mapping[str, Sequence[Any]],
    *,
    method: str | None = None,
    boundary: bool = False,
    limit: int | None = None,
    run_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | Callable[[ProgressEvent], None] | None = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Evaluate every combination of propagation settings, encoding each image once.

    Each combination is an ``evaluate`` run with ``segmenter.config.replace(**values)``, in
    ``run_dir/<name=value_...>`` (resumable like any run); the encoder outputs are cached in
    ``cache_dir`` (default ``run_dir/cache``, or a temporary folder without ``run_dir``).

    Args:
        dataset: as for ``evaluate``.
        segmenter: the segmenter whose config is the base of every combination.
        grid: config field -> values, e.g. ``{"k": [200, 400], "tau": [0.01, 0.05]}``;
            fields from ``SWEEPABLE``.
        method, boundary, limit, progress, extra_settings: as for ``evaluate``.
        run_dir: the parent folder of the combinations' run folders (and of
            ``sweep.json`` / ``sweep.md``).
        cache_dir: the encoder-output cache.

    Returns:
        The results, one per combination, in grid order (the last field varies fastest).
    """
    items = _sweep_grid(grid)
    method, segmenter = _resolve(segmenter, method)
    if segmenter is None:
        raise ValueError("sweep needs a segmenter: the oracle has no propagation settings")
    run_dir = Path(run_dir) if run_dir is not None else None
    rank, world, _ = distributed_context()
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process_group(world))  # one group for all the runs
        if cache_dir is None:
            cache_dir = run_dir / "cache" if run_dir is not None else \
                stack.enter_context(tempfile.TemporaryDirectory(prefix="lposs-cache-"))
        for combo in itertools.product(*(values for _, values in items)):
            values = dict(zip((name for name, _ in items), combo))
            config = segmenter.config.replace(**values)
            result = evaluate(
                dataset, Segmenter(segmenter.clip, segmenter.dino, config), method=method,
                boundary=boundary, limit=limit, progress=progress, cache_dir=cache_dir,
                run_dir=run_dir / _combo_name(values) if run_dir is not None else None,
                extra_settings=extra_settings,
            )
            rows.append((values, result))
    out = SweepResult([name for name, _ in items], rows)
    if run_dir is not None and rank == 0:
        write_json(run_dir / "sweep.json", out.to_dict())
        atomic_write(run_dir / "sweep.md", lambda f: f.write(out.to_markdown().encode()))
    return out
