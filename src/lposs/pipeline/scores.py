"""The scores of a result at the original size: a banded bilinear resize from the working
size, so that labelling a large image never holds a ``(C, H, W)`` array (METHOD.md, Output).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BAND_PIXELS, UNKNOWN

__all__ = ["BandResize", "ScoreMaps"]

# Floor for the propagated all-ones column that puts scores back on the cosine scale.
_MIN_NORMALISER = 1e-6


class BandResize:
    """Bilinear resize of ``(..., h, w)`` planes to ``(..., H, W)``, one band of output rows
    at a time, so that a large output never has to exist whole.

    The rule of ``F.interpolate(mode="bilinear", align_corners=False)``, one pass per axis
    (columns, then rows), each tap pair ``a * wa + (b * wb)`` with one rounding, as
    torch's vectorised CPU kernel computes it: within a float32 rounding of
    ``F.interpolate`` of the whole plane, on the CPU bit for bit at the sizes of real
    images. A band of every output row is ``F.interpolate`` itself.

    Args:
        source: ``(h, w)`` the planes' size.
        target: ``(H, W)`` the output size.
        device: where the index and weight tables live (the planes' device).
    """

    def __init__(self, source: tuple[int, int], target: tuple[int, int],
                 device: torch.device | str = "cpu") -> None:
        self.source = (int(source[0]), int(source[1]))
        self.target = (int(target[0]), int(target[1]))
        self._rows = _linear_taps(self.source[0], self.target[0], device)
        self._cols = _linear_taps(self.source[1], self.target[1], device)

    def bands(self, rows: int) -> list[tuple[int, int]]:
        """``(top, bottom)`` of consecutive bands of at most ``rows`` output rows."""
        return [(top, min(top + rows, self.target[0])) for top in range(0, self.target[0], rows)]

    def band(self, planes: Tensor, top: int, bottom: int) -> Tensor:
        """Output rows ``top:bottom`` of the resized ``planes``.

        Args:
            planes: ``(..., h, w)`` float32 planes (other float dtypes are cast).
            top, bottom: ``0 <= top < bottom <= H``.

        Returns:
            ``(..., bottom - top, W)`` float32, a new tensor on the planes' device.
        """
        if bottom - top == self.target[0]:  # the whole output: torch's kernel itself
            flat = planes.float().reshape(-1, 1, *self.source)
            out = F.interpolate(flat, size=self.target, mode="bilinear", align_corners=False)
            return out.reshape(*planes.shape[:-2], *self.target)
        r0, r1, rw0, rw1 = (t[top:bottom] for t in self._rows)
        first, last = int(r0[0]), int(r1[-1]) + 1  # the source rows this band reads
        planes = planes[..., first:last, :].float()
        c0, c1, cw0, cw1 = self._cols
        across = _lerp(planes.index_select(-1, c0), cw0, planes.index_select(-1, c1), cw1)
        return _lerp(across.index_select(-2, r0 - first), rw0[:, None],  # (..., rows, W)
                     across.index_select(-2, r1 - first), rw1[:, None])


def _linear_taps(n_in: int, n_out: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(i0, i1, w0, w1)``, each ``(n_out,)``: the two source indices and weights of
    bilinear resizing ``n_in`` values to ``n_out`` (``align_corners=False``), computed as
    ATen does in float32 (its ``area_pixel_compute_source_index``: ``scale * (i + 0.5) -
    0.5`` with one rounding, then ``guard_index_and_lambda``)."""
    scale = torch.tensor(float(n_in), dtype=torch.float32) / float(n_out)
    centres = torch.arange(n_out, dtype=torch.float64) + 0.5
    src = (scale.double() * centres - 0.5).float().clamp_min(0)  # one rounding, as a fused op
    i0 = src.floor().long().clamp_max(n_in - 1)
    w1 = (src - i0.float()).clamp(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device)


def _lerp(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor) -> Tensor:
    """``a * wa + (b * wb)`` in float32; ``addcmul`` fuses the outer multiply-add (one
    rounding) where the CPU or GPU has fused multiply-add, as torch's resize kernel does."""
    return torch.addcmul(b * wb, a, wa)


class ScoreMaps:
    """Per-class scores at the original size, resized from the working size on demand.

    The paper's output order (METHOD.md, Output): the raw propagated scores, reduced over
    each class's synonyms at working size (``raw``), are resized bilinearly to the
    original size, where their argmax gives the labels; the scores reported divide them
    by the resized propagated all-ones column (``ones``: the cosine scale, the same
    argmax). Everything at the original size is made in bands of rows (:class:`BandResize`).

    Args:
        raw: ``(C, h, w)`` float scores at the working size.
        ones: ``(h, w)`` the propagated all-ones column, or None (scores as they are).
        size: ``(H, W)`` the original size.
    """

    def __init__(self, raw: Tensor, ones: Tensor | None, size: tuple[int, int]):
        self.raw = raw
        self.ones = ones
        self.size = (int(size[0]), int(size[1]))
        self._resize = BandResize(tuple(raw.shape[-2:]), self.size, raw.device)
        height, width = self.size
        self._rows = height if height * width <= BAND_PIXELS else max(1, BAND_PIXELS // width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return (self.raw.shape[0], *self.size)

    def _ones_band(self, top: int, bottom: int) -> Tensor | None:
        if self.ones is None:
            return None
        return self._resize.band(self.ones, top, bottom).clamp_min_(_MIN_NORMALISER)

    @torch.inference_mode()
    def class_bands(self, c: int) -> Iterator[Tensor]:
        """Class ``c``'s scores (cosine scale) as consecutive ``(rows, W)`` float32 bands
        on the CPU, top to bottom."""
        for top, bottom in self._resize.bands(self._rows):
            band = self._resize.band(self.raw[c], top, bottom)
            ones = self._ones_band(top, bottom)
            yield (band if ones is None else band.div_(ones)).cpu()

    def class_scores(self, c: int) -> Tensor:
        """``(H, W)`` float32 scores of class ``c`` on the CPU (cosine scale)."""
        return torch.cat(list(self.class_bands(c)))

    def full(self) -> Tensor:
        """``(C, H, W)`` float32 scores of every class on the CPU."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for c in range(self.shape[0]):
            top = 0
            for band in self.class_bands(c):
                out[c, top:top + band.shape[0]] = band
                top += band.shape[0]
        return out

    @torch.inference_mode()
    def labels(self, unknown_threshold: float | None = None, *,
               dtype: torch.dtype = torch.int64) -> Tensor:
        """``(H, W)`` argmax over classes at the original size (first class on ties),
        ``UNKNOWN`` where the best score (cosine scale) is below ``unknown_threshold``.

        Args:
            unknown_threshold: the abstain threshold, or None.
            dtype: an integer dtype that holds ``C - 1`` and ``UNKNOWN`` (``torch.uint8``
                below 255 classes: an eighth of the memory of int64 on a large image).
        """
        labels = torch.empty(self.size, dtype=dtype)
        for top, bottom in self._resize.bands(self._rows):
            best = self._resize.band(self.raw[0], top, bottom)
            band = torch.zeros_like(best, dtype=dtype)
            for c in range(1, self.shape[0]):
                plane = self._resize.band(self.raw[c], top, bottom)
                band.masked_fill_(plane > best, c)
                torch.maximum(best, plane, out=best)
            if unknown_threshold is not None:
                ones = self._ones_band(top, bottom)
                if ones is not None:
                    best /= ones
                band.masked_fill_(best < unknown_threshold, UNKNOWN)
            labels[top:bottom] = band.cpu()
        return labels
