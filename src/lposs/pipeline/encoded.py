"""What ``Segmenter.set_image`` computes from an image: the decoded and resized image
(``PreparedImage``), and per window setup the encoders' outputs (``WindowSetup``), together
an ``EncodedImage`` that can be saved and loaded; ``encode_images`` makes them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import LPOSSConfig
from ..errors import ConfigError
from ..output.files import atomic_write
from ..progress import Progress, StageCounter
from .windows import crop_windows, patch_positions, window_setups

__all__ = ["WindowSetup", "PreparedImage", "EncodedImage", "encode_images"]


@dataclass
class WindowSetup:
    """Cached encoder outputs for one (window size, stride) setup."""

    boxes: torch.Tensor  # (n, 4) y1, x1, y2, x2 in working pixels
    clip: torch.Tensor  # (n, E, gh, gw) dense CLIP features (unit norm), on the graph grid
    dino: torch.Tensor | None  # (n * gh * gw, D) DINO value features, unit norm
    positions: torch.Tensor | None  # (n * gh * gw, 2) patch centres (y, x)
    patch_size: int  # pixels per grid cell of `clip`

    def to(self, device: torch.device) -> WindowSetup:
        """The features and positions on ``device`` (boxes stay on the CPU)."""
        def move(t):
            return None if t is None else t.to(device)

        return WindowSetup(self.boxes, move(self.clip), move(self.dino), move(self.positions),
                           self.patch_size)

    def graph_inputs(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)`` features and ``(N, 2)`` patch centres of the patch graph: DINO's
        (``kind`` "dino") or the MaskCLIP features of ``clip`` ("clip")."""
        if kind == "dino":
            return self.dino, self.positions
        n, e, gh, gw = self.clip.shape
        positions = patch_positions(self.boxes, (gh, gw), self.patch_size)
        return self.clip.permute(0, 2, 3, 1).reshape(-1, e), positions.to(self.clip.device)


@dataclass(frozen=True)
class PreparedImage:
    """An image decoded and resized for ``set_image`` (``Segmenter.prepare_image``)."""

    image: torch.Tensor  # (3, H, W) the original image (uint8, or float in [0, 1]), on the CPU
    working: torch.Tensor  # (3, h, w) float32 in [0, 1] at the working size
    source: str | None = None  # the image file's resolved path, when read from a file


@dataclass
class EncodedImage:
    """Everything ``predict`` needs from an image: what ``set_image`` computes once.

    Save it with ``save`` to skip the encoders next time (e.g. an evaluation sweep over
    propagation settings); ``Segmenter.set_encoded`` takes it back.
    """

    image: torch.Tensor  # (3, H, W) the original image (uint8, or float in [0, 1]), on the CPU
    working: torch.Tensor  # (3, h, w) at the working size, on the model's device
    setups: list[WindowSetup]
    encode_s: float  # seconds the encoders took
    source: str | None = None  # the image file (absolute path), None for an image in memory
    encoders: str | None = None  # what encoded it (Segmenter.encoder_identity); None: unknown
    depth: torch.Tensor | None = None  # (h, w) predicted depth at the working size, or None

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically (a torch file of plain tensors, loadable with
        ``weights_only=True``)."""
        setups = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(s).items()}
                  for s in self.setups]
        payload = {"image": self.image.cpu(), "working": self.working.cpu(), "setups": setups,
                   "encode_s": self.encode_s, "source": self.source, "encoders": self.encoders,
                   "depth": None if self.depth is None else self.depth.cpu()}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> EncodedImage:
        """Read what ``save`` wrote (never unpickles arbitrary objects)."""
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
        return cls(payload["image"].cpu(), payload["working"],
                   [WindowSetup(**s) for s in payload["setups"]], payload["encode_s"],
                   payload.get("source"), payload.get("encoders"), payload.get("depth"))


def encode_images(clip, dino, config: LPOSSConfig, images: Sequence[PreparedImage], *,
                  identity: str | None = None, progress: Progress | None = None,
                  depth=None) -> list[EncodedImage]:
    """Every window of several images through the encoders, the windows of all images
    sharing the batches of ``config.batch_size`` (``Segmenter.encode_images``).

    Args:
        clip: the ``ClipEncoder``; dino: the ``DinoEncoder`` (``config.uses_dino``).
        config: windows, batch size and which encoders run.
        images: from ``Segmenter.prepare_image``.
        identity: what encoded them (``Segmenter.encoder_identity``), recorded.
        progress: called with ``("encoding windows", done, total)``.
        depth: the ``DepthEncoder`` (``config.uses_depth``), run on each working image.
    """
    if config.uses_depth and depth is None:
        raise ConfigError(f"pixel_features={config.pixel_features!r} needs a depth model "
                          "(Segmenter.from_pretrained loads it)")
    start = time.perf_counter()
    device = next(clip.parameters()).device
    workings = [image.working.to(device) for image in images]
    boxes = [window_setups(*w.shape[-2:], config.windows) for w in workings]
    passes = (2 if config.uses_dino else 1) * sum(len(b) for per in boxes for b in per)
    counter = StageCounter(progress, "encoding windows", passes)
    setups: list[list[WindowSetup]] = [[] for _ in images]
    for s in range(len(config.windows or [None])):  # None: one window, the whole image
        crops = [crop_windows(w, per[s]) for w, per in zip(workings, boxes)]
        groups: dict[tuple, list[int]] = {}  # the windows of small images are smaller
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[1:]), []).append(i)
        for group in groups.values():
            batch = torch.cat([crops[i] for i in group])
            counts = [len(crops[i]) for i in group]
            clip_parts = _split(_features(clip, batch, config.batch_size, counter), counts)
            dino_parts = (_split(_features(dino, batch, config.batch_size, counter), counts)
                          if config.uses_dino else [None] * len(group))
            for i, c, d in zip(group, clip_parts, dino_parts):
                setups[i].append(_window_setup(boxes[i][s], c, d, clip, dino))
    depths = [depth.predict(w) if config.uses_depth else None for w in workings]
    share = (time.perf_counter() - start) / max(len(images), 1)
    return [EncodedImage(image.image, w, per, share, image.source, identity, d)
            for image, w, per, d in zip(images, workings, setups, depths)]


def _features(encoder, crops: torch.Tensor, batch_size: int,
              counter: StageCounter) -> torch.Tensor:
    """`(n, 3, s, s)` windows -> `(n, E, gh, gw)` float32, ``batch_size`` a pass, counted."""
    parts = []
    for first in range(0, len(crops), batch_size):
        batch = crops[first:first + batch_size]
        parts.append(encoder.dense_features(batch, batch_size=len(batch)).float())
        counter.advance(len(batch))
    return torch.cat(parts)


def _split(batch: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """``batch`` cut into consecutive parts of ``counts`` rows, each its own tensor (a view
    would keep, and ``EncodedImage.save`` would write, the whole batch)."""
    if len(counts) == 1:
        return [batch]
    return [part.clone() for part in batch.split(counts)]


def _window_setup(boxes: torch.Tensor, clip_features: torch.Tensor,
                  dino_features: torch.Tensor | None, clip, dino) -> WindowSetup:
    """One image's window setup from its `(n, E, gh, gw)` CLIP and `(n, D, gh', gw')` DINO
    window features (None without the patch stage)."""
    if dino_features is None:
        return WindowSetup(boxes, clip_features, None, None, clip.patch_size)
    grid = tuple(dino_features.shape[-2:])
    if tuple(clip_features.shape[-2:]) != grid:  # e.g. DINO ViT-B/8: CLIP to the DINO grid
        clip_features = F.interpolate(clip_features, size=grid, mode="bilinear",
                                      align_corners=False)
    positions = patch_positions(boxes, grid, dino.patch_size).to(dino_features.device)
    flat = dino_features.permute(0, 2, 3, 1).reshape(-1, dino_features.shape[1])
    return WindowSetup(boxes, clip_features, flat, positions, dino.patch_size)
