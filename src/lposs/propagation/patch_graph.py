"""LPOSS's patch graph: each patch joined to its ``k`` most similar patches (graph features,
decayed by patch-centre distance), normalised, propagated."""

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
    """``(N, N)`` sparse CSR ``S = D^-1/2 W D^-1/2`` of an ``(N, N)`` sparse CSR symmetric
    non-negative affinity ``W``, ``D`` its row sums; a node of zero degree keeps a zero row,
    so that ``L = I - alpha * S`` leaves its score unchanged."""
    check_shape(weights, "weights", (len(weights), len(weights)))
    crow, cols, values = weights.crow_indices(), weights.col_indices(), weights.values()
    rows = torch.repeat_interleave(torch.arange(len(weights), device=crow.device,
                                                dtype=crow.dtype),
                                   crow[1:] - crow[:-1], output_size=values.numel())
    inv_sqrt = inverse_sqrt_degree(values.new_zeros(len(weights)).index_add_(0, rows, values))
    return _csr(crow, cols, values * inv_sqrt[rows] * inv_sqrt[cols], weights.shape)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    """A CSR tensor from trusted parts (without torch's 'beta' warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, tuple(shape), check_invariants=False)


def knn_affinity(features: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                 sigma: float = 0.01, distance_power: float = 1.0) -> Tensor:
    """The symmetric kNN affinity of the LPOSS patch graph.

    ``A[i, j] = max(z_i . z_j, 0) ** gamma * exp(-sigma * ||p_i - p_j|| ** distance_power)``
    for the ``k`` nearest neighbours ``j`` of ``i`` by inner product of the L2-normalised
    features (``i`` itself is one of them; ties with the k-th are all kept), else 0;
    ``W = A + A^T`` with a zero diagonal. ``sigma = 0`` drops the spatial term (``S_p = 1``).
    The ``N x N`` similarity is kept whole only while small, else computed in row blocks.

    Args:
        features: ``(N, D)`` node features.
        positions: ``(N, 2)`` node positions in pixels, ``(y, x)``.
        k: neighbours per node (``min(k, N)`` is used), >= 1.
        gamma: power of the clamped similarity, > 0; sigma: spatial decay per pixel, >= 0;
        distance_power: power of the distance, > 0.

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
    """The LPOSS patch graph of one image (built by :func:`patch_graph`): ``alpha * S`` as
    sparse CSR blocks along the diagonal, one over all windows jointly or one per window.
    It depends on the image alone, so one graph answers every vocabulary."""

    def __init__(self, blocks: list[Tensor]):
        self.blocks = blocks  # (n, n) sparse CSR alpha * D^-1/2 W D^-1/2, in node order

    @property
    def num_nodes(self) -> int:
        return sum(block.shape[0] for block in self.blocks)

    def propagate(self, scores: Tensor, *, tol: float = 1e-6, max_iter: int = 10,
                  return_info: bool = False) -> Tensor | tuple[Tensor, CGInfo]:
        """Solve ``(I - alpha * S) X = scores`` by :func:`conjugate_gradient` from zero, one
        solve per block (``max_iter`` iterations at most: the paper's truncated solve).

        Args:
            scores: ``(N, C)`` initial class scores, on the graph's device.
            tol, max_iter: as in :func:`conjugate_gradient`.
            return_info: also return the :class:`CGInfo` (per column, the worst block).

        Returns:
            ``(N, C)`` refined scores in the dtype of ``scores``, or ``(scores, info)``.
        """
        check_shape(scores, "scores", (self.num_nodes, None))
        parts = [conjugate_gradient(lambda p, m=m: torch.addmm(p, m, p, alpha=-1),
                                    part.to(m.dtype), tol=tol, max_iter=max_iter)
                 for m, part in zip(self.blocks, scores.split([len(m) for m in self.blocks]))]
        x, info = parts[0]
        if len(parts) > 1:
            infos = [i for _, i in parts]
            x = torch.cat([x for x, _ in parts])
            info = CGInfo(torch.stack([i.converged for i in infos]).all(0),
                          torch.stack([i.iterations for i in infos]).amax(0),
                          torch.stack([i.residual for i in infos]).amax(0))
        x = x.to(scores.dtype)
        return (x, info) if return_info else x


def patch_graph(features: Tensor, positions: Tensor, *, k: int = 400, gamma: float = 3.0,
                sigma: float = 0.01, distance_power: float = 1.0, alpha: float = 0.95,
                nodes_per_window: int | None = None) -> PatchGraph:
    """The LPOSS graph: ``W`` from :func:`knn_affinity`, ``S`` from
    :func:`normalized_adjacency`, scaled by ``alpha``.

    Args:
        features: ``(N, D)`` patch features (L2-normalised inside); float64 builds a float64
            graph, any other float dtype a float32 one.
        positions: ``(N, 2)`` patch centres in working-image pixels, ``(y, x)``.
        k, gamma, sigma, distance_power: as in :func:`knn_affinity`.
        alpha: propagation strength, in (0, 1).
        nodes_per_window: None: one graph over all nodes (the paper's joint LPOSS); else
            the nodes are consecutive windows of this many patches, each its own graph with
            ``k`` capped at its patch count minus one (``LPOSSConfig.joint=False``).
    """
    check_shape(features, "features", (None, None))
    size = nodes_per_window or len(features)
    if len(features) % size:
        raise ValueError(f"{len(features)} patches are not windows of {size}")
    if nodes_per_window is not None:
        k = max(1, min(k, size - 1))
    blocks = []
    for start in range(0, len(features), size):
        adjacency = normalized_adjacency(knn_affinity(
            features[start:start + size], positions[start:start + size], k=k, gamma=gamma,
            sigma=sigma, distance_power=distance_power))
        adjacency.values().mul_(alpha)
        blocks.append(adjacency)
    return PatchGraph(blocks)


def patch_propagation(features: Tensor, positions: Tensor, scores: Tensor, *, k: int = 400,
                      gamma: float = 3.0, sigma: float = 0.01, distance_power: float = 1.0,
                      alpha: float = 0.95, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
    """LPOSS in one call: ``(N, C)`` ``scores`` refined over :func:`patch_graph` of ``(N, D)``
    ``features`` and ``(N, 2)`` ``positions`` (arguments as there and in
    :meth:`PatchGraph.propagate`), the graph in the compute dtype of ``scores``."""
    graph = patch_graph(features.to(compute_dtype(scores)), positions, k=k, gamma=gamma,
                        sigma=sigma, distance_power=distance_power, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)
