"""Label propagation: the kNN patch graph (LPOSS), the pixel graph (LPOSS+) and the solver.

Tensor in and tensor out, on whatever device the inputs live on (torch, plus the compiled
CPU kernel of :mod:`lposs.stencil` for the pixel graph's product). Both stages
solve ``(I - alpha * S) X = Y`` for every class column of ``Y``, where
``S = D^-1/2 W D^-1/2`` is the symmetrically normalised affinity ``W`` of a graph, with a
conjugate-gradient solve truncated at ``max_iter`` iterations (see ``METHOD.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lposs.stencil import stencil_product

__all__ = [
    "CGInfo",
    "PatchGraph",
    "PixelGraph",
    "conjugate_gradient",
    "knn_affinity",
    "normalized_adjacency",
    "patch_graph",
    "patch_propagation",
    "pixel_affinity",
    "pixel_graph",
    "pixel_propagation",
    "rgb_to_lab",
]

_GRAM_CACHE_ELEMENTS = 1 << 25  # keep the whole N x N similarity matrix up to this size
_GRAM_BLOCK_ELEMENTS = 1 << 23  # otherwise compute it in (block x N) rows of about this size
_GRAM_MIN_BLOCK = 256  # fewest rows per block of the similarity matrix
_DOT_CHUNK_ROWS = 1 << 15  # rows per chunk of the conjugate-gradient column dots


# --------------------------------------------------------------------------- solver


@dataclass(frozen=True)
class CGInfo:
    """Convergence report of :func:`conjugate_gradient`, one entry per column.

    Attributes:
        converged: ``(C,)`` bool, ``||r|| <= tol * ||b||`` at the end.
        iterations: ``(C,)`` int64, iterations that updated the column.
        residual: ``(C,)`` relative residual ``||r|| / ||b||`` (0 where ``b`` is 0).
    """

    converged: Tensor
    iterations: Tensor
    residual: Tensor


def conjugate_gradient(
    operator: Tensor | Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 10,
    overwrite_b: bool = False,
) -> tuple[Tensor, CGInfo]:
    """Solve ``A X = B`` for many right-hand sides at once, starting from ``X = 0``.

    Every column runs its own conjugate-gradient recursion (its own step sizes), exactly as
    if it were solved alone; a column stops changing once ``||r|| <= tol * ||b||``. A zero
    column of ``b`` gives a zero solution. ``A`` must be symmetric positive definite.

    Args:
        operator: ``(N, N)`` dense or sparse tensor, or a function mapping ``(N, C)`` to
            ``A @ X`` of the same shape (it receives tensors laid out like ``b``; each result
            is used up before the next call, so the function may reuse one output buffer).
        b: ``(N, C)`` or ``(N,)`` right-hand sides.
        tol: relative residual tolerance, > 0.
        max_iter: most iterations per column, >= 1.
        overwrite_b: use ``b``'s memory for the residual (saves one vector; ``b`` is lost).

    Returns:
        ``(x, info)``: the solution shaped like ``b`` and a :class:`CGInfo`.
    """
    if not isinstance(b, Tensor) or b.dim() not in (1, 2) or not b.is_floating_point():
        raise ValueError("b must be a floating-point tensor of shape (N,) or (N, C)")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if isinstance(operator, Tensor):
        if operator.shape != (b.shape[0], b.shape[0]):
            raise ValueError(f"operator must have shape ({b.shape[0]}, {b.shape[0]}), "
                             f"got {tuple(operator.shape)}")
        matrix = operator
        operator = matrix.__matmul__
    if b.dim() == 1:
        x, info = conjugate_gradient(operator, b[:, None], tol=tol, max_iter=max_iter,
                                     overwrite_b=overwrite_b)
        return x[:, 0], info

    x = torch.zeros_like(b)
    r = b if overwrite_b else b.clone()
    p = r.clone()
    rs = _column_dot(r, r)
    b_norm = rs.sqrt()
    bound = tol * b_norm
    active = rs.sqrt() > bound  # a zero column is solved by x = 0 already
    iterations = torch.zeros(b.shape[1], dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        ap = operator(p)
        pap = _column_dot(p, ap)
        step = torch.where(active & (pap > 0), rs / torch.where(pap > 0, pap, 1), 0)
        x.addcmul_(p, step)
        r.addcmul_(ap, -step)
        del ap
        rs_new = _column_dot(r, r)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, 1), 0)
        iterations += active.long()
        active = active & (rs_new.sqrt() > bound) & (pap > 0)
        torch.addcmul(r, p, beta, out=p)  # p = r + beta * p in one pass
        rs = rs_new  # unchanged in columns that did not move
    residual = torch.where(b_norm > 0, rs.sqrt() / torch.where(b_norm > 0, b_norm, 1), 0)
    return x, CGInfo(converged=rs.sqrt() <= bound, iterations=iterations, residual=residual)


def _column_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(C,)`` inner products of matching columns of two ``(N, C)`` tensors.

    In row chunks whose product stays in cache (5x faster than one product for a pixel
    graph), each summed pairwise: as accurate as ``(a * b).sum(0)``, unlike a batched
    matmul, whose sequential float32 sums drift by ~1e-3 relative over 300k rows.
    """
    total = None
    for start in range(0, a.shape[0], _DOT_CHUNK_ROWS):
        part = (a[start:start + _DOT_CHUNK_ROWS] * b[start:start + _DOT_CHUNK_ROWS]).sum(0)
        total = part if total is None else total.add_(part)
    return total


# --------------------------------------------------------------------------- graphs


def normalized_adjacency(weights: Tensor) -> Tensor:
    """The symmetric normalisation ``S = D^-1/2 W D^-1/2`` of an affinity matrix.

    ``D`` holds the row sums of ``W``; a zero degree is replaced by 1 (isolated nodes keep a
    zero row). The propagation system is ``L = I - alpha * S``; with a zero diagonal in
    ``W``, ``L`` has ones on its diagonal.

    Args:
        weights: ``(N, N)`` symmetric non-negative affinity, dense, sparse COO or sparse CSR.

    Returns:
        ``(N, N)`` ``S`` in the layout of ``weights``.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 2 or \
            weights.shape[0] != weights.shape[1]:
        raise ValueError("weights must be a square (N, N) tensor")
    if weights.layout == torch.sparse_csr:
        values = weights.values()
        rows = _csr_rows(weights)
        cols = weights.col_indices()
    elif weights.layout == torch.sparse_coo:
        weights = weights.coalesce()
        values = weights.values()
        rows, cols = weights.indices()
    elif weights.layout == torch.strided:
        inv_sqrt = _inverse_sqrt_degree(weights.sum(1))
        return weights * inv_sqrt[:, None] * inv_sqrt[None, :]
    else:
        raise ValueError(f"weights has an unsupported layout {weights.layout}")
    degree = torch.zeros(weights.shape[0], dtype=values.dtype, device=values.device)
    degree.index_add_(0, rows, values)
    inv_sqrt = _inverse_sqrt_degree(degree)
    values = values * inv_sqrt[rows] * inv_sqrt[cols]
    if weights.layout == torch.sparse_coo:
        return torch.sparse_coo_tensor(weights.indices(), values, weights.shape,
                                       is_coalesced=True, check_invariants=False)
    return _csr(weights.crow_indices(), cols, values, weights.shape)


def _inverse_sqrt_degree(degree: Tensor) -> Tensor:
    return torch.where(degree > 0, degree, 1).rsqrt()


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    """A CSR tensor from trusted parts (without torch's 'beta' warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


def _csr_rows(matrix: Tensor) -> Tensor:
    """The row index of every stored entry of a CSR matrix."""
    crow = matrix.crow_indices()
    counts = crow[1:] - crow[:-1]
    rows = torch.arange(matrix.shape[0], device=crow.device, dtype=crow.dtype)
    return torch.repeat_interleave(rows, counts, output_size=matrix.values().numel())


def knn_affinity(
    features: Tensor,
    positions: Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    distance_power: float = 1.0,
) -> Tensor:
    """The symmetric kNN affinity of the LPOSS patch graph, as a sparse CSR matrix.

    ``A[i, j] = max(z_i . z_j, 0) ** gamma * exp(-sigma * ||p_i - p_j|| ** distance_power)``
    for the ``k`` nearest neighbours ``j`` of ``i`` by inner product (``i`` itself counts as
    one of them), else 0; ``W = A + A^T`` with a zero diagonal. Features are L2-normalised
    first. Neighbours tied with the k-th similarity are all kept. The ``N x N`` similarity
    matrix is kept whole only while it is small and is otherwise computed in row blocks.

    Args:
        features: ``(N, D)`` node features.
        positions: ``(N, 2)`` node positions in pixels, ``(y, x)``.
        k: neighbours per node (``min(k, N)`` is used), >= 1.
        gamma: power of the clamped similarity, > 0.
        sigma: spatial decay per pixel, >= 0.
        distance_power: power of the distance inside the exponential, > 0.

    Returns:
        ``(N, N)`` sparse CSR ``W`` in the dtype of ``features``.
    """
    _check_nodes(features, positions)
    _check_graph_args(k, gamma, sigma, distance_power)
    return _knn_affinity(features, positions, k, gamma, sigma, distance_power)


def _knn_affinity(features, positions, k, gamma, sigma, distance_power) -> Tensor:
    n = features.shape[0]
    k = min(k, n)
    z = F.normalize(features, dim=1)
    positions = positions.to(z.dtype)
    cache = n * n <= _GRAM_CACHE_ELEMENTS
    block = -(-n // 4) if cache else _GRAM_BLOCK_ELEMENTS // n  # 4 blocks: 40% fewer flops
    block = max(_GRAM_MIN_BLOCK, block)
    similarity = _BlockedSimilarity(z, min(block, n), cache)
    starts = similarity.starts

    # Pass 1: the k-th largest similarity of every row (the node itself ranks first).
    kth = torch.cat([torch.topk(similarity.rows(s), k, dim=1, sorted=False).values.amin(1)
                     for s in starts])
    # Pass 2: j is a neighbour of i or i of j  <=>  z_i . z_j >= min(kth_i, kth_j).
    y, x = positions.T.contiguous()
    counts, cols, values = [], [], []
    for s in starts:
        sim = similarity.rows(s)
        rows = sim.shape[0]
        keep = sim >= torch.minimum(kth[s:s + rows, None], kth[None, :])
        keep.diagonal(offset=s).fill_(False)
        flat = keep.view(-1).nonzero().squeeze(1)  # row-major positions in the block
        del keep
        sim = sim.view(-1).index_select(0, flat)
        r = flat.div(n, rounding_mode="floor")
        c = flat.sub_(r * n)
        counts.append(torch.bincount(r, minlength=rows))
        r += s
        # W = A + A^T: an entry counts twice when each node is in the other's list.
        weight = (sim >= kth.index_select(0, r)).to(sim.dtype)
        weight.add_((sim >= kth.index_select(0, c)).to(sim.dtype))
        weight.mul_(sim.clamp_(min=0).pow_(gamma))
        distance = torch.hypot(y.index_select(0, r) - y.index_select(0, c),
                               x.index_select(0, r) - x.index_select(0, c))
        if distance_power != 1:
            distance.pow_(distance_power)
        weight.mul_(distance.mul_(-sigma).exp_())
        cols.append(c)
        values.append(weight)
        del sim, r, c, distance
    index_dtype = torch.int32 if n * k < 2**30 else torch.int64
    crow = torch.zeros(n + 1, dtype=index_dtype, device=z.device)
    torch.cumsum(torch.cat(counts), 0, out=crow[1:])
    return _csr(crow, torch.cat(cols).to(index_dtype), torch.cat(values), (n, n))


class _BlockedSimilarity:
    """Row blocks of ``z z^T`` with +inf on the diagonal, never more than a block at once.

    The matrix is cut into square blocks; block (i, j) with i <= j is always computed by the
    same product and block (j, i) is its transpose, so a pair's similarity has the same bits
    seen from either node (the kNN thresholds of both ends must agree exactly). With
    ``cache`` the row blocks are kept, and blocks below the diagonal are taken from them.
    """

    def __init__(self, z: Tensor, block: int, cache: bool):
        self.z, self.block, self.n = z, block, z.shape[0]
        self.starts = range(0, self.n, block)
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def _block(self, i: int, j: int) -> Tensor:
        """Block (i, j), i < j (rows i:i+B, columns j:j+B)."""
        if self.cache is not None:
            return self.cache[i][:, j:j + self.block]
        return self.z[i:i + self.block] @ self.z[j:j + self.block].T

    def rows(self, start: int) -> Tensor:
        """``(B, N)`` similarities of the rows ``start:start + B``."""
        if self.cache is not None and start in self.cache:
            return self.cache[start]
        parts = [self._block(j, start).T for j in self.starts if j < start]
        if self.cache is not None:  # the blocks right of the diagonal in one product
            parts.append(self.z[start:start + self.block] @ self.z[start:].T)
        else:
            parts += [self.z[start:start + self.block] @ self.z[j:j + self.block].T
                      for j in self.starts if j >= start]
        rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        diagonal = rows[:, start:start + self.block]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)  # exactly symmetric
        rows.diagonal(offset=start).fill_(math.inf)
        if self.cache is not None:
            self.cache[start] = rows
        return rows


class PatchGraph:
    """The LPOSS patch graph of one image, ready to propagate any class scores.

    Built by :func:`patch_graph`; it depends on the image alone, so one graph answers every
    vocabulary. Holds ``alpha * S`` as an ``(N, N)`` sparse CSR matrix.
    """

    def __init__(self, scaled: Tensor):
        self.scaled = scaled  # (N, N) sparse CSR alpha * D^-1/2 W D^-1/2

    @property
    def num_nodes(self) -> int:
        return self.scaled.shape[0]

    def propagate(self, scores: Tensor, *, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
        """Solve ``(I - alpha * S) X = scores`` column by column with conjugate gradient from
        zero (``max_iter`` iterations at most: the paper's truncated solve, by design).

        Args:
            scores: ``(N, C)`` initial class scores, on the graph's device.
            tol: conjugate-gradient relative residual tolerance, > 0.
            max_iter: conjugate-gradient iterations, >= 1.

        Returns:
            ``(N, C)`` refined scores, in the dtype of ``scores``.
        """
        _check_tensor("scores", scores, 2)
        if scores.shape[0] != self.num_nodes:
            raise ValueError(f"scores must have shape ({self.num_nodes}, C) with C >= 1, "
                             f"got {tuple(scores.shape)}")
        _check_same_device(self.scaled, scores=scores)
        _check_solver_args(tol, max_iter)
        x, _ = conjugate_gradient(lambda p: torch.addmm(p, self.scaled, p, alpha=-1),
                                  scores.to(self.scaled.dtype), tol=tol, max_iter=max_iter)
        return x.to(scores.dtype)


def patch_graph(
    features: Tensor,
    positions: Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    distance_power: float = 1.0,
    alpha: float = 0.95,
) -> PatchGraph:
    """The LPOSS graph over all patches of all windows: ``W`` from :func:`knn_affinity`,
    ``S`` from :func:`normalized_adjacency`, scaled by ``alpha``.

    Args:
        features: ``(N, D)`` patch features of the vision model (L2-normalised inside);
            float64 builds a float64 graph, any other float dtype a float32 one.
        positions: ``(N, 2)`` patch centres in working-image pixels, ``(y, x)``.
        k: neighbours per patch (``min(k, N)`` is used), >= 1.
        gamma: power of the clamped feature similarity, > 0.
        sigma: spatial decay per pixel of patch-centre distance, >= 0.
        distance_power: power of the distance inside the exponential, > 0.
        alpha: propagation strength, in (0, 1).
    """
    _check_nodes(features, positions)
    _check_graph_args(k, gamma, sigma, distance_power)
    _check_alpha(alpha)
    features = features.to(_compute_dtype(features))
    weights = _knn_affinity(features, positions, k, gamma, sigma, distance_power)
    adjacency = normalized_adjacency(weights)
    del weights
    return PatchGraph(_csr(adjacency.crow_indices(), adjacency.col_indices(),
                           adjacency.values() * alpha, adjacency.shape))


def patch_propagation(
    features: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    k: int = 400,
    gamma: float = 3.0,
    sigma: float = 0.01,
    distance_power: float = 1.0,
    alpha: float = 0.95,
    tol: float = 1e-6,
    max_iter: int = 10,
) -> Tensor:
    """LPOSS: propagate class scores over the kNN graph of all patches of all windows.

    ``patch_graph(features, positions, ...).propagate(scores, ...)``, the graph built in
    the compute dtype of ``scores``; build the graph once with :func:`patch_graph` to
    propagate several score sets over one image.

    Args:
        features: ``(N, D)`` patch features of the vision model (L2-normalised inside).
        positions: ``(N, 2)`` patch centres in working-image pixels, ``(y, x)``.
        scores: ``(N, C)`` initial class scores.
        k, gamma, sigma, distance_power, alpha: as in :func:`patch_graph`.
        tol, max_iter: as in :meth:`PatchGraph.propagate`.

    Returns:
        ``(N, C)`` refined scores, on the device and in the dtype of ``scores``.
    """
    _check_nodes(features, positions)
    _check_tensor("scores", scores, 2)
    if scores.shape[0] != features.shape[0] or scores.shape[1] < 1:
        raise ValueError(f"scores must have shape ({features.shape[0]}, C) with C >= 1, "
                         f"got {tuple(scores.shape)}")
    _check_same_device(features, scores=scores)
    _check_alpha(alpha)
    _check_solver_args(tol, max_iter)
    graph = patch_graph(features.to(_compute_dtype(scores)), positions, k=k, gamma=gamma,
                        sigma=sigma, distance_power=distance_power, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)


# --------------------------------------------------------------------------- pixels

_LAB_SCALE = (100.0, 128.0, 128.0)  # Lab channels are divided by these for the pixel graph
_RGB_TO_XYZ = (  # sRGB (D65) to CIE XYZ
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(image: Tensor) -> Tensor:
    """Convert sRGB in [0, 1] to CIE L*a*b* under the D65 white point.

    Args:
        image: ``(*, 3, H, W)`` RGB in [0, 1].

    Returns:
        ``(*, 3, H, W)`` Lab: L in [0, 100], a and b roughly in [-128, 127].
    """
    if not isinstance(image, Tensor) or image.dim() < 3 or image.shape[-3] != 3 or \
            not image.is_floating_point():
        raise ValueError("image must be a floating-point tensor of shape (*, 3, H, W)")
    rgb = image.clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix / white[:, None], linear)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3),
                    7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def pixel_affinity(image: Tensor, *, r: int = 13, tau: float = 0.01) -> tuple[Tensor, Tensor]:
    """The LPOSS+ pixel affinity, one weight map per neighbour offset of one half-window.

    Pixels ``p`` and ``q = p + (dy, dx)`` with ``|dy|, |dx| <= r // 2`` are joined with weight
    ``exp(-||lab_p - lab_q|| / tau)``, Lab divided by (100, 128, 128); there is no wrap at the
    borders. ``W`` is symmetric, so only the offsets with ``dy > 0`` or ``dy == 0, dx > 0`` are
    stored: ``weights[o, y, x]`` joins ``(y, x)`` and ``(y + dy_o, x + dx_o)`` (0 when that
    pixel lies outside the image), and the other half of ``W`` is its mirror.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        r: side of the square neighbourhood, odd and >= 3.
        tau: temperature of the colour distance, > 0.

    Returns:
        ``(weights, offsets)``: ``((r * r - 1) // 2, H, W)`` weights and
        ``((r * r - 1) // 2, 2)`` int64 offsets ``(dy, dx)``.
    """
    _check_image(image)
    _check_pixel_args(r, tau)
    dtype = _compute_dtype(image)
    offsets = _half_offsets(r, image.shape[1], image.shape[2], clip=False)
    graph = PixelGraph(image.to(dtype), offsets, r, tau)
    weights = graph.unpad(graph.weights.view(len(offsets), -1)).to(image.dtype)
    return weights, torch.tensor(offsets, dtype=torch.long, device=image.device)


def pixel_graph(image: Tensor, *, r: int = 13, tau: float = 0.01,
                alpha: float = 0.95) -> PixelGraph:
    """The LPOSS+ graph over the pixels of an image (:func:`pixel_affinity`), normalised
    and scaled by ``alpha``, ready to propagate any class scores over that image.

    ``W`` is never formed: its product is a stencil over the ``r x r`` neighbourhood
    (:func:`lposs.stencil.stencil_product`); the graph's memory is ``(r * r - 1) / 2``
    weight maps of the padded image.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1]; float64 builds a float64 graph, any other float
            dtype a float32 one.
        r: side of the square neighbourhood, odd and >= 3.
        tau: temperature of the colour distance, > 0.
        alpha: propagation strength, in (0, 1).
    """
    _check_image(image)
    _check_pixel_args(r, tau)
    _check_alpha(alpha)
    offsets = _half_offsets(r, image.shape[1], image.shape[2], clip=True)
    graph = PixelGraph(image.to(_compute_dtype(image)), offsets, r, tau)
    graph.normalize(alpha)
    return graph


def pixel_propagation(
    image: Tensor,
    scores: Tensor,
    *,
    r: int = 13,
    tau: float = 0.01,
    alpha: float = 0.95,
    tol: float = 1e-6,
    max_iter: int = 10,
) -> Tensor:
    """LPOSS+: propagate class scores over the pixel graph of :func:`pixel_affinity`.

    ``pixel_graph(image, ...).propagate(scores, ...)``, the graph built in the compute dtype
    of ``scores``; build the graph once with :func:`pixel_graph` to propagate several score
    sets over one image.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        scores: ``(C, H, W)`` class scores at the image's size.
        r, tau, alpha: as in :func:`pixel_graph`.
        tol, max_iter: as in :meth:`PixelGraph.propagate`.

    Returns:
        ``(C, H, W)`` refined scores, on the device and in the dtype of ``scores``.
    """
    _check_image(image)
    _check_tensor("scores", scores, 3)
    if scores.shape[1:] != image.shape[1:] or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (C, {image.shape[1]}, {image.shape[2]}) "
                         f"with C >= 1, got {tuple(scores.shape)}")
    _check_same_device(image, scores=scores)
    _check_alpha(alpha)
    _check_solver_args(tol, max_iter)
    graph = pixel_graph(image.to(_compute_dtype(scores)), r=r, tau=tau, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)


def _half_offsets(r: int, height: int, width: int, *, clip: bool) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of one half of the r x r window; ``clip`` drops those that fit no
    pixel pair of a ``height x width`` image."""
    half = r // 2
    max_dy = min(half, height - 1) if clip else half
    max_dx = min(half, width - 1) if clip else half
    return [(dy, dx) for dy in range(max_dy + 1) for dx in range(-max_dx, max_dx + 1)
            if dy > 0 or dx > 0]


class PixelGraph:
    """The LPOSS+ pixel graph of one image (build it with :func:`pixel_graph`).

    Weights are stored flat over the image padded by ``r // 2`` on every side: in that
    layout an offset (dy, dx) is a fixed shift ``dy * Wp + dx``, so the stencil works on
    long contiguous slices. Weights are zero at padding pixels, and vectors are kept zero
    there, so padding never leaks into the result.
    """

    def __init__(self, image: Tensor, offsets: list[tuple[int, int]], r: int, tau: float):
        _, height, width = image.shape
        self.height, self.width, self.pad_by = height, width, r // 2
        self.padded_height, self.padded_width = height + 2 * self.pad_by, width + 2 * self.pad_by
        self.shifts = [dy * self.padded_width + dx for dy, dx in offsets]
        self.start = self.pad_by * self.padded_width + self.pad_by  # first image pixel
        self.stop = self.start + (height - 1) * self.padded_width + width  # one past the last
        scale = torch.tensor(_LAB_SCALE, dtype=image.dtype, device=image.device)
        lab = self.pad(rgb_to_lab(image) / scale[:, None, None])
        inside = self.pad(torch.ones_like(image[:1], dtype=torch.bool))[0]
        a, b = self.start, self.stop
        # Weights within e of the subnormal range are flushed to 0 (exp is 10x slower there).
        floor = math.log(torch.finfo(lab.dtype).tiny) + 1
        cutoff = 1.001 * math.exp(floor)
        self.weights = lab.new_zeros(len(offsets), lab.shape[1])
        for o, s in enumerate(self.shifts):
            difference = lab[:, a:b] - lab[:, a + s:b + s]
            weight = difference.square_().sum(0).sqrt_().mul_(-1 / tau)
            weight = F.threshold_(weight.clamp_(min=floor).exp_(), cutoff, 0.0)
            self.weights[o, a:b] = weight.mul_(inside[a:b] & inside[a + s:b + s])

    def pad(self, maps: Tensor) -> Tensor:
        """``(K, H, W)`` -> ``(K, Hp * Wp)`` zero-padded, flat."""
        padded = maps.new_zeros(maps.shape[0], self.padded_height, self.padded_width)
        p = self.pad_by
        padded[:, p:p + self.height, p:p + self.width] = maps
        return padded.view(maps.shape[0], -1)

    def unpad(self, flat: Tensor) -> Tensor:
        """``(K, Hp * Wp)`` -> ``(K, H, W)`` (a copy)."""
        p = self.pad_by
        maps = flat.view(flat.shape[0], self.padded_height, self.padded_width)
        return maps[:, p:p + self.height, p:p + self.width].contiguous()

    def normalize(self, alpha: float) -> None:
        """Turn the weights into those of ``alpha * D^-1/2 W D^-1/2`` (in place)."""
        a, b = self.start, self.stop
        degree = self.weights.new_zeros(self.weights.shape[1])
        for o, s in enumerate(self.shifts):
            degree[a:b] += self.weights[o, a:b]
            degree[a + s:b + s] += self.weights[o, a:b]
        inv_sqrt = _inverse_sqrt_degree(degree)
        inv_sqrt[a:b] *= math.sqrt(alpha)
        for o, s in enumerate(self.shifts):
            self.weights[o, a:b] *= inv_sqrt[a:b] * inv_sqrt[a + s:b + s]
        F.threshold_(self.weights, torch.finfo(self.weights.dtype).tiny, 0.0)  # no subnormals

    def propagation_operator(self, p: Tensor, out: Tensor | None = None) -> Tensor:
        """``(I - S) p`` for ``p`` ``(Hp * Wp, C)``, S the normalised (alpha-scaled) graph;
        ``out`` (laid out like ``p``) receives it when given."""
        columns = p.T  # (C, Hp * Wp), contiguous for vectors laid out like b
        return stencil_product(columns, self.weights, self.shifts, self.start, self.stop,
                               out=None if out is None else out.T).T

    def propagate(self, scores: Tensor, *, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
        """Solve ``(I - alpha * S) X = scores`` column by column with conjugate gradient from
        zero (``max_iter`` iterations at most: the paper's truncated solve, by design).

        Args:
            scores: ``(C, H, W)`` class scores at the graph's image size and device.
            tol: conjugate-gradient relative residual tolerance, > 0.
            max_iter: conjugate-gradient iterations, >= 1.

        Returns:
            ``(C, H, W)`` refined scores, in the dtype of ``scores``.
        """
        _check_tensor("scores", scores, 3)
        if scores.shape[1:] != (self.height, self.width) or scores.shape[0] < 1:
            raise ValueError(f"scores must have shape (C, {self.height}, {self.width}) "
                             f"with C >= 1, got {tuple(scores.shape)}")
        _check_same_device(self.weights, scores=scores)
        _check_solver_args(tol, max_iter)
        b = self.pad(scores.to(self.weights.dtype)).T
        product = torch.empty_like(b)  # one buffer for every product: no fresh pages each time
        x, _ = conjugate_gradient(lambda p: self.propagation_operator(p, product), b,
                                  tol=tol, max_iter=max_iter, overwrite_b=True)
        del b
        return self.unpad(x.T).to(scores.dtype)


# --------------------------------------------------------------------------- checks


def _check_tensor(name: str, value: object, dim: int) -> None:
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


def _check_same_device(reference: Tensor, **others: Tensor) -> None:
    for name, value in others.items():
        if value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but the other inputs are on "
                             f"{reference.device}")


def _check_nodes(features: Tensor, positions: Tensor) -> None:
    _check_tensor("features", features, 2)
    _check_tensor("positions", positions, 2)
    if positions.shape != (features.shape[0], 2):
        raise ValueError(f"positions must have shape ({features.shape[0]}, 2) to match "
                         f"features, got {tuple(positions.shape)}")
    _check_same_device(features, positions=positions)


def _check_graph_args(k: int, gamma: float, sigma: float, distance_power: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not distance_power > 0 or not math.isfinite(distance_power):
        raise ValueError(f"distance_power must be a finite number > 0, got {distance_power!r}")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def _check_solver_args(tol: float, max_iter: int) -> None:
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def _check_pixel_args(r: int, tau: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 3 or r % 2 == 0:
        raise ValueError(f"r must be an odd integer >= 3, got {r!r}")
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")


def _check_image(image: Tensor) -> None:
    _check_tensor("image", image, 3)
    if image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if bool(image.min() < -1e-3) or bool(image.max() > 1 + 1e-3):
        raise ValueError("image values must lie in [0, 1]")


def _compute_dtype(value: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32
