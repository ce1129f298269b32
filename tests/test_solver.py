"""Tests for lposs.propagation.solver against a textbook conjugate gradient written here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from reference_propagation import reference_solve_columns

from lposs.propagation.solver import conjugate_gradient


def test_conjugate_gradient_matches_per_column_cg_and_reports():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((40, 40))
    matrix = q @ q.T / 40 + np.eye(40)
    b = rng.standard_normal((40, 5))
    b[:, 2] = 0  # an absent class: no division by zero, zero solution
    b[:, 4] = matrix[:, 0]  # converges in far fewer than 10 iterations? no: generic column
    x, info = conjugate_gradient(torch.tensor(matrix), torch.tensor(b), tol=1e-6, max_iter=10)
    np.testing.assert_allclose(x.numpy(), reference_solve_columns(matrix, b), atol=1e-10)
    assert np.all(x.numpy()[:, 2] == 0)
    assert info.converged[2] and info.iterations[2] == 0 and info.residual[2] == 0
    assert not info.converged[0] and info.iterations[0] == 10  # truncated: reported, not hidden

    x, info = conjugate_gradient(torch.tensor(matrix), torch.tensor(b), tol=1e-10,
                                 max_iter=200)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(matrix, b), atol=1e-8)
    assert bool(info.converged.all()) and float(info.residual.max()) <= 1e-10


def test_conjugate_gradient_callable_and_early_stop():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: matrix @ v, b, tol=1e-12, max_iter=50)
    assert x.shape == (3, 1)
    np.testing.assert_allclose(x[:, 0].numpy(), [1.0, 0.5, 0.25], atol=1e-12)
    assert info.iterations.tolist() == [3]  # 3 distinct eigenvalues: exact in 3 steps


def test_conjugate_gradient_column_that_converges_stops_changing():
    matrix = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    b = torch.zeros(20, 2, dtype=torch.float64)
    b[0, 0] = 1.0  # an eigenvector: solved in one step
    b[:, 1] = 1.0
    x, info = conjugate_gradient(matrix, b, tol=1e-9, max_iter=10)
    assert info.iterations.tolist() == [1, 10]
    assert x[0, 0].item() == 1.0 and torch.all(x[1:, 0] == 0)


def test_cg_info_summary_is_the_worst_column():
    matrix = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    b = torch.zeros(20, 3, dtype=torch.float64)
    b[0, 0] = 1.0  # solved in one step
    b[:, 1] = 1.0  # truncated at 4
    _, info = conjugate_gradient(matrix, b, tol=1e-9, max_iter=4)
    true_residual = (b - matrix @ conjugate_gradient(matrix, b, tol=1e-9, max_iter=4)[0]).norm(
        dim=0)[1] / b[:, 1].norm()
    summary = info.summary()
    assert summary["iterations"] == 4 and isinstance(summary["iterations"], int)
    assert summary["max_relative_residual"] == pytest.approx(float(true_residual), rel=1e-6)


def test_huge_and_tiny_columns_are_solved_without_overflow():
    # float32 dot products of 1e20-sized residuals overflow; each column is solved scaled.
    rng = np.random.default_rng(4)
    q = rng.standard_normal((30, 30))
    matrix = q @ q.T / 30 + np.eye(30)
    b = rng.standard_normal((30, 3))
    sizes = np.array([1e20, 1.0, 1e-30])
    x, info = conjugate_gradient(torch.tensor(matrix, dtype=torch.float32),
                                 torch.tensor(b * sizes, dtype=torch.float32), max_iter=10)
    expected = reference_solve_columns(matrix, b) * sizes
    np.testing.assert_allclose(x.double().numpy() / sizes, expected / sizes, rtol=0,
                               atol=1e-4 * np.abs(expected / sizes).max())
    assert bool(torch.isfinite(info.residual).all()) and float(info.residual.max()) < 1
    # A power-of-two scale is exact: the scaled solve is the unscaled one, bit for bit.
    b32 = torch.tensor(b, dtype=torch.float32)
    unit = conjugate_gradient(torch.tensor(matrix, dtype=torch.float32), b32)[0]
    assert torch.equal(conjugate_gradient(torch.tensor(matrix, dtype=torch.float32),
                                          b32 * 2.0**70)[0], unit * 2.0**70)


def test_divergence_is_warned_and_truncation_is_not():
    # CG minimises the A^-1-norm of the residual, not its 2-norm: after one step on
    # diag(1, 100) from b = (10, 1) the residual is (4.95, -49.5), 4.9 times ||b||.
    matrix = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
    b = torch.tensor([[10.0], [1.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="diverged"):
        _, info = conjugate_gradient(matrix, b, max_iter=1)
    assert not bool(info.converged[0])
    assert float(info.residual[0]) == pytest.approx(np.hypot(4.95, 49.5) / np.hypot(10, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, info = conjugate_gradient(matrix, b, max_iter=2)  # two eigenvalues: exact
        np.testing.assert_allclose(x[:, 0].numpy(), [10.0, 0.01])
        wide = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
        _, info = conjugate_gradient(wide, torch.ones(20, 1, dtype=torch.float64),
                                     max_iter=3)
        assert not bool(info.converged.any())  # truncated, reported, not warned


def test_conjugate_gradient_checks_shapes():
    with pytest.raises(ValueError, match="operator"):
        conjugate_gradient(torch.eye(3), torch.ones(4, 1))
    with pytest.raises(ValueError, match="b must be"):
        conjugate_gradient(torch.eye(3), torch.ones(3, 2, 1))
