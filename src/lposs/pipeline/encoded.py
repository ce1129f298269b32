"""What ``Segmenter.set_image`` computes from an image, as plain data: the decoded and
resized image (``PreparedImage``), and per window setup the encoders' outputs
(``WindowSetup``), together an ``EncodedImage`` that can be saved and loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..output.files import atomic_write

__all__ = ["WindowSetup", "PreparedImage", "EncodedImage"]


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

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically (a torch file of plain tensors, loadable with
        ``weights_only=True``)."""
        setups = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(s).items()}
                  for s in self.setups]
        payload = {"image": self.image.cpu(), "working": self.working.cpu(), "setups": setups,
                   "encode_s": self.encode_s, "source": self.source, "encoders": self.encoders}
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> EncodedImage:
        """Read what ``save`` wrote (never unpickles arbitrary objects)."""
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
        return cls(payload["image"].cpu(), payload["working"],
                   [WindowSetup(**s) for s in payload["setups"]], payload["encode_s"],
                   payload.get("source"), payload.get("encoders"))
