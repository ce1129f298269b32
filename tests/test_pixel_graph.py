"""Tests for lposs.propagation.pixel_graph against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_propagation import (
    DEVICES,
    as_numpy,
    reference_adjacency,
    reference_lab,
    reference_pixel_weights,
    reference_solve_columns,
)

from lposs.propagation.pixel_graph import (
    PixelGraph,
    pixel_features,
    pixel_graph,
    pixel_propagation,
)

# The paper's settings never diverge: a divergence warning fails these tests.
pytestmark = pytest.mark.filterwarnings("error:lposs. conjugate gradient diverged")


def test_pixel_affinity_matches_explicit_loop():
    image = torch.rand(3, 6, 8, generator=torch.Generator().manual_seed(4))
    graph = PixelGraph(pixel_features(image), r=5, tau=0.1)
    weights, offsets = graph.unpad(graph.weights), torch.tensor(graph.offsets)
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


def test_pixel_graph_reports_convergence():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 9, 11, generator=g, dtype=torch.float64)
    y = torch.randn(2, 9, 11, generator=g, dtype=torch.float64)
    graph = pixel_graph(image, r=5, tau=0.1, alpha=0.9)
    out, info = graph.propagate(y, max_iter=3, return_info=True)
    torch.testing.assert_close(out, graph.propagate(y, max_iter=3))
    laplacian = np.eye(99) - 0.9 * reference_adjacency(
        reference_pixel_weights(image.numpy(), 5, 0.1))
    b = y.numpy().reshape(2, -1).T
    residual = np.linalg.norm(b - laplacian @ out.numpy().reshape(2, -1).T, axis=0)
    np.testing.assert_allclose(info.residual.numpy(), residual / np.linalg.norm(b, axis=0),
                               rtol=1e-6)
    assert info.iterations.tolist() == [3, 3]


def test_a_class_masked_with_minus_1e20_is_propagated():
    g = torch.Generator().manual_seed(7)
    image = torch.rand(3, 10, 12, generator=g)
    scores = torch.rand(3, 10, 12, generator=g)
    masked = scores.clone()
    masked[1] = -1e20
    out = pixel_propagation(image, masked)
    unit = scores.clone()
    unit[1] = -1.0
    expected = pixel_propagation(image, unit)
    torch.testing.assert_close(out[1] / 1e20, expected[1], rtol=1e-5, atol=0)
    assert torch.equal(out[[0, 2]], expected[[0, 2]])  # classes are independent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflowing_affinity_keeps_isolated_scores(dtype):
    # tau = 1e-300: only pixels of exactly one colour stay joined (exp(-0 / tau) = 1); the
    # others are isolated and keep their scores.
    g = torch.Generator().manual_seed(8)
    image = torch.rand(3, 7, 9, generator=g, dtype=dtype)
    image[:, :3, :4] = 0.5
    scores = torch.randn(2, 7, 9, generator=g, dtype=dtype)
    out = pixel_propagation(image, scores, r=5, tau=1e-300, tol=1e-12, max_iter=100)
    with np.errstate(over="ignore"):
        w = reference_pixel_weights(image.double().numpy(), 5, 1e-300)
    y = scores.double().numpy().reshape(2, -1).T
    expected = np.linalg.solve(np.eye(63) - 0.95 * reference_adjacency(w), y)
    np.testing.assert_allclose(as_numpy(out).reshape(2, -1).T, expected, atol=1e-4)
    isolated = torch.from_numpy(w.sum(1) == 0).view(7, 9)
    assert bool(isolated[3:].all())
    torch.testing.assert_close(out[:, isolated], scores[:, isolated])  # F = Y
    noisy = torch.rand(3, 7, 9, generator=g, dtype=dtype)  # no two pixels alike: L = I
    assert torch.equal(pixel_propagation(noisy, scores, tau=1e-300), scores)


def test_divergence_near_alpha_one_is_warned():
    g = torch.Generator().manual_seed(0)
    graph = pixel_graph(torch.rand(3, 20, 24, generator=g), alpha=0.99999)
    with pytest.warns(RuntimeWarning, match="diverged"):
        _, info = graph.propagate(torch.rand(3, 20, 24, generator=g), return_info=True)
    assert not bool(info.converged.any()) and float(info.residual.max()) > 1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "image_shape,score_shape,name",
    [
        ((3, 5, 6), (2, 5, 7), "scores"),
        ((1, 5, 6), (2, 5, 6), "image"),
        ((3, 0, 6), (2, 0, 6), "image"),
        ((3, 5, 6), (0, 5, 6), "scores"),
        ((3, 5, 6), (5, 6), "scores"),
    ],
)
def test_pixel_propagation_rejects_bad_shapes(image_shape, score_shape, name):
    with pytest.raises(ValueError, match=name):
        pixel_propagation(torch.rand(image_shape), torch.rand(score_shape))


# --------------------------------------------------------------------------- depth


@pytest.mark.parametrize(("lab", "depth_scale"), [(False, 1.0), (True, 2.5)])
def test_depth_features_match_explicit_loop(lab, depth_scale):
    g = torch.Generator().manual_seed(9)
    image = torch.rand(3, 6, 7, generator=g, dtype=torch.float64)
    depth = torch.rand(6, 7, generator=g, dtype=torch.float64) * 40 + 3  # any offset, scale
    scores = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    d = depth.numpy()
    channels = [(d - d.min()) / (d.max() - d.min()) * depth_scale]
    if lab:
        channels = [*(reference_lab(image.numpy()) / np.array([100.0, 128.0, 128.0])[:, None,
                                                                                     None]),
                    *channels]
    w = reference_pixel_weights(image.numpy(), 5, 0.1, features=np.stack(channels))
    graph = pixel_graph(image, r=5, tau=0.1, depth=depth, lab=lab, depth_scale=depth_scale)
    out = graph.propagate(scores)
    expected = reference_solve_columns(np.eye(42) - 0.95 * reference_adjacency(w),
                                       scores.numpy().reshape(2, -1).T)
    np.testing.assert_allclose(as_numpy(out).reshape(2, -1).T, expected, atol=1e-10)
    if lab:  # Lab alone is another graph
        assert not torch.allclose(out, pixel_graph(image, r=5, tau=0.1).propagate(scores))


def test_a_constant_depth_is_a_zero_feature_and_a_misshapen_one_is_refused():
    image = torch.rand(3, 5, 6, dtype=torch.float64)
    features = pixel_features(image, torch.full((5, 6), 7.0), lab=False)
    assert torch.equal(features, torch.zeros(1, 5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="depth"):
        pixel_features(image, torch.ones(5, 7))
