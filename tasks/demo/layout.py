"""Where scenes and sites sit: one fixed UTM grid so every other module agrees on pixel <-> metre maps."""

from __future__ import annotations

from dataclasses import dataclass

from affine import Affine

CRS = "EPSG:32630"  # UTM 30N (Ghana)
PIXEL_M = 4.0
SITE_PX = 224
GAP_PX = 16
MARGIN_PX = 16
BAND_NAMES = ("B", "G", "R", "NIR")
ORIGIN_X = 600_000.0
ORIGIN_Y = 900_000.0
SCENES_PER_ROW = 5  # wrap long runs of scenes so large regions stay inside the UTM zone
SCENE_SPACING_M = 2_000.0  # empty ground between neighbouring scenes (they never overlap)


def scene_px(sites_per_side: int) -> int:
    """Scene width = height in pixels: margins + sites + gaps between sites."""
    return 2 * MARGIN_PX + sites_per_side * SITE_PX + (sites_per_side - 1) * GAP_PX


def scene_id(scene_idx: int) -> str:
    return f"scene_{scene_idx:03d}"


def site_id(site_idx: int) -> str:
    return f"S{site_idx:05d}"


@dataclass(frozen=True)
class SiteBox:
    """One site: its global index, scene, grid position and UTM square."""

    index: int
    scene_idx: int
    row: int
    col: int
    px_x: int  # column offset of the site's top-left pixel inside the scene
    px_y: int
    x0: float  # UTM bounds of the 224x224-px square
    y0: float
    x1: float
    y1: float

    @property
    def site_id(self) -> str:
        return site_id(self.index)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def cell_bounds(self) -> tuple[float, float, float, float]:
        """The square grown by half a gap: the ground this site "owns" when painting the scene."""
        h = GAP_PX / 2 * PIXEL_M
        return (self.x0 - h, self.y0 - h, self.x1 + h, self.y1 + h)

    @property
    def transform(self) -> Affine:
        return Affine(PIXEL_M, 0.0, self.x0, 0.0, -PIXEL_M, self.y1)


def scene_transform(scene_idx: int, sites_per_side: int) -> Affine:
    """North-up transform of a scene; scenes march east in rows of SCENES_PER_ROW, then south."""
    step = scene_px(sites_per_side) * PIXEL_M + SCENE_SPACING_M
    col, row = scene_idx % SCENES_PER_ROW, scene_idx // SCENES_PER_ROW
    return Affine(PIXEL_M, 0.0, ORIGIN_X + col * step, 0.0, -PIXEL_M, ORIGIN_Y - row * step)


def scene_sites(scene_idx: int, sites_per_side: int) -> list[SiteBox]:
    """Sites of one scene, row-major; global index = scene_idx * n^2 + row * n + col."""
    t = scene_transform(scene_idx, sites_per_side)
    out = []
    n = sites_per_side
    for r in range(n):
        for c in range(n):
            px_x = MARGIN_PX + c * (SITE_PX + GAP_PX)
            px_y = MARGIN_PX + r * (SITE_PX + GAP_PX)
            x0 = t.c + px_x * PIXEL_M
            y1 = t.f - px_y * PIXEL_M
            out.append(
                SiteBox(
                    index=scene_idx * n * n + r * n + c,
                    scene_idx=scene_idx,
                    row=r,
                    col=c,
                    px_x=px_x,
                    px_y=px_y,
                    x0=x0,
                    y0=y1 - SITE_PX * PIXEL_M,
                    x1=x0 + SITE_PX * PIXEL_M,
                    y1=y1,
                )
            )
    return out
