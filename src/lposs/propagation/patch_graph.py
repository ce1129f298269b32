"""LPOSS's graph over the patches of all windows: each patch joined to its ``k`` most similar
patches (vision-model features, decayed by patch-centre distance), normalised, propagated."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .graph import check_shape, compute_dtype, inverse_sqrt_degree
from .solver import CGInfo, conjugate_gradient

__all__ = ["PatchGraph", "knn_affinity", "normalized_adjacency", "patch_graph",
           "patch_propagation"]

_GRAM_CACHE_ELEMENTS = 1 << 25  # keep the whole N x N similarity matrix up to this size
_GRAM_BLOCK_ELEMENTS = 1 << 23  # otherwise compute it in (block x N) rows of about this size
_GRAM_MIN_BLOCK = 256  # fewest rows per block of the similarity matrix


def normalized_adjacency(weights: Tensor) -> Tensor:
    """The symmetric normalisation ``S = D^-1/2 W D^-1/2`` of an affinity matrix.

    ``D`` holds the row sums of ``W``; a node of zero degree keeps a zero row, so that
    ``L = I - alpha * S`` leaves its score unchanged.

    Args:
        weights: ``(N, N)`` symmetric non-negative affinity, dense, sparse COO or sparse CSR.

    Returns:
        ``(N, N)`` ``S`` in the layout of ``weights``.
    """
    check_shape(weights, "weights", (len(weights), len(weights)))
    if weights.layout == torch.strided:
        inv_sqrt = inverse_sqrt_degree(weights.sum(1))
        return weights * inv_sqrt[:, None] * inv_sqrt[None, :]
    if weights.layout == torch.sparse_coo:
        weights = weights.coalesce()
        (rows, cols), values = weights.indices(), weights.values()
    else:
        rows, cols, values = _csr_rows(weights), weights.col_indices(), weights.values()
    inv_sqrt = inverse_sqrt_degree(values.new_zeros(len(weights)).index_add_(0, rows, values))
    values = values * inv_sqrt[rows] * inv_sqrt[cols]
    if weights.layout == torch.sparse_coo:
        return torch.sparse_coo_tensor(weights.indices(), values, weights.shape,
                                       is_coalesced=True, check_invariants=False)
    return _csr(weights.crow_indices(), cols, values, weights.shape)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    """A CSR tensor from trusted parts (without torch's 'beta' warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


def _csr_rows(matrix: Tensor) -> Tensor:
    """The row index of every stored entry of a CSR matrix."""
    crow = matrix.crow_indices()
    rows = torch.arange(matrix.shape[0], device=crow.device, dtype=crow.dtype)
    return torch.repeat_interleave(rows, crow[1:] - crow[:-1],
                                   output_size=matrix.values().numel())


def knn_affinity(features: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                 sigma: float = 0.01, distance_power: float = 1.0) -> Tensor:
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
        ``(N, N)`` sparse CSR ``W``, float64 for float64 features, else float32.
    """
    check_shape(features, "features", (None, None))
    check_shape(positions, "positions", (len(features), 2))
    n, k = len(features), min(k, len(features))
    z = F.normalize(features.to(compute_dtype(features)), dim=1)
    cache = n * n <= _GRAM_CACHE_ELEMENTS
    block = -(-n // 4) if cache else _GRAM_BLOCK_ELEMENTS // n  # 4 blocks: 40% fewer flops
    similarity = _BlockedSimilarity(z, min(max(_GRAM_MIN_BLOCK, block), n), cache)
    # Pass 1: the k-th largest similarity of every row (the node itself ranks first).
    kth = torch.cat([torch.topk(similarity.rows(s), k, dim=1, sorted=False).values.amin(1)
                     for s in similarity.starts])
    # Pass 2: j is a neighbour of i or i of j  <=>  z_i . z_j >= min(kth_i, kth_j).
    y, x = positions.to(z.dtype).T.contiguous()
    decay = min(sigma, torch.finfo(z.dtype).max)  # sigma = 1e308 must not become inf (0 * inf)
    counts, cols, values = [], [], []
    for s in similarity.starts:
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
        if decay > 0:
            distance = torch.hypot(y.index_select(0, r) - y.index_select(0, c),
                                   x.index_select(0, r) - x.index_select(0, c))
            if distance_power != 1:
                distance.pow_(distance_power)
            weight.mul_(distance.mul_(-decay).exp_())
            del distance
        cols.append(c)
        values.append(weight)
        del sim, r, c
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
        self.z, self.block = z, block
        self.starts = range(0, z.shape[0], block)
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

    def propagate(self, scores: Tensor, *, tol: float = 1e-6, max_iter: int = 10,
                  return_info: bool = False) -> Tensor | tuple[Tensor, CGInfo]:
        """Solve ``(I - alpha * S) X = scores`` column by column with conjugate gradient from
        zero (``max_iter`` iterations at most: the paper's truncated solve, by design).

        Args:
            scores: ``(N, C)`` initial class scores, on the graph's device.
            tol: conjugate-gradient relative residual tolerance, > 0.
            max_iter: conjugate-gradient iterations, >= 1.
            return_info: also return the solver's :class:`CGInfo`.

        Returns:
            ``(N, C)`` refined scores in the dtype of ``scores``, or ``(scores, info)``.
        """
        check_shape(scores, "scores", (self.num_nodes, None))
        x, info = conjugate_gradient(lambda p: torch.addmm(p, self.scaled, p, alpha=-1),
                                     scores.to(self.scaled.dtype), tol=tol, max_iter=max_iter)
        x = x.to(scores.dtype)
        return (x, info) if return_info else x


def patch_graph(features: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                sigma: float = 0.01, distance_power: float = 1.0,
                alpha: float = 0.95) -> PatchGraph:
    """The LPOSS graph over all patches of all windows: ``W`` from :func:`knn_affinity`,
    ``S`` from :func:`normalized_adjacency`, scaled by ``alpha``.

    Args:
        features: ``(N, D)`` patch features of the vision model (L2-normalised inside);
            float64 builds a float64 graph, any other float dtype a float32 one.
        positions: ``(N, 2)`` patch centres in working-image pixels, ``(y, x)``.
        k, gamma, sigma, distance_power: as in :func:`knn_affinity`.
        alpha: propagation strength, in (0, 1).
    """
    adjacency = normalized_adjacency(knn_affinity(features, positions, k=k, gamma=gamma,
                                                  sigma=sigma, distance_power=distance_power))
    adjacency.values().mul_(alpha)
    return PatchGraph(adjacency)


def patch_propagation(features: Tensor, positions: Tensor, scores: Tensor, *, k: int = 400,
                      gamma: float = 3.0, sigma: float = 0.01, distance_power: float = 1.0,
                      alpha: float = 0.95, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
    """LPOSS: propagate class scores over the kNN graph of all patches of all windows.

    ``patch_graph(features, positions, ...).propagate(scores, ...)`` with the graph in the
    compute dtype of ``scores``; build the graph once with :func:`patch_graph` to propagate
    several score sets over one image.

    Args:
        features: ``(N, D)`` patch features of the vision model (L2-normalised inside).
        positions: ``(N, 2)`` patch centres in working-image pixels, ``(y, x)``.
        scores: ``(N, C)`` initial class scores.
        k, gamma, sigma, distance_power, alpha: as in :func:`patch_graph`.
        tol, max_iter: as in :meth:`PatchGraph.propagate`.

    Returns:
        ``(N, C)`` refined scores, on the device and in the dtype of ``scores``.
    """
    graph = patch_graph(features.to(compute_dtype(scores)), positions, k=k, gamma=gamma,
                        sigma=sigma, distance_power=distance_power, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)
