"""The compiled CPU kernel of :mod:`lposs.propagation.stencil` (numba; compiled once, cached
on disk)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, fastmath=True, boundscheck=False, cache=True)
def stencil_tiles(x, w, shifts, start, stop, out, tile):
    """``out[:, start:stop] = x - S x`` (see :mod:`.stencil`), ``tile`` pixels at a time.

    Args: ``x`` ``(C, Np)``, ``w`` ``(O, Np)``, ``shifts`` ``(O,)`` int64, ``out`` ``(C, Np)``;
    the weights of a tile (``O x tile``) and its accumulators (``C x tile``) stay in cache.
    """
    classes, offsets = x.shape[0], shifts.shape[0]
    acc = np.empty((classes, tile), dtype=x.dtype)
    for a in range(start, stop, tile):
        b = min(a + tile, stop)
        n = b - a
        acc[:, :n] = 0
        # Two offsets per pass over the tile's accumulators: fewer loads and stores each.
        for o in range(0, offsets - 1, 2):
            s, u = shifts[o], shifts[o + 1]
            ws, ws_back = w[o, a:b], w[o, a - s:b - s]
            wu, wu_back = w[o + 1, a:b], w[o + 1, a - u:b - u]
            for c in range(classes):
                xs, xs_back = x[c, a + s:b + s], x[c, a - s:b - s]
                xu, xu_back = x[c, a + u:b + u], x[c, a - u:b - u]
                row = acc[c]
                for i in range(n):
                    row[i] += (ws[i] * xs[i] + ws_back[i] * xs_back[i]
                               + wu[i] * xu[i] + wu_back[i] * xu_back[i])
        if offsets % 2:
            s = shifts[offsets - 1]
            ws, ws_back = w[offsets - 1, a:b], w[offsets - 1, a - s:b - s]
            for c in range(classes):
                xs, xs_back = x[c, a + s:b + s], x[c, a - s:b - s]
                row = acc[c]
                for i in range(n):
                    row[i] += ws[i] * xs[i] + ws_back[i] * xs_back[i]
        for c in range(classes):
            xc, oc, row = x[c, a:b], out[c, a:b], acc[c]
            for i in range(n):
                oc[i] = xc[i] - row[i]
