"""Helpers shared by the CLIP and DINO encoders: the encoder base class, input checks, padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..pipeline.windows import pad_to_multiple
from .device import PRECISIONS

__all__ = [
    "DenseEncoder",
    "check_windows",
    "check_batch_size",
    "normalize_and_pad",
    "chunks",
]

def check_windows(windows: torch.Tensor) -> None:
    """Raise unless ``windows`` is a floating ``(B, 3, h, w)`` batch with B, h, w > 0."""
    if not isinstance(windows, torch.Tensor):
        raise TypeError(f"windows must be a torch.Tensor, got {type(windows).__name__}")
    if windows.ndim != 4 or windows.shape[1] != 3:
        raise ValueError(f"windows must have shape (B, 3, h, w), got {tuple(windows.shape)}")
    if min(windows.shape[0], windows.shape[2], windows.shape[3]) == 0:
        raise ValueError(f"windows must be non-empty, got shape {tuple(windows.shape)}")
    if not windows.is_floating_point():
        raise TypeError(f"windows must be floating point RGB in [0, 1], got dtype {windows.dtype}")


def check_batch_size(batch_size: int) -> None:
    """Raise unless ``batch_size`` is a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def normalize_and_pad(
    windows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Pad bottom/right with black to a multiple of the patch size, then normalise.

    Args:
        windows: ``(B, 3, h, w)`` RGB in [0, 1].
        mean: ``(3,)`` per-channel mean.
        std: ``(3,)`` per-channel standard deviation.
        patch_size: the encoder's patch size P.

    Returns:
        ``(B, 3, ceil(h/P)*P, ceil(w/P)*P)`` float32, ``(x - mean) / std`` (padding
        is 0 before normalisation, so ``-mean / std`` after).
    """
    x = pad_to_multiple(windows.float(), patch_size)
    return (x - mean.float().view(1, 3, 1, 1)) / std.float().view(1, 3, 1, 1)


def chunks(batch: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of at most ``batch_size`` items along the first dimension."""
    for start in range(0, batch.shape[0], batch_size):
        yield batch[start : start + batch_size]


class DenseEncoder(nn.Module):
    """A frozen ViT that turns windows into L2-normalised patch features.

    Subclasses set ``patch_size`` and implement ``_features`` and ``_dtype``; this class
    holds the pixel normalisation, the batching and the padding they share.

    Attributes:
        weights_info: where the weights came from, for provenance records:
            ``{"source": "file", "path", "sha256"}``, ``{"source": "hub", "repo",
            "revision", "file", "path", "sha256"}``, ``{"source": "random"}`` (set by
            ``load_clip`` / ``load_dino``), or ``{"source": "unknown"}`` for a model
            wrapped directly.
    """

    patch_size: int

    def __init__(self) -> None:
        super().__init__()
        self.weights_info: dict = {"source": "unknown"}

    @property
    def precision(self) -> str:
        """The precision the model computes in: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
        dtype = self._dtype()
        return next((name for name, d in PRECISIONS.items() if d == dtype), str(dtype))

    def _set_normalization(self, mean: Sequence[float], std: Sequence[float],
                           device: torch.device) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device), False)

    def train(self, mode: bool = True) -> DenseEncoder:
        """Encoders stay in eval mode (frozen); this keeps the wrapped model in eval."""
        super().train(False)
        return self

    def _dtype(self) -> torch.dtype:
        """The dtype the model computes in."""
        raise NotImplementedError

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels, H and W multiples of P -> ``(B, D, H/P, W/P)``."""
        raise NotImplementedError

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
        check_windows(windows)
        check_batch_size(batch_size)
        device, dtype = self.mean.device, self._dtype()
        out = []
        for chunk in chunks(windows, batch_size):
            x = normalize_and_pad(chunk.to(device), self.mean, self.std, self.patch_size)
            out.append(self._features(x.to(dtype)).float())
        return F.normalize(torch.cat(out), dim=1)
