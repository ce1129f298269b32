"""Independent numpy references for the propagation tests (dense matrices, explicit loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]


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


def reference_pixel_weights(rgb, r, tau, features=None):
    """Dense (HW, HW) W from a loop over every pixel's r x r neighbours, on (K, H, W)
    ``features`` (default: the image's Lab divided by (100, 128, 128))."""
    lab = reference_lab(rgb) / np.array([100.0, 128.0, 128.0])[:, None, None]
    lab = lab if features is None else features
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
