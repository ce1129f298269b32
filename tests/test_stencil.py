"""Tests for lposs.propagation.stencil: both backends against a dense product written here."""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from lposs.propagation import stencil
from lposs.propagation.stencil import stencil_backend, stencil_product

BACKENDS = ["torch", "numba"] + (
    ["cuda"] if torch.cuda.is_available() else [])


def random_stencil(height, width, r, classes, dtype, seed):
    """Random weights and maps in the flat padded layout, zero at padding pixels."""
    g = torch.Generator().manual_seed(seed)
    pad = r // 2
    padded_width = width + 2 * pad
    inside = torch.zeros(height + 2 * pad, padded_width, dtype=torch.bool)
    inside[pad:pad + height, pad:pad + width] = True
    inside = inside.flatten()
    offsets = [(dy, dx) for dy in range(pad + 1) for dx in range(-pad, pad + 1)
               if dy > 0 or dx > 0]
    shifts = [dy * padded_width + dx for dy, dx in offsets]
    n = inside.numel()
    weights = torch.rand(len(shifts), n, generator=g, dtype=dtype)
    for o, s in enumerate(shifts):  # an edge needs both of its pixels inside the image
        partner = torch.zeros(n, dtype=torch.bool)
        partner[:n - s] = inside[s:]
        weights[o] *= inside & partner
    columns = torch.randn(classes, n, generator=g, dtype=dtype) * inside
    start = pad * padded_width + pad
    stop = start + (height - 1) * padded_width + width
    return columns, weights, shifts, start, stop


def dense_reference(columns, weights, shifts, start, stop):
    """``x - M x`` with the symmetric matrix M written out entry by entry."""
    n = columns.shape[1]
    matrix = np.zeros((n, n))
    w = weights.double().numpy()
    for o, s in enumerate(shifts):
        for i in range(start, stop):
            matrix[i, i + s] += w[o, i]
            matrix[i + s, i] += w[o, i]
    x = columns.double().numpy()
    return x - x @ matrix.T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height,width,r,classes,dtype", [
    (7, 9, 5, 3, torch.float32), (5, 4, 3, 1, torch.float64), (1, 6, 5, 2, torch.float32),
    (6, 1, 7, 4, torch.float64), (3, 3, 13, 5, torch.float32)])
def test_stencil_product_equals_dense_matrix(monkeypatch, backend, height, width, r, classes,
                                             dtype):
    # Tiles of a few pixels, so the kernel walks many tiles and splits them over threads.
    monkeypatch.setattr(stencil, "_KERNEL_TILE_ELEMENTS", 4 * classes)
    monkeypatch.setattr(stencil, "_TORCH_BAND_ELEMENTS", 5 * classes)
    columns, weights, shifts, start, stop = random_stencil(height, width, r, classes, dtype,
                                                           seed=height * 10 + width)
    device = "cuda" if backend == "cuda" else "cpu"
    out = stencil_product(columns.to(device), weights.to(device), shifts, start, stop,
                          backend="torch" if backend == "cuda" else backend)
    assert out.shape == columns.shape and out.dtype == dtype and out.device.type == device
    expected = dense_reference(columns, weights, shifts, start, stop)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.cpu().double().numpy(), expected, atol=tolerance)


def test_stencil_product_threads_do_not_change_the_result():
    columns, weights, shifts, start, stop = random_stencil(40, 50, 13, 6, torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stencil_product(columns, weights, shifts, start, stop, backend="numba")
        torch.set_num_threads(3)
        three = stencil_product(columns, weights, shifts, start, stop, backend="numba")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    torch_result = stencil_product(columns, weights, shifts, start, stop, backend="torch")
    torch.testing.assert_close(one, torch_result, atol=1e-5, rtol=0)


def test_stencil_backend_choice_and_bad_backend():
    assert stencil_backend(torch.device("cpu")) == "numba"  # numba is a dependency
    assert stencil_backend(torch.device("meta")) == "torch"
    columns, weights, shifts, start, stop = random_stencil(3, 3, 3, 1, torch.float32, seed=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        stencil_product(columns, weights, shifts, start, stop, backend="fortran")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_numba_backend_works_in_a_forked_child(monkeypatch):
    monkeypatch.setattr(stencil, "_KERNEL_TILE_ELEMENTS", 64)  # many tiles: the thread pool
    columns, weights, shifts, start, stop = random_stencil(30, 40, 7, 3, torch.float32, seed=3)
    expected = stencil_product(columns, weights, shifts, start, stop, backend="numba")
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:  # the parent's thread pool does not exist in the child
        result = pool.apply_async(_product_in_child, (columns, weights, shifts, start, stop))
        assert torch.equal(result.get(timeout=60), expected)


def _product_in_child(columns, weights, shifts, start, stop):
    torch.set_num_threads(2)
    return stencil_product(columns, weights, shifts, start, stop, backend="numba")


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_stencil_product_writes_into_a_given_buffer(backend):
    columns, weights, shifts, start, stop = random_stencil(8, 9, 5, 3, torch.float64, seed=4)
    expected = dense_reference(columns, weights, shifts, start, stop)
    buffer = torch.full_like(columns, float("nan"))  # stale contents must not leak through
    out = stencil_product(columns, weights, shifts, start, stop, backend=backend, out=buffer)
    assert out.data_ptr() == buffer.data_ptr()
    np.testing.assert_allclose(buffer.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("failure", ["missing", "broken"])
def test_without_a_working_numba_cpu_falls_back_to_torch(monkeypatch, failure):
    from lposs.propagation.pixel_graph import pixel_propagation

    image = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(5))
    scores = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(6))
    with_numba = pixel_propagation(image, scores, r=5, tau=0.1)
    if failure == "missing":
        # import -> ImportError
        monkeypatch.setitem(sys.modules, "lposs.propagation._stencil_kernel", None)
    else:
        class Broken:
            def __getattr__(self, name):
                raise OSError("libllvmlite.so: cannot open shared object file")
        monkeypatch.setitem(sys.modules, "lposs.propagation._stencil_kernel", Broken())
    stencil._kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert stencil_backend(torch.device("cpu")) == "torch"
            without = pixel_propagation(image, scores, r=5, tau=0.1)
        assert (failure == "broken") == any("numba does not load" in str(w.message)
                                            for w in caught)
    finally:
        stencil._kernel.cache_clear()
    torch.testing.assert_close(without, with_numba, atol=1e-6, rtol=0)
