"""Tests for lposs.propagation.color against the textbook formulas written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_propagation import reference_lab

from lposs.propagation.color import rgb_to_lab


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]],
                       dtype=torch.float64).T[:, None, :]
    expected = [[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [87.73, -86.18, 83.18],
                [32.30, 79.19, -107.86], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(rgb_to_lab(rgb)[:, 0].T.numpy(), expected, atol=0.02)
    image = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(rgb_to_lab(image)[1].numpy(), reference_lab(image[1].numpy()),
                               atol=1e-9)


def test_rgb_to_lab_needs_three_channels():
    with pytest.raises(ValueError, match="image"):
        rgb_to_lab(torch.rand(4, 5, 6))
