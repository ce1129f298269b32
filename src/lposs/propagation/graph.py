"""What every propagation graph shares: the shape check of its public inputs, the compute
dtype and the degree normalisation ``D^-1/2``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_shape", "compute_dtype", "inverse_sqrt_degree"]


def check_shape(tensor: Tensor, name: str, shape: tuple[int | None, ...]) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a floating-point tensor of ``shape``, where
    ``None`` stands for any size; no size may be 0."""
    if not (isinstance(tensor, Tensor) and tensor.is_floating_point()
            and tensor.dim() == len(shape) and tensor.numel() > 0
            and all(want in (None, size) for size, want in zip(tensor.shape, shape))):
        want = ", ".join("*" if size is None else str(size) for size in shape)
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape ({want}), got {got}")


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def inverse_sqrt_degree(degree: Tensor) -> Tensor:
    """``(N,)`` ``d ** -1/2`` of ``(N,)`` degrees, 1 for a zero degree: an isolated node keeps a
    zero row in ``S``, so the propagation leaves its score as it is (``F = Y`` there)."""
    return torch.where(degree > 0, degree, 1).rsqrt()
