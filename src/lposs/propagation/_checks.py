"""Argument checks shared by the public entries of the two propagation stages.

Each public function or method checks its arguments once with these; the private steps
after it trust their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(name: str, value: object, dim: int) -> None:
    """A non-empty, finite, floating-point tensor with ``dim`` dimensions."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    if not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all()):  # one pass; NaN spreads
        raise ValueError(f"{name} contains NaN or infinite values")


def check_same_device(reference: Tensor, **others: Tensor) -> None:
    """Every tensor in ``others`` on the device of ``reference``."""
    for name, value in others.items():
        if value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but the other inputs are on "
                             f"{reference.device}")


def check_alpha(alpha: float) -> None:
    """The propagation strength, in (0, 1)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def check_solver_args(tol: float, max_iter: int) -> None:
    """The conjugate-gradient tolerance (> 0) and iteration count (an int >= 1)."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def compute_dtype(value: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32
