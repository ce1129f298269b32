"""The base class of the CLIP and DINO encoders: pixel normalisation, batching, padding,
the precision and the weights identity they share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.windows import pad_to_multiple
from .device import PRECISIONS
from .sources import weights_id

__all__ = ["DenseEncoder"]


class DenseEncoder(nn.Module):
    """A frozen ViT that turns windows into L2-normalised patch features; subclasses set
    ``patch_size`` and implement ``_features`` (normalised ``(B, 3, H, W)``, H and W
    multiples of P -> ``(B, D, H/P, W/P)``) and ``_dtype``.

    Attributes:
        weights_info: where the weights came from, for provenance records:
            ``{"source": "file", "path", "sha256"}``, ``{"source": "hub", "repo",
            "revision", "file", "path", "sha256"}``, ``{"source": "random"}`` (set by
            ``load_clip`` / ``load_dino``), or ``{"source": "unknown"}`` for a model
            wrapped directly.
    """

    patch_size: int

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> None:
        super().__init__()
        self.weights_info: dict = {"source": "unknown"}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device), False)

    @property
    def weights_id(self) -> str:
        """The identity of the weights (:func:`lposs.encoders.sources.weights_id`), e.g.
        ``"sha256:<hex>"``: what every cache key and identity check uses."""
        return weights_id(self.weights_info)

    @property
    def precision(self) -> str:
        """The precision the model computes in: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
        dtype = self._dtype()
        return next((name for name, d in PRECISIONS.items() if d == dtype), str(dtype))

    def train(self, mode: bool = True) -> DenseEncoder:
        """Encoders stay in eval mode (frozen)."""
        return super().train(False)

    @torch.inference_mode()
    def dense_features(self, windows: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
        """Dense features of a batch of windows.

        Args:
            windows: ``(B, 3, h, w)`` RGB in [0, 1], any size; padded bottom/right with
                black to a multiple of P here.
            batch_size: windows per forward pass.

        Returns:
            ``(B, D, ceil(h/P), ceil(w/P))`` float32 on the model's device, each patch
            vector L2-normalised.
        """
        mean, std = self.mean.view(1, 3, 1, 1), self.std.view(1, 3, 1, 1)
        out = []
        for chunk in windows.split(batch_size):
            x = pad_to_multiple(chunk.to(mean.device).float(), self.patch_size)
            out.append(self._features(((x - mean) / std).to(self._dtype())).float())
        return F.normalize(torch.cat(out), dim=1)
