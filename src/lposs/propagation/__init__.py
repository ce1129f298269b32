"""Label propagation: LPOSS over the patches of all windows, LPOSS+ over the pixels.

Tensor in, tensor out, on the device of the inputs; no model code. Both stages solve
``(I - alpha * S) X = Y`` for every class column of ``Y``, ``S = D^-1/2 W D^-1/2`` the
normalised affinity of a graph, by conjugate gradient truncated at ``max_iter`` iterations
(:mod:`.solver`; graphs in :mod:`.patch_graph` and :mod:`.pixel_graph`; see ``METHOD.md``).
The names ``patch_graph``/``pixel_graph`` here are the functions, not their modules.
"""

from .color import rgb_to_lab
from .patch_graph import PatchGraph, knn_affinity, normalized_adjacency, patch_propagation
from .patch_graph import patch_graph as patch_graph
from .pixel_graph import PixelGraph, pixel_affinity, pixel_propagation
from .pixel_graph import pixel_graph as pixel_graph
from .solver import CGInfo, conjugate_gradient

__all__ = ["CGInfo", "PatchGraph", "PixelGraph", "conjugate_gradient", "knn_affinity",
           "normalized_adjacency", "patch_graph", "patch_propagation", "pixel_affinity",
           "pixel_graph", "pixel_propagation", "rgb_to_lab"]
