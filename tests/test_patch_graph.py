"""Tests for lposs.propagation.patch_graph against independent numpy computations."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from reference_propagation import (
    DEVICES,
    as_numpy,
    random_patch_problem,
    reference_adjacency,
    reference_knn_weights,
    reference_solve_columns,
)

from lposs.propagation.patch_graph import (
    knn_affinity,
    normalized_adjacency,
    patch_graph,
    patch_propagation,
)

# the module (``lposs.propagation.patch_graph`` as an attribute is the function)
patch_graph_module = importlib.import_module("lposs.propagation.patch_graph")
# The paper's settings never diverge: a divergence warning fails these tests.
pytestmark = pytest.mark.filterwarnings("error:lposs. conjugate gradient diverged")


@pytest.mark.parametrize("k,gamma,sigma,power", [(12, 3.0, 0.01, 1.0), (40, 7.0, 0.002, 2.0)])
def test_knn_affinity_matches_explicit_loop(k, gamma, sigma, power):
    features, positions, _ = random_patch_problem()
    w = knn_affinity(features, positions, k=k, gamma=gamma, sigma=sigma, distance_power=power)
    assert w.layout == torch.sparse_csr
    expected = reference_knn_weights(as_numpy(features), as_numpy(positions), k, gamma, sigma,
                                     power)
    np.testing.assert_allclose(as_numpy(w.to_dense()), expected, atol=1e-5)


@pytest.mark.parametrize("cache", [True, False])
def test_knn_affinity_in_blocks_equals_explicit_loop(monkeypatch, cache):
    features, positions, _ = random_patch_problem(n=97)
    expected = reference_knn_weights(as_numpy(features), as_numpy(positions), 9)
    monkeypatch.setattr(patch_graph_module, "_GRAM_MIN_BLOCK", 10)
    monkeypatch.setattr(patch_graph_module, "_GRAM_BLOCK_ELEMENTS", 97 * 10)  # 10 rows at a time
    if not cache:
        monkeypatch.setattr(patch_graph_module, "_GRAM_CACHE_ELEMENTS", 0)  # never N x N at once
    w = knn_affinity(features, positions, k=9)
    np.testing.assert_allclose(as_numpy(w.to_dense()), expected, atol=1e-5)


def test_knn_affinity_clamps_negative_similarity_and_keeps_self_out():
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.9, 0.2]])
    positions = torch.zeros(3, 2)
    w = knn_affinity(features, positions, k=3, gamma=1.0, sigma=0.0).to_dense()
    assert torch.all(w.diagonal() == 0)
    assert w[0, 1] == 0 and w[1, 2] == 0  # opposite directions: clamped to 0
    cos = torch.nn.functional.cosine_similarity(features[0], features[2], dim=0)
    assert w[0, 2] == pytest.approx(2 * cos.item(), rel=1e-6)  # each in the other's list


def test_normalized_adjacency_and_laplacian():
    rng = np.random.default_rng(1)
    w = rng.random((8, 8)) * (rng.random((8, 8)) < 0.5)
    w = w + w.T
    np.fill_diagonal(w, 0)
    w[3, :] = w[:, 3] = 0  # an isolated node: degree 0 -> 1
    dense = torch.tensor(w)
    s = normalized_adjacency(dense.to_sparse_csr())
    assert s.layout == torch.sparse_csr
    s = as_numpy(s.to_dense())
    np.testing.assert_allclose(s, reference_adjacency(w), atol=1e-12)
    laplacian = np.eye(8) - 0.95 * s
    np.testing.assert_allclose(laplacian, laplacian.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(laplacian), 1.0)
    assert np.all(s[3] == 0) and np.all(np.linalg.eigvalsh(laplacian) > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_propagation_equals_per_column_cg(device, dtype):
    features, positions, scores = random_patch_problem(n=180, c=5, dtype=dtype)
    scores[:, 3] = 0
    out = patch_propagation(features.to(device), positions.to(device), scores.to(device),
                            k=25)
    assert out.device.type == device and out.dtype == dtype and out.shape == scores.shape
    w = reference_knn_weights(as_numpy(features), as_numpy(positions), 25)
    laplacian = np.eye(180) - 0.95 * reference_adjacency(w)
    expected = reference_solve_columns(laplacian, as_numpy(scores))
    assert np.abs(as_numpy(out) - expected).max() <= 1e-4 * np.abs(as_numpy(scores)).max()
    assert torch.all(out[:, 3] == 0)


def test_patch_propagation_converged_equals_direct_solve():
    features, positions, scores = random_patch_problem(n=90, c=3, dtype=torch.float64)
    out = patch_propagation(features, positions, scores, k=15, gamma=2.0, alpha=0.9,
                            tol=1e-12, max_iter=500)
    w = reference_knn_weights(as_numpy(features), as_numpy(positions), 15, gamma=2.0)
    laplacian = np.eye(90) - 0.9 * reference_adjacency(w)
    np.testing.assert_allclose(out.numpy(), np.linalg.solve(laplacian, scores.numpy()),
                               atol=1e-9)


def test_patch_propagation_small_graphs_stay_finite():
    features, positions, scores = random_patch_problem(n=7, c=1)
    out = patch_propagation(features, positions, scores)  # k = 400 > N = 7
    w = reference_knn_weights(as_numpy(features), as_numpy(positions), 7)
    expected = reference_solve_columns(np.eye(7) - 0.95 * reference_adjacency(w),
                                       as_numpy(scores))
    np.testing.assert_allclose(as_numpy(out), expected, atol=1e-5)
    one = patch_propagation(features[:1], positions[:1], scores[:1])
    torch.testing.assert_close(one, scores[:1])  # no edges: L = I
    zero = patch_propagation(features, positions, torch.zeros(7, 3))
    assert torch.all(zero == 0)


def test_patch_propagation_fixes_flipped_labels():
    g = torch.Generator().manual_seed(3)
    n_classes, per_class = 4, 60
    centres = torch.randn(n_classes, 32, generator=g) * 3
    truth = torch.arange(n_classes).repeat_interleave(per_class)
    features = centres[truth] + torch.randn(len(truth), 32, generator=g)
    positions = torch.rand(len(truth), 2, generator=g) * 50
    noisy = truth.clone()
    flipped = torch.rand(len(truth), generator=g) < 0.2
    noisy[flipped] = (truth[flipped] + 1) % n_classes
    scores = torch.nn.functional.one_hot(noisy, n_classes).float()
    out = patch_propagation(features, positions, scores, k=20)
    fixed = (out.argmax(1) == truth)[flipped].float().mean()
    assert fixed > 0.9
    assert (out.argmax(1) == truth).float().mean() > 0.97


def test_one_patch_graph_answers_several_score_sets():
    features, positions, scores = random_patch_problem(n=60, c=3, seed=9, dtype=torch.float64)
    other = torch.randn(60, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    graph = patch_graph(features, positions, k=12, alpha=0.9)
    assert graph.num_nodes == 60
    w = reference_knn_weights(features.numpy(), positions.numpy(), 12)
    laplacian = np.eye(60) - 0.9 * reference_adjacency(w)
    for y in (scores, other, scores):  # no state is carried from one answer to the next
        expected = reference_solve_columns(laplacian, y.numpy())
        np.testing.assert_allclose(graph.propagate(y).numpy(), expected, atol=1e-9)
    with pytest.raises(ValueError, match="scores"):
        graph.propagate(scores[:59])


def test_patch_graph_reports_convergence():
    features, positions, scores = random_patch_problem(n=60, c=3, seed=9, dtype=torch.float64)
    graph = patch_graph(features, positions, k=12, alpha=0.9)
    out, info = graph.propagate(scores, max_iter=5, return_info=True)
    torch.testing.assert_close(out, graph.propagate(scores, max_iter=5))
    laplacian = np.eye(60) - 0.9 * reference_adjacency(
        reference_knn_weights(features.numpy(), positions.numpy(), 12))
    residual = np.linalg.norm(scores.numpy() - laplacian @ out.numpy(), axis=0)
    np.testing.assert_allclose(info.residual.numpy(),
                               residual / np.linalg.norm(scores.numpy(), axis=0), rtol=1e-6)
    assert info.iterations.tolist() == [5, 5, 5] and not bool(info.converged.any())


def test_huge_scores_do_not_overflow():
    # A class masked with -1e20 (float32 dot products of such residuals overflow).
    features, positions, scores = random_patch_problem(n=80, c=3, seed=2)
    masked = scores.clone()
    masked[:, 1] = -1e20
    out = patch_propagation(features, positions, masked, k=12)
    unit = scores.clone()
    unit[:, 1] = -1.0
    expected = patch_propagation(features, positions, unit, k=12)
    torch.testing.assert_close(out[:, 1] / 1e20, expected[:, 1], rtol=1e-5, atol=0)
    assert torch.equal(out[:, [0, 2]], expected[:, [0, 2]])  # columns are independent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflowing_affinity_keeps_isolated_scores(dtype):
    # sigma = 1e308: only patches at one centre (overlapping windows) stay joined, with
    # exp(-sigma * 0) = 1; every other patch is isolated and keeps its score.
    features, positions, scores = random_patch_problem(n=40, c=3, seed=5, dtype=dtype)
    positions[20:30] = positions[:10]
    with np.errstate(over="ignore"):
        w = reference_knn_weights(as_numpy(features), as_numpy(positions), 8, sigma=1e308)
    got = knn_affinity(features, positions, k=8, sigma=1e308).to_dense()
    np.testing.assert_allclose(as_numpy(got), w, atol=1e-6)
    out = patch_propagation(features, positions, scores, k=8, sigma=1e308, tol=1e-12,
                            max_iter=100)
    expected = np.linalg.solve(np.eye(40) - 0.95 * reference_adjacency(w), as_numpy(scores))
    np.testing.assert_allclose(as_numpy(out), expected, atol=1e-4)
    assert np.all(w[30:] == 0)
    torch.testing.assert_close(out[30:], scores[30:], rtol=1e-6, atol=1e-6)  # F = Y
    alone = patch_propagation(features[30:], positions[30:], scores[30:], sigma=1e308)
    assert torch.equal(alone, scores[30:])  # no edge at all: L = I, exact in one step


# --------------------------------------------------------------------------- bad input


def _patch_inputs():
    return random_patch_problem(n=10, c=2)


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda f, p, s: (f, p[:5], s), "positions"),
        (lambda f, p, s: (f, p, s[:5]), "scores"),
        (lambda f, p, s: (f[:, None], p, s), "features"),
        (lambda f, p, s: (f[:0], p[:0], s[:0]), "features"),
        (lambda f, p, s: (f, p, s[:, :0]), "scores"),
    ],
)
def test_patch_propagation_rejects_bad_shapes(change, name):
    with pytest.raises(ValueError, match=name):
        patch_propagation(*change(*_patch_inputs()))


# --------------------------------------------------------------------------- ablations


def test_sigma_zero_makes_the_spatial_kernel_all_ones():
    features, positions, _ = random_patch_problem(n=40, c=1, dtype=torch.float64)
    w = knn_affinity(features, positions, k=8, sigma=0.0).to_dense()
    moved = knn_affinity(features, torch.rand(40, 2, dtype=torch.float64) * 1e4, k=8, sigma=0.0)
    assert torch.equal(w, moved.to_dense())  # positions no longer matter
    # the appearance term alone: sigma > 0 with every patch at one position gives S_p = 1 too
    expected = reference_knn_weights(as_numpy(features), np.zeros((40, 2)), 8, sigma=5.0)
    np.testing.assert_allclose(as_numpy(w), expected, atol=1e-12)


def test_one_graph_per_window_equals_separate_propagations():
    features, positions, scores = random_patch_problem(n=3 * 25, c=3, dtype=torch.float64)
    graph = patch_graph(features, positions, k=400, gamma=2.0, nodes_per_window=25)
    out, info = graph.propagate(scores, return_info=True)
    expected, iterations = [], []
    for w in range(3):
        rows = slice(25 * w, 25 * w + 25)
        weights = reference_knn_weights(as_numpy(features[rows]), as_numpy(positions[rows]),
                                        24, gamma=2.0)  # k capped at 25 - 1
        laplacian = np.eye(25) - 0.95 * reference_adjacency(weights)
        expected.append(reference_solve_columns(laplacian, as_numpy(scores[rows])))
        iterations.append(patch_graph(features[rows], positions[rows], k=24, gamma=2.0)
                          .propagate(scores[rows], return_info=True)[1].iterations)
    np.testing.assert_allclose(as_numpy(out), np.concatenate(expected), atol=1e-10)
    assert torch.equal(info.iterations, torch.stack(iterations).amax(0))
    joint = patch_graph(features, positions, k=400, gamma=2.0).propagate(scores)
    assert not torch.allclose(joint, out)  # windows coupled: another result
    with pytest.raises(ValueError, match="windows of 20"):
        patch_graph(features, positions, nodes_per_window=20)
