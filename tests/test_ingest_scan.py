"""Ingest's scan: the site windows computed without a rasterio transformer per window equal
``rasterio.windows.from_bounds`` exactly (the windows decide every tile and site grid)."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.errors import WindowError
from rasterio.windows import from_bounds

from tasks.ingest.imagery import _window_of_bounds


@pytest.mark.parametrize(
    "affine",
    [
        rasterio.Affine(4.0, 0.0, 600000.0, 0.0, -4.0, 900000.0),
        rasterio.Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5200020.0),
        rasterio.Affine(0.000269494585236, 0.0, -73.1, 0.0, -0.000269494585236, 45.3),
        rasterio.Affine(30.0, 0.0, 15.3, 0.0, 30.0, -700.7),  # rows growing north
    ],
)
def test_windows_equal_rasterio_from_bounds(affine):
    rng = np.random.default_rng(7)
    window = _window_of_bounds(affine)
    for _ in range(500):
        x0, y0 = affine @ (rng.uniform(-50, 5000), rng.uniform(-50, 5000))
        x1, y1 = affine @ (rng.uniform(-50, 5000), rng.uniform(-50, 5000))
        left, right, bottom, top = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        try:
            w = from_bounds(left, bottom, right, top, transform=affine)
        except WindowError:
            with pytest.raises(WindowError):
                window(left, bottom, right, top)
            continue
        got = window(left, bottom, right, top)
        assert got == (w.col_off, w.row_off, w.width, w.height)
        assert [round(v) for v in got] == [round(v) for v in (w.col_off, w.row_off, w.width, w.height)]
