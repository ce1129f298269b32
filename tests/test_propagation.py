"""Tests for lposs.propagation against independent numpy computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lposs import propagation
from lposs.propagation import (
    conjugate_gradient,
    knn_affinity,
    normalized_adjacency,
    patch_graph,
    patch_propagation,
    pixel_affinity,
    pixel_graph,
    pixel_propagation,
    rgb_to_lab,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]


# --------------------------------------------------------------------------- references


def reference_knn_weights(features, positions, k, gamma=3.0, sigma=0.01, power=1.0):
    """W = A + A^T with a zero diagonal, A from an explicit loop over each node's list."""
    z = features / np.linalg.norm(features, axis=1, keepdims=True)
    n = len(z)
    k = min(k, n)
    a = np.zeros((n, n))
    for i in range(n):
        sims = z @ z[i]
        sims[i] = np.inf  # the node itself ranks first in its own list
        for j in np.argsort(-sims, kind="stable")[:k]:
            if j != i:
                distance = np.linalg.norm(positions[i] - positions[j])
                a[i, j] = max(z[i] @ z[j], 0.0) ** gamma * np.exp(-sigma * distance**power)
    w = a + a.T
    np.fill_diagonal(w, 0.0)
    return w


def reference_adjacency(w):
    degree = w.sum(1)
    degree[degree == 0] = 1.0
    return w / np.sqrt(np.outer(degree, degree))


def reference_cg(matrix, b, tol=1e-6, max_iter=10):
    """The textbook conjugate gradient for one right-hand side, from x = 0."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = r @ r
    bound = tol * np.sqrt(b @ b)
    for _ in range(max_iter):
        if np.sqrt(rs) <= bound:
            break
        ap = matrix @ p
        step = rs / (p @ ap)
        x += step * p
        r -= step * ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def reference_solve_columns(matrix, y, **kwargs):
    return np.stack([reference_cg(matrix, y[:, c], **kwargs) for c in range(y.shape[1])], 1)


def reference_lab(rgb):
    """sRGB (3, H, W) in [0, 1] to CIE Lab (D65), straight from the textbook formulas."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423],
                  [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])
    xyz = np.tensordot(m, linear, axes=1) / np.array([0.95047, 1.0, 1.08883])[:, None, None]
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def reference_pixel_weights(rgb, r, tau):
    """Dense (HW, HW) W from a loop over every pixel's r x r neighbours."""
    lab = reference_lab(rgb) / np.array([100.0, 128.0, 128.0])[:, None, None]
    _, h, w = rgb.shape
    half = r // 2
    weights = np.zeros((h * w, h * w))
    for y in range(h):
        for x in range(w):
            for dy in range(-half, half + 1):
                for dx in range(-half, half + 1):
                    yy, xx = y + dy, x + dx
                    if (dy, dx) != (0, 0) and 0 <= yy < h and 0 <= xx < w:
                        distance = np.linalg.norm(lab[:, y, x] - lab[:, yy, xx])
                        weights[y * w + x, yy * w + xx] = np.exp(-distance / tau)
    return weights


def as_numpy(t):
    return t.detach().cpu().double().numpy()


def random_patch_problem(n=150, d=16, c=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=dtype)
    positions = torch.rand(n, 2, generator=g, dtype=dtype) * 300
    scores = torch.randn(n, c, generator=g, dtype=dtype)
    return features, positions, scores


# --------------------------------------------------------------------------- building blocks


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
    monkeypatch.setattr(propagation, "_GRAM_MIN_BLOCK", 10)
    monkeypatch.setattr(propagation, "_GRAM_BLOCK_ELEMENTS", 97 * 10)  # 10 rows at a time
    if not cache:
        monkeypatch.setattr(propagation, "_GRAM_CACHE_ELEMENTS", 0)  # never N x N at once
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


@pytest.mark.parametrize("layout", ["dense", "coo", "csr"])
def test_normalized_adjacency_and_laplacian(layout):
    rng = np.random.default_rng(1)
    w = rng.random((8, 8)) * (rng.random((8, 8)) < 0.5)
    w = w + w.T
    np.fill_diagonal(w, 0)
    w[3, :] = w[:, 3] = 0  # an isolated node: degree 0 -> 1
    dense = torch.tensor(w)
    matrix = {"dense": dense, "coo": dense.to_sparse(), "csr": dense.to_sparse_csr()}[layout]
    s = normalized_adjacency(matrix)
    assert s.layout == matrix.layout
    s = as_numpy(s.to_dense())
    np.testing.assert_allclose(s, reference_adjacency(w), atol=1e-12)
    laplacian = np.eye(8) - 0.95 * s
    np.testing.assert_allclose(laplacian, laplacian.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(laplacian), 1.0)
    assert np.all(s[3] == 0) and np.all(np.linalg.eigvalsh(laplacian) > 0)


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


# --------------------------------------------------------------------------- patch stage


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


# --------------------------------------------------------------------------- pixel stage


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]],
                       dtype=torch.float64).T[:, None, :]
    expected = [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                [32.30, 79.19, -107.86], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(rgb_to_lab(rgb)[:, 0].T.numpy(), expected, atol=0.02)
    image = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(rgb_to_lab(image)[1].numpy(), reference_lab(image[1].numpy()),
                               atol=1e-9)


def test_pixel_affinity_matches_explicit_loop():
    image = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(4))
    weights, offsets = pixel_affinity(image, r=5, tau=0.1)
    assert weights.shape == (12, 6, 8) and offsets.shape == (12, 2)
    dense = reference_pixel_weights(image.double().numpy(), 5, 0.1)
    rebuilt = np.zeros_like(dense)
    for (dy, dx), maps in zip(offsets.tolist(), as_numpy(weights), strict=True):
        for y in range(6):
            for x in range(8):
                if 0 <= y + dy < 6 and 0 <= x + dx < 8:
                    rebuilt[y * 8 + x, (y + dy) * 8 + x + dx] = maps[y, x]
                else:
                    assert maps[y, x] == 0
    np.testing.assert_allclose(rebuilt + rebuilt.T, dense, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "height,width,r,tau,dtype",
    [(9, 11, 5, 0.1, torch.float32), (14, 10, 13, 0.01, torch.float32),
     (4, 3, 13, 0.05, torch.float64), (1, 1, 13, 0.01, torch.float32),
     (1, 9, 3, 0.2, torch.float64)],
)
def test_pixel_propagation_equals_per_column_cg(device, height, width, r, tau, dtype):
    g = torch.Generator().manual_seed(height * 100 + width)
    image = torch.rand(3, height, width, generator=g, dtype=dtype)
    scores = torch.randn(4, height, width, generator=g, dtype=dtype)
    scores[2] = 0
    out = pixel_propagation(image.to(device), scores.to(device), r=r, tau=tau)
    assert out.device.type == device and out.dtype == dtype and out.shape == scores.shape
    w = reference_pixel_weights(image.double().numpy(), r, tau)
    laplacian = np.eye(height * width) - 0.95 * reference_adjacency(w)
    y = as_numpy(scores).reshape(4, -1).T
    expected = reference_solve_columns(laplacian, y).T.reshape(4, height, width)
    assert np.abs(as_numpy(out) - expected).max() <= 1e-4 * np.abs(y).max()
    assert torch.all(out[2] == 0)


def test_pixel_propagation_converged_equals_direct_solve():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 8, 9, generator=g, dtype=torch.float64)
    scores = torch.randn(2, 8, 9, generator=g, dtype=torch.float64)
    out = pixel_propagation(image, scores, r=5, tau=0.2, alpha=0.8, tol=1e-12, max_iter=500)
    laplacian = np.eye(72) - 0.8 * reference_adjacency(reference_pixel_weights(
        image.numpy(), 5, 0.2))
    expected = np.linalg.solve(laplacian, scores.numpy().reshape(2, -1).T).T
    np.testing.assert_allclose(out.numpy().reshape(2, -1), expected, atol=1e-9)


def test_pixel_propagation_sharpens_blocky_boundaries():
    g = torch.Generator().manual_seed(6)
    size = 64
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    truth = ((xx - 30) ** 2 + (yy - 34) ** 2 < 18**2).long() + (xx + yy > 100).long()
    colours = torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.3, 0.1], [0.2, 0.8, 0.3]])
    image = (colours[truth].permute(2, 0, 1) + 0.02 * torch.randn(3, size, size,
                                                                   generator=g)).clamp(0, 1)
    one_hot = torch.nn.functional.one_hot(truth, 3).permute(2, 0, 1).float()
    coarse = torch.nn.functional.avg_pool2d(one_hot[None], 16)  # a 4 x 4 grid of patches
    blocky = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                             align_corners=False)[0]
    out = pixel_propagation(image, blocky)
    errors_before = (blocky.argmax(0) != truth).sum()
    errors_after = (out.argmax(0) != truth).sum()
    assert errors_before > 100
    assert errors_after < 0.5 * errors_before


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


def test_one_pixel_graph_answers_several_score_sets():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 12, 15, generator=g, dtype=torch.float64)
    graph = pixel_graph(image, r=5, tau=0.1, alpha=0.9)
    laplacian = np.eye(180) - 0.9 * reference_adjacency(
        reference_pixel_weights(image.numpy(), 5, 0.1))
    for classes in (2, 6, 2):
        y = torch.randn(classes, 12, 15, generator=g, dtype=torch.float64)
        expected = reference_solve_columns(laplacian, y.numpy().reshape(classes, -1).T,
                                           max_iter=7)
        out = graph.propagate(y, max_iter=7).numpy().reshape(classes, -1).T
        np.testing.assert_allclose(out, expected, atol=1e-9)
    with pytest.raises(ValueError, match="scores"):
        graph.propagate(torch.rand(2, 12, 14, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        graph.propagate(torch.rand(2, 12, 15, dtype=torch.float64), max_iter=0)


# --------------------------------------------------------------------------- bad input


def _patch_inputs():
    return random_patch_problem(n=10, c=2)


@pytest.mark.parametrize(
    "change,name",
    [
        (lambda f, p, s: (f, p[:5], s), "positions"),
        (lambda f, p, s: (f, p, s[:5]), "scores"),
        (lambda f, p, s: (f[:, None], p, s), "features"),
        (lambda f, p, s: (f.index_fill(0, torch.tensor([1]), float("nan")), p, s), "features"),
        (lambda f, p, s: (f, p.index_fill(0, torch.tensor([1]), float("inf")), s), "positions"),
        (lambda f, p, s: (f, p, s.index_fill(0, torch.tensor([1]), float("nan"))), "scores"),
        (lambda f, p, s: (f[:0], p[:0], s[:0]), "features"),
        (lambda f, p, s: (f, p, s[:, :0]), "scores"),
    ],
)
def test_patch_propagation_rejects_bad_tensors(change, name):
    with pytest.raises(ValueError, match=name):
        patch_propagation(*change(*_patch_inputs()))


@pytest.mark.parametrize(
    "kwargs,name",
    [({"k": 0}, "k"), ({"alpha": 1.0}, "alpha"), ({"alpha": 0.0}, "alpha"),
     ({"gamma": 0.0}, "gamma"), ({"sigma": -1.0}, "sigma"), ({"tol": 0.0}, "tol"),
     ({"max_iter": 0}, "max_iter"), ({"distance_power": 0.0}, "distance_power")],
)
def test_patch_propagation_rejects_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        patch_propagation(*_patch_inputs(), **kwargs)


@pytest.mark.parametrize(
    "image_shape,score_shape,kwargs,name",
    [
        ((3, 5, 6), (2, 5, 7), {}, "scores"),
        ((1, 5, 6), (2, 5, 6), {}, "image"),
        ((3, 0, 6), (2, 0, 6), {}, "image"),
        ((3, 5, 6), (0, 5, 6), {}, "scores"),
        ((3, 5, 6), (2, 5, 6), {"r": 4}, "r"),
        ((3, 5, 6), (2, 5, 6), {"r": 1}, "r"),
        ((3, 5, 6), (2, 5, 6), {"tau": 0.0}, "tau"),
        ((3, 5, 6), (2, 5, 6), {"alpha": 1.5}, "alpha"),
    ],
)
def test_pixel_propagation_rejects_bad_input(image_shape, score_shape, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pixel_propagation(torch.rand(image_shape), torch.rand(score_shape), **kwargs)


def test_pixel_propagation_rejects_non_finite_and_out_of_range():
    image, scores = torch.rand(3, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="image"):
        pixel_propagation(image * float("nan"), scores)
    with pytest.raises(ValueError, match="image"):
        pixel_propagation(image * 255, scores)
    with pytest.raises(ValueError, match="scores"):
        pixel_propagation(image, scores / 0)
