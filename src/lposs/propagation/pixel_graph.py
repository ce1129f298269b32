"""LPOSS+'s graph over the pixels of an image: each pixel joined to its ``r x r`` neighbourhood
by a Lab colour affinity, normalised, propagated; ``W`` is never formed, its product is a
stencil (:mod:`lposs.propagation.stencil`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .color import rgb_to_lab
from .graph import check_shape, compute_dtype, inverse_sqrt_degree
from .solver import CGInfo, conjugate_gradient
from .stencil import stencil_product

__all__ = ["PixelGraph", "pixel_affinity", "pixel_graph", "pixel_propagation"]

_LAB_SCALE = (100.0, 128.0, 128.0)  # Lab channels are divided by these for the pixel graph


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
    graph = PixelGraph(image, r=r, tau=tau, clip_offsets=False)
    weights = graph.unpad(graph.weights).to(image.dtype)
    return weights, torch.tensor(graph.offsets, dtype=torch.long, device=image.device)


def pixel_graph(image: Tensor, *, r: int = 13, tau: float = 0.01,
                alpha: float = 0.95) -> PixelGraph:
    """The LPOSS+ graph over the pixels of an image (:func:`pixel_affinity`), normalised
    and scaled by ``alpha``, ready to propagate any class scores over that image.

    Its memory is ``(r * r - 1) / 2`` weight maps of the padded image.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1]; float64 builds a float64 graph, any other float
            dtype a float32 one.
        r: side of the square neighbourhood, odd and >= 3.
        tau: temperature of the colour distance, > 0.
        alpha: propagation strength, in (0, 1).
    """
    graph = PixelGraph(image, r=r, tau=tau)
    graph.normalize(alpha)
    return graph


def pixel_propagation(image: Tensor, scores: Tensor, *, r: int = 13, tau: float = 0.01,
                      alpha: float = 0.95, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
    """LPOSS+: propagate class scores over the pixel graph of :func:`pixel_affinity`.

    ``pixel_graph(image, ...).propagate(scores, ...)`` with the graph in the compute dtype of
    ``scores``; build the graph once with :func:`pixel_graph` to propagate several score sets
    over one image.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        scores: ``(C, H, W)`` class scores at the image's size.
        r, tau, alpha: as in :func:`pixel_graph`.
        tol, max_iter: as in :meth:`PixelGraph.propagate`.

    Returns:
        ``(C, H, W)`` refined scores, on the device and in the dtype of ``scores``.
    """
    graph = pixel_graph(image.to(compute_dtype(scores)), r=r, tau=tau, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)


class PixelGraph:
    """The LPOSS+ pixel graph of one image (build it with :func:`pixel_graph`).

    Weights are stored flat over the image padded by ``r // 2`` on every side: in that
    layout an offset (dy, dx) is a fixed shift ``dy * Wp + dx``, so the stencil works on
    long contiguous slices. Weights are zero at padding pixels, and vectors are kept zero
    there, so padding never leaks into the result. ``clip_offsets`` drops the offsets that
    join no pixel pair of the image.
    """

    def __init__(self, image: Tensor, *, r: int, tau: float, clip_offsets: bool = True):
        check_shape(image, "image", (3, None, None))
        image = image.to(compute_dtype(image))
        _, height, width = image.shape
        half = r // 2
        max_dy, max_dx = (min(half, height - 1), min(half, width - 1)) if clip_offsets \
            else (half, half)
        self.offsets = [(dy, dx) for dy in range(max_dy + 1) for dx in range(-max_dx, max_dx + 1)
                        if dy > 0 or dx > 0]
        self.height, self.width, self.pad_by = height, width, half
        self.padded_height, self.padded_width = height + 2 * half, width + 2 * half
        self.shifts = [dy * self.padded_width + dx for dy, dx in self.offsets]
        self.start = half * self.padded_width + half  # first image pixel
        self.stop = self.start + (height - 1) * self.padded_width + width  # one past the last
        scale = torch.tensor(_LAB_SCALE, dtype=image.dtype, device=image.device)
        lab = self.pad(rgb_to_lab(image) / scale[:, None, None])
        inside = self.pad(torch.ones_like(image[:1], dtype=torch.bool))[0]
        a, b = self.start, self.stop
        # Weights within e of the subnormal range are flushed to 0 (exp is 10x slower there).
        floor = math.log(torch.finfo(lab.dtype).tiny) + 1
        cutoff = 1.001 * math.exp(floor)
        inverse_tau = min(1 / tau, torch.finfo(lab.dtype).max)  # finite: 0 * inf would be NaN
        self.weights = lab.new_zeros(len(self.offsets), lab.shape[1])
        for o, s in enumerate(self.shifts):
            difference = lab[:, a:b] - lab[:, a + s:b + s]
            weight = difference.square_().sum(0).sqrt_().mul_(-inverse_tau)
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
        inv_sqrt = inverse_sqrt_degree(degree)
        inv_sqrt[a:b] *= math.sqrt(alpha)
        for o, s in enumerate(self.shifts):
            self.weights[o, a:b] *= inv_sqrt[a:b] * inv_sqrt[a + s:b + s]
        F.threshold_(self.weights, torch.finfo(self.weights.dtype).tiny, 0.0)  # no subnormals

    def propagate(self, scores: Tensor, *, tol: float = 1e-6, max_iter: int = 10,
                  return_info: bool = False) -> Tensor | tuple[Tensor, CGInfo]:
        """Solve ``(I - alpha * S) X = scores`` column by column with conjugate gradient from
        zero (``max_iter`` iterations at most: the paper's truncated solve, by design).

        Args:
            scores: ``(C, H, W)`` class scores at the graph's image size and device.
            tol: conjugate-gradient relative residual tolerance, > 0.
            max_iter: conjugate-gradient iterations, >= 1.
            return_info: also return the solver's :class:`CGInfo`.

        Returns:
            ``(C, H, W)`` refined scores in the dtype of ``scores``, or ``(scores, info)``.
        """
        check_shape(scores, "scores", (None, self.height, self.width))
        b = self.pad(scores.to(self.weights.dtype)).T
        product = torch.empty_like(b)  # one buffer for every product: no fresh pages each time

        def operator(p: Tensor) -> Tensor:  # (I - S) p, the (C, Hp * Wp) maps seen as (N, C)
            return stencil_product(p.T, self.weights, self.shifts, self.start, self.stop,
                                   out=product.T).T

        x, info = conjugate_gradient(operator, b, tol=tol, max_iter=max_iter, overwrite_b=True)
        del b
        x = self.unpad(x.T).to(scores.dtype)
        return (x, info) if return_info else x
