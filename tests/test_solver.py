"""Tests for lposs.propagation.solver against a textbook conjugate gradient written here."""

from __future__ import annotations

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


def test_conjugate_gradient_callable_1d_and_early_stop():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: matrix @ v, b, tol=1e-12, max_iter=50)
    assert x.shape == (3,)
    np.testing.assert_allclose(x.numpy(), [1.0, 0.5, 0.25], atol=1e-12)
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
