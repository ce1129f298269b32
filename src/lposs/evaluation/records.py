"""Per-image records of a run folder, and resuming from them.

``run_dir/settings.json`` ties the folder to one settings fingerprint; each image's metric
counts go to ``run_dir/records/<image id>.json`` (sparse, with a SHA-256 checksum) as soon
as they exist. A record is reused only when it is intact and was made with these settings;
a record with Boundary IoU counts serves a run without them too, so such a run computes
nothing again and leaves the earlier run's Boundary IoU (records and results) in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..distributed import ProcessGroup
from ..errors import DatasetError, LpossError
from ..output.files import write_json
from .datasets import SegmentationDataset
from .metrics import SegmentationMetrics
from .settings import DILATION_RATIO, RECORD_FORMAT, canonical_json, settings_digest

__all__ = [
    "file_name",
    "DamagedRecord",
    "RecordSpec",
    "make_record",
    "record_state",
    "read_record",
    "claim_run_dir",
]

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")


def file_name(sample_id: str) -> str:
    """A file-system-safe name for a sample id (the id itself when it is already safe)."""
    if _SAFE_NAME.fullmatch(sample_id):
        return sample_id
    tag = hashlib.sha256(sample_id.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)[:100].lstrip(".") + "-" + tag


class DamagedRecord(Exception):
    """A record file that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What a valid record of this run looks like."""

    digest: str  # settings digest
    num_classes: int
    ignore_index: int
    boundary: bool  # Boundary IoU counts required
    shapes: dict[str, tuple[int, ...]]  # SegmentationMetrics state tensors

    @classmethod
    def of(cls, digest: str, dataset: SegmentationDataset, boundary: bool) -> RecordSpec:
        state = cls.metrics_for(len(dataset.classes), dataset.ignore_index, boundary).state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        return cls(digest, len(dataset.classes), dataset.ignore_index, bool(boundary), shapes)

    @staticmethod
    def metrics_for(num_classes: int, ignore_index: int, boundary: bool) -> SegmentationMetrics:
        try:
            return SegmentationMetrics(num_classes, ignore_index=ignore_index,
                                       boundary=boundary, dilation_ratio=DILATION_RATIO)
        except ValueError as err:
            raise DatasetError(f"dataset settings: {err}") from None

    def metrics(self) -> SegmentationMetrics:
        return self.metrics_for(self.num_classes, self.ignore_index, self.boundary)


def make_record(sample_id: str, spec: RecordSpec, state: Mapping[str, Any],
                 seconds: float) -> dict:
    """A JSON record of one image's counts (``SegmentationMetrics.update``'s return value);
    each count tensor stored sparsely as flat indices and values."""
    counts = {}
    for name in spec.shapes:
        flat = torch.as_tensor(state[name]).reshape(-1).cpu()
        index = torch.nonzero(flat).reshape(-1)
        counts[name] = {"index": index.tolist(), "count": flat[index].tolist()}
    record = {
        "format": RECORD_FORMAT,
        "id": sample_id,
        "settings": spec.digest,
        "num_classes": spec.num_classes,
        "boundary": spec.boundary,
        "counts": counts,
        "seconds": round(float(seconds), 6),
    }
    record["checksum"] = hashlib.sha256(canonical_json(record)).hexdigest()
    return record


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise DamagedRecord(f"{what} is not a list of non-negative integers")
    return value


def record_state(record: Any, sample_id: str, spec: RecordSpec) -> dict[str, Any]:
    """Checks a parsed record and returns its counts as a ``SegmentationMetrics`` state."""
    if not isinstance(record, dict) or not isinstance(record.get("checksum"), str):
        raise DamagedRecord("no checksum")
    body = {k: v for k, v in record.items() if k != "checksum"}
    if hashlib.sha256(canonical_json(body)).hexdigest() != record["checksum"]:
        raise DamagedRecord("checksum mismatch")
    if record.get("format") != RECORD_FORMAT or record.get("id") != sample_id:
        raise DamagedRecord("written for another image or in another format")
    if record.get("settings") != spec.digest or record.get("num_classes") != spec.num_classes:
        raise DamagedRecord("written with other settings")
    if spec.boundary and record.get("boundary") is not True:
        raise DamagedRecord("no Boundary IoU counts (made without boundary=True)")
    counts = record.get("counts")
    # A run without Boundary IoU reuses a record that has its counts too.
    if not isinstance(counts, dict) or not set(spec.shapes) <= set(counts):
        raise DamagedRecord("malformed counts")
    state: dict[str, Any] = {"num_images": 1}
    for name, shape in spec.shapes.items():
        entry = counts[name]
        if not isinstance(entry, dict):
            raise DamagedRecord(f"malformed {name} counts")
        index = _int_list(entry.get("index"), f"{name} index")
        count = _int_list(entry.get("count"), f"{name} count")
        size = math.prod(shape)
        if len(index) != len(count) or any(b <= a for a, b in zip(index, index[1:])) or \
                (index and index[-1] >= size):
            raise DamagedRecord(f"{name} indices out of order or out of range")
        flat = torch.zeros(size, dtype=torch.int64)
        flat[torch.tensor(index, dtype=torch.int64)] = torch.tensor(count, dtype=torch.int64)
        state[name] = flat.view(shape)
    if "boundary_union" in state and bool((state["boundary_intersection"]
                                           > state["boundary_union"]).any()):
        raise DamagedRecord("boundary intersection exceeds union")
    return state


def read_record(path: Path, sample_id: str, spec: RecordSpec) -> dict[str, Any] | None:
    """The record's state, None when absent; raises ``DamagedRecord``."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DamagedRecord(f"unreadable ({err})") from None
    try:
        record = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise DamagedRecord("not valid JSON") from None
    return record_state(record, sample_id, spec)


def claim_run_dir(run_dir: Path, settings: dict, rank: int, group: ProcessGroup) -> None:
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
