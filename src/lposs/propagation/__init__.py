"""Label propagation: LPOSS over the patches of all windows, LPOSS+ over the pixels.

Tensor in, tensor out, on whatever device the inputs live on; no model code. Both stages
solve ``(I - alpha * S) X = Y`` for every class column of ``Y``, where
``S = D^-1/2 W D^-1/2`` is the symmetrically normalised affinity ``W`` of a graph, with a
conjugate-gradient solve truncated at ``max_iter`` iterations (see ``METHOD.md``).

One concept per module:

* :mod:`.solver`: the multi-right-hand-side conjugate gradient and its :class:`CGInfo`;
* :mod:`.patch_graph`: kNN affinity, normalised adjacency, :class:`PatchGraph`;
* :mod:`.pixel_graph`: Lab pixel affinity, :class:`PixelGraph` (product by :mod:`.stencil`);
* :mod:`.color`: sRGB to CIE Lab.

The public names are re-exported here (and from ``lposs``); the function names
``patch_graph``/``pixel_graph`` here are the functions, not their modules.
"""

from .color import rgb_to_lab
from .patch_graph import PatchGraph, knn_affinity, normalized_adjacency, patch_propagation
from .patch_graph import patch_graph as patch_graph
from .pixel_graph import PixelGraph, pixel_affinity, pixel_propagation
from .pixel_graph import pixel_graph as pixel_graph
from .solver import CGInfo, conjugate_gradient

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
