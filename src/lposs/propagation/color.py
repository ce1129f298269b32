"""Colour conversion for the pixel graph: sRGB to CIE L*a*b* (D65), in torch."""

from __future__ import annotations

import torch
from torch import Tensor

from .graph import check_shape

__all__ = ["rgb_to_lab"]

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
    check_shape(image, "image", (*image.shape[:-3], 3, None, None))
    rgb = image.clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,...jhw->...ihw", matrix / white[:, None], linear)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856).pow(1 / 3),
                    7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)
