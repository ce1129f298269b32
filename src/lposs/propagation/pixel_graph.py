"""LPOSS+'s graph over the pixels of an image: each pixel joined to its ``r x r`` neighbourhood
by the affinity of its pixel features (Lab colour, and/or predicted depth), normalised,
propagated; ``W`` is never formed, its product is a stencil (:mod:`.stencil`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .color import rgb_to_lab
from .graph import check_shape, compute_dtype, inverse_sqrt_degree
from .solver import CGInfo, conjugate_gradient
from .stencil import stencil_product

__all__ = ["PixelGraph", "pixel_features", "pixel_graph", "pixel_propagation"]

_LAB_SCALE = (100.0, 128.0, 128.0)  # Lab channels are divided by these for the pixel graph


def pixel_features(image: Tensor, depth: Tensor | None = None, *, lab: bool = True,
                   depth_scale: float = 1.0) -> Tensor:
    """The pixel features of LPOSS+: Lab divided by (100, 128, 128) (with ``lab``), then the
    depth min-max normalised to [0, 1] over the image (0 where it is constant) times
    ``depth_scale`` (with ``depth``).

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].
        depth: ``(H, W)`` predicted depth (any offset and scale: only its range is used).

    Returns:
        ``(K, H, W)`` in the dtype of ``image``, ``K = 3 * lab + (depth is not None)``.
    """
    check_shape(image, "image", (3, None, None))
    parts = []
    if lab:
        scale = torch.tensor(_LAB_SCALE, dtype=image.dtype, device=image.device)
        parts.append(rgb_to_lab(image) / scale[:, None, None])
    if depth is not None:
        check_shape(depth, "depth", tuple(image.shape[1:]))
        depth = depth.to(image)
        low, span = depth.min(), depth.max() - depth.min()
        parts.append(((depth - low) / span if span > 0 else depth * 0)[None] * depth_scale)
    if not parts:
        raise ValueError("the pixel graph needs Lab, depth or both")
    return torch.cat(parts)


def pixel_graph(image: Tensor, *, r: int = 13, tau: float = 0.01, alpha: float = 0.95,
                depth: Tensor | None = None, lab: bool = True,
                depth_scale: float = 1.0) -> PixelGraph:
    """The LPOSS+ graph over the pixels of an image, normalised and scaled by ``alpha``.

    Pixels ``p`` and ``q = p + (dy, dx)``, ``|dy|, |dx| <= r // 2``, are joined with weight
    ``exp(-||f_p - f_q|| / tau)``, ``f`` from :func:`pixel_features`, no wrap at the borders.
    Its memory is ``(r * r - 1) / 2`` weight maps of the padded image.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1]; float64 builds a float64 graph, else float32.
        r: side of the square neighbourhood, odd and >= 3; tau: temperature, > 0.
        alpha: propagation strength, in (0, 1).
        depth, lab, depth_scale: as in :func:`pixel_features`.
    """
    image = image.to(compute_dtype(image))
    features = pixel_features(image, depth, lab=lab, depth_scale=depth_scale)
    graph = PixelGraph(features, r=r, tau=tau)
    graph.normalize(alpha)
    return graph


def pixel_propagation(image: Tensor, scores: Tensor, *, r: int = 13, tau: float = 0.01,
                      alpha: float = 0.95, tol: float = 1e-6, max_iter: int = 10) -> Tensor:
    """LPOSS+ in one call: ``(C, H, W)`` ``scores`` refined over :func:`pixel_graph` of the
    ``(3, H, W)`` ``image`` (arguments as there and in :meth:`PixelGraph.propagate`), the
    graph in the compute dtype of ``scores``."""
    graph = pixel_graph(image.to(compute_dtype(scores)), r=r, tau=tau, alpha=alpha)
    return graph.propagate(scores, tol=tol, max_iter=max_iter)


class PixelGraph:
    """The LPOSS+ pixel graph of one image (build it with :func:`pixel_graph`).

    ``W`` is symmetric: only the offsets ``(dy, dx)`` with ``dy > 0`` or ``dy == 0, dx > 0``
    that join a pixel pair are kept (``offsets``), one weight map each, stored flat over the
    image padded by ``r // 2`` on every side (``weights[o]`` joins pixels ``i`` and
    ``i + shifts[o]``): there an offset is a fixed shift, so the stencil works on long
    contiguous slices. Weights and vectors are zero at padding pixels.
    """

    def __init__(self, features: Tensor, *, r: int, tau: float):
        _, height, width = features.shape  # (K, H, W) pixel features, compute dtype
        half = r // 2
        max_dy, max_dx = min(half, height - 1), min(half, width - 1)
        self.offsets = [(dy, dx) for dy in range(max_dy + 1) for dx in range(-max_dx, max_dx + 1)
                        if dy > 0 or dx > 0]
        self.height, self.width, self.pad_by = height, width, half
        self.padded_height, self.padded_width = height + 2 * half, width + 2 * half
        self.shifts = [dy * self.padded_width + dx for dy, dx in self.offsets]
        self.start = half * self.padded_width + half  # first image pixel
        self.stop = self.start + (height - 1) * self.padded_width + width  # one past the last
        padded = self.pad(features)
        inside = self.pad(torch.ones_like(features[:1], dtype=torch.bool))[0]
        a, b = self.start, self.stop
        # Weights within e of the subnormal range are flushed to 0 (exp is 10x slower there).
        floor = math.log(torch.finfo(padded.dtype).tiny) + 1
        cutoff = 1.001 * math.exp(floor)
        inverse_tau = min(1 / tau, torch.finfo(padded.dtype).max)  # finite: 0 * inf would be NaN
        self.weights = padded.new_zeros(len(self.offsets), padded.shape[1])
        for o, s in enumerate(self.shifts):
            difference = padded[:, a:b] - padded[:, a + s:b + s]
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
        """:meth:`PatchGraph.propagate <lposs.propagation.PatchGraph.propagate>` over pixels:
        ``(C, H, W)`` class scores at the graph's image size and device in, ``(C, H, W)``
        refined scores in their dtype out (or ``(scores, info)``)."""
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
