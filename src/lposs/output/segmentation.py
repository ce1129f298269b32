"""The result of a segmentation: labels, scores resized on demand, and how to save them.

``ScoreMaps`` keeps the scores at the working size and resizes one class at a time to the
original size (METHOD.md, Output), so labelling a large image never holds a
``(C, H, W)`` array; ``Segmentation`` bundles the labels with them and writes the files.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import UNKNOWN
from ..errors import OutputError
from ..pipeline.windows import BandResize
from .drawing import class_shares, overlay, palette
from .files import save_label_png, save_overlay, save_scores, write_json

__all__ = ["ScoreMaps", "Segmentation", "provenance"]

# The packages whose versions a provenance record lists: {record key: distribution name}.
# torch reports its own (with the build, e.g. "2.4.1+cu121").
_VERSIONED = {"open_clip": "open_clip_torch", "timm": "timm", "numpy": "numpy",
              "pillow": "pillow"}

# Images up to this many pixels are resized whole (torch's F.interpolate itself); larger
# ones a band of rows of _BAND_PIXELS at a time (4 MB a float plane).
_WHOLE_PIXELS = 1 << 22
_BAND_PIXELS = 1 << 20

# Floor for the propagated all-ones column that puts scores back on the cosine scale.
_MIN_NORMALISER = 1e-6


class ScoreMaps:
    """Per-class scores at the original size, resized from the working size on demand.

    The paper's output order (METHOD.md, Output): the raw propagated scores are reduced
    over each class's synonyms at working size (``raw``), then resized bilinearly
    (``align_corners=False``) to the original size, where their argmax gives the labels.
    The scores reported divide the resized raw scores by the resized propagated
    all-ones column (``weight``), which puts them on the cosine scale without changing
    the argmax. Everything at the original size is made in bands of rows
    (:class:`lposs.pipeline.windows.BandResize`), so labelling a large image holds a few
    megabytes of scores, never a full-size float map.

    Args:
        raw: ``(C, h, w)`` float scores at the working size.
        weight: ``(h, w)`` the propagated all-ones column, or None (scores as they are).
        size: ``(H, W)`` the original size.
    """

    def __init__(self, raw: torch.Tensor, weight: torch.Tensor | None, size: tuple[int, int]):
        self.raw = raw
        self.weight = weight
        self.size = (int(size[0]), int(size[1]))
        self._resize = BandResize(tuple(raw.shape[-2:]), self.size, raw.device)
        height, width = self.size
        self._rows = height if height * width <= _WHOLE_PIXELS else max(1, _BAND_PIXELS // width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return (self.raw.shape[0], *self.size)

    def _weight_band(self, top: int, bottom: int) -> torch.Tensor | None:
        if self.weight is None:
            return None
        return self._resize.band(self.weight, top, bottom).clamp_min_(_MIN_NORMALISER)

    @torch.inference_mode()
    def class_bands(self, c: int) -> Iterator[torch.Tensor]:
        """Class ``c``'s scores (cosine scale) as consecutive ``(rows, W)`` float32 bands
        on the CPU, top to bottom."""
        for top, bottom in self._resize.bands(self._rows):
            band = self._resize.band(self.raw[c], top, bottom)
            weight = self._weight_band(top, bottom)
            yield (band if weight is None else band.div_(weight)).cpu()

    def class_scores(self, c: int) -> torch.Tensor:
        """``(H, W)`` float32 scores of class ``c`` on the CPU (cosine scale)."""
        return torch.cat(list(self.class_bands(c)))

    def full(self) -> torch.Tensor:
        """``(C, H, W)`` float32 scores of every class on the CPU."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for c in range(self.shape[0]):
            top = 0
            for band in self.class_bands(c):
                out[c, top:top + band.shape[0]] = band
                top += band.shape[0]
        return out

    @torch.inference_mode()
    def labels(self, unknown_threshold: float | None = None, *,
               dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``(H, W)`` argmax over classes at the original size (first class on ties),
        ``UNKNOWN`` where the best score (cosine scale) is below ``unknown_threshold``.

        Args:
            unknown_threshold: the abstain threshold, or None.
            dtype: an integer dtype that holds ``C - 1`` and ``UNKNOWN`` (``torch.uint8``
                below 255 classes: an eighth of the memory of int64 on a large image).
        """
        labels = torch.empty(self.size, dtype=dtype)
        for top, bottom in self._resize.bands(self._rows):
            best = self._resize.band(self.raw[0], top, bottom)
            band = torch.zeros_like(best, dtype=dtype)
            for c in range(1, self.shape[0]):
                plane = self._resize.band(self.raw[c], top, bottom)
                band.masked_fill_(plane > best, c)
                torch.maximum(best, plane, out=best)
            if unknown_threshold is not None:
                weight = self._weight_band(top, bottom)
                if weight is not None:
                    best /= weight
                band.masked_fill_(best < unknown_threshold, UNKNOWN)
            labels[top:bottom] = band.cpu()
        return labels


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
        label_map: `(H, W)` class index per pixel at the original size, in any integer
            dtype that holds them (the segmenter gives uint8 below 255 classes, so that a
            large image's labels take one byte a pixel); ``UNKNOWN`` (255) where the
            abstain threshold rejected every class. ``labels`` is the same as int64.
        score_maps: the per-class scores, resized to the original size on demand (a
            ``(C, H, W)`` tensor given here is wrapped as it is).
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

    label_map: torch.Tensor
    score_maps: ScoreMaps
    classes: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    convergence: dict[str, dict[str, int | float]] = field(default_factory=dict)
    source: str | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.score_maps, torch.Tensor):
            self.score_maps = ScoreMaps(self.score_maps, None, tuple(self.score_maps.shape[-2:]))

    @property
    def labels(self) -> torch.Tensor:
        """`(H, W)` int64 class index per pixel at the original size; ``UNKNOWN`` (255)
        where the abstain threshold rejected every class (``label_map`` as int64, made on
        first access)."""
        if self.label_map.dtype == torch.int64:
            return self.label_map
        if getattr(self, "_labels_int64", None) is None:
            self._labels_int64 = self.label_map.long()
        return self._labels_int64

    @functools.cached_property
    def scores(self) -> torch.Tensor:
        """`(C, H, W)` float32 per-class scores at the original size, on the scale of CLIP
        cosine similarity (propagation-weighted averages of the initial patch-text
        similarities; the synonym maximum for ``;`` names). Computed on first access:
        for a large image this is C full-size float maps."""
        return self.score_maps.full()

    def colors(self):
        """`(C, 3)` uint8 colour per class (the palette of the saved PNG)."""
        return palette(len(self.classes))

    def class_shares(self) -> dict[str, float]:
        """Share of pixels per class name (and "unknown" when present)."""
        shares = class_shares(self.label_map, len(self.classes))
        named = dict(zip(self.classes, shares))
        if len(shares) > len(self.classes) and shares[-1] > 0:
            named["unknown"] = shares[-1]
        return named

    def summary(self) -> dict:
        """A JSON-ready summary (what ``save`` writes to ``<stem>.json``).

        Keys: ``source`` (the image file, or None), ``height`` and ``width`` (pixels of
        the image and of the label map), ``classes`` (per class: ``index`` = its value in
        the label PNG, ``name``, ``color`` as in the label PNG's palette and the overlay,
        ``share`` of pixels), ``unknown`` (index 255 and share), ``timings_s``,
        ``settings`` (the configuration), ``convergence`` (the solver per stage) and
        ``provenance`` (versions, device, precision, weights; see :func:`provenance`).
        At most 254 classes (``lposs.vocab.parse_class_names``): indices 0..253 fit the
        8-bit label PNG next to 255 = unknown.
        """
        return self._summary(self.colors(), class_shares(self.label_map, len(self.classes)))

    def _summary(self, colors, shares: list[float]) -> dict:
        """:meth:`summary` from the `(C, 3)` colours and the C + 1 shares (unknown last)."""
        colors = colors.tolist()
        height, width = self.label_map.shape
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
                ``Segmenter.image``), or anything ``lposs.pipeline.images.load_image`` accepts, at
                the labels' size.
        """
        return overlay(image, self.label_map, self.classes, self.colors())

    def save(
        self, out_dir: str | Path, stem: str, image=None, *, scores: bool = False
    ) -> list[Path]:
        """Write ``<stem>.png`` (palette label map), ``<stem>.json`` and, given the image,
        ``<stem>_overlay.png``; ``<stem>_scores.npy`` when ``scores``. Each file is
        written atomically, and when one fails those already written are removed again:
        all of them or none. The palette and the pixel shares are computed once.

        Args:
            out_dir: Output folder (created if missing).
            stem: File name stem.
            image: For the overlay: the `(3, H, W)` image (uint8 or float in [0, 1]) in memory
                (``Segmenter.image``; not decoded again), or anything
                ``lposs.pipeline.images.load_image`` accepts; None writes no overlay.
            scores: Also write the `(C, H, W)` float32 scores.

        Returns:
            The written paths.

        Raises:
            OutputError: ``stem`` is empty, holds a path separator or ``..``, or names a
                file outside ``out_dir``.
        """
        out_dir = Path(out_dir)
        _check_stem(out_dir, stem)
        out_dir.mkdir(parents=True, exist_ok=True)
        colors = self.colors()
        shares = class_shares(self.label_map, len(self.classes))  # C + 1: unknown last
        written: list[Path] = []
        try:
            save_label_png(out_dir / f"{stem}.png", self.label_map, colors)
            written.append(out_dir / f"{stem}.png")
            if image is not None:
                save_overlay(out_dir / f"{stem}_overlay.png",
                             overlay(image, self.label_map, self.classes, colors, shares=shares))
                written.append(out_dir / f"{stem}_overlay.png")
            if scores:
                save_scores(out_dir / f"{stem}_scores.npy", self.score_maps)
                written.append(out_dir / f"{stem}_scores.npy")
            write_json(out_dir / f"{stem}.json", self._summary(colors, shares))
            written.append(out_dir / f"{stem}.json")
        except BaseException:
            for path in written:  # all of this result's files or none of them
                path.unlink(missing_ok=True)
            raise
        return written


def _check_stem(out_dir: Path, stem: str) -> None:
    """Raise ``OutputError`` unless ``stem`` names files directly inside ``out_dir``: a
    plain name (no separator, drive, NUL, ``.`` or ``..``) cannot resolve anywhere else."""
    if not isinstance(stem, str):
        raise TypeError(f"stem must be a str, got {type(stem).__name__}")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (not stem.strip() or stem in (".", "..") or "\0" in stem
            or any(sep in stem for sep in separators) or os.path.splitdrive(stem)[0]):
        raise OutputError(f"file name stem {stem!r} would not be a file directly in "
                          f"{out_dir}: give a plain name (no path separators, not '..'); "
                          "put any sub-folder in out_dir instead")
