"""The product of the LPOSS+ pixel graph with class maps: a stencil on a flat padded image.

Over an image padded by ``r // 2`` on every side and laid out flat, the neighbour at offset
``(dy, dx)`` is a fixed shift ``s = dy * Wp + dx``; with one weight map per half offset
(``w[o, i]`` joins pixels ``i`` and ``i + s_o``), for every pixel ``i`` in ``[start, stop)``

    out[c, i] = x[c, i] - sum_o (w[o, i] * x[c, i + s_o] + w[o, i - s_o] * x[c, i - s_o])

which is ``(I - S) x``. Two implementations: a compiled CPU kernel (numba) over cache-sized
tiles split over threads, and torch shifted-slice multiply-adds for every other device (or
CPU without numba).
"""

from __future__ import annotations

import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = ["BACKENDS", "stencil_backend", "stencil_product"]

BACKENDS = ("auto", "numba", "torch")

_TORCH_BAND_ELEMENTS = 1 << 20  # (classes x pixels) per band of the torch stencil on CPU
_KERNEL_TILE_ELEMENTS = 1 << 17  # (classes x pixels) per tile of the compiled kernel


def stencil_product(columns: Tensor, weights: Tensor, shifts: list[int], start: int, stop: int,
                    *, backend: str = "auto", out: Tensor | None = None) -> Tensor:
    """``(I - S) x`` for the stencil graph ``S`` of the module docstring.

    Args:
        columns: ``(C, Np)`` class maps, flat and padded, zero outside the image.
        weights: ``(O, Np)`` one weight map per half offset, same dtype and device.
        shifts: the ``O`` flat shifts, each > 0, within ``[0, Np)`` from ``start``/``stop``.
        start, stop: the range of flat positions that holds image pixels.
        backend: ``"numba"`` (CPU), ``"torch"`` or ``"auto"`` (numba on CPU when installed).
        out: a contiguous ``(C, Np)`` tensor like ``columns`` (not overlapping it) for the
            result; a new one when None.

    Returns:
        ``(C, Np)``: ``x - S x`` on ``[start, stop)``, ``x`` elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = stencil_backend(columns.device)
    if out is None:
        out = torch.empty_like(columns, memory_format=torch.contiguous_format)
    product = _numba_product if backend == "numba" else _torch_product
    return product(columns, weights, shifts, start, stop, out)


def stencil_backend(device: torch.device) -> str:
    """The backend ``"auto"`` picks on ``device``."""
    return "numba" if device.type == "cpu" and _kernel() is not None else "torch"


def _torch_product(columns: Tensor, weights: Tensor, shifts: list[int], start: int,
                   stop: int, out: Tensor) -> Tensor:
    """Shifted-slice ``addcmul_`` over all classes at once; CPU works in cache-sized bands."""
    out.zero_()
    band = stop - start
    if columns.device.type == "cpu":
        band = max(1, _TORCH_BAND_ELEMENTS // columns.shape[0])
    for a in range(start, stop, band):
        b = min(a + band, stop)
        acc = out[:, a:b]
        for o, s in enumerate(shifts):
            acc.addcmul_(weights[o, a:b], columns[:, a + s:b + s])
            acc.addcmul_(weights[o, a - s:b - s], columns[:, a - s:b - s])
    return torch.sub(columns, out, out=out)


def _numba_product(columns: Tensor, weights: Tensor, shifts: list[int], start: int,
                   stop: int, out: Tensor) -> Tensor:
    """The compiled kernel over contiguous pixel ranges, one per thread (it releases the GIL)."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the numba stencil backend needs numba (pip install numba)")
    x = columns.contiguous().numpy()
    w = weights.to(columns.dtype).contiguous().numpy()
    out[:, :start] = columns[:, :start]
    out[:, stop:] = columns[:, stop:]
    y = out.numpy()
    offsets = torch.tensor(shifts, dtype=torch.int64).numpy()
    tile = max(1, _KERNEL_TILE_ELEMENTS // columns.shape[0])
    threads = max(1, torch.get_num_threads())
    tiles = -(-(stop - start) // tile)
    per_thread = -(-tiles // threads) * tile
    ranges = [(a, min(a + per_thread, stop)) for a in range(start, stop, per_thread)]
    if len(ranges) == 1:
        kernel(x, w, offsets, start, stop, y, tile)
    else:
        pool = _pool(threads, os.getpid())
        jobs = [pool.submit(kernel, x, w, offsets, a, b, y, tile) for a, b in ranges]
        for job in jobs:
            job.result()
    return out


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process (a forked child cannot use its parent's)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lposs-stencil")


@functools.cache
def _kernel():
    """The compiled kernel, or None when numba is not installed or does not load (imported
    on first use; a broken install warns once and the torch stencil takes over)."""
    try:
        from lposs.propagation._stencil_kernel import stencil_tiles
    except ImportError:
        return None
    except Exception as err:  # e.g. llvmlite present but its library does not load
        warnings.warn(f"lposs: numba does not load ({err}); the pixel stage uses the slower "
                      f"torch stencil", RuntimeWarning, stacklevel=2)
        return None
    return stencil_tiles
