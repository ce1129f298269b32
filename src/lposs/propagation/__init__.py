"""Label propagation, tensor in, tensor out, no model code: LPOSS over patches, LPOSS+ over
pixels, each solving ``(I - alpha * S) X = Y`` by truncated conjugate gradient (METHOD.md).
``patch_graph``/``pixel_graph`` here are the functions, not their modules.
"""

from .color import rgb_to_lab
from .patch_graph import PatchGraph, knn_affinity, normalized_adjacency, patch_propagation
from .patch_graph import patch_graph as patch_graph
from .pixel_graph import PixelGraph, pixel_features, pixel_propagation
from .pixel_graph import pixel_graph as pixel_graph
from .solver import CGInfo, conjugate_gradient

__all__ = ["CGInfo", "PatchGraph", "PixelGraph", "conjugate_gradient", "knn_affinity",
           "normalized_adjacency", "patch_graph", "patch_propagation", "pixel_features",
           "pixel_graph", "pixel_propagation", "rgb_to_lab"]
