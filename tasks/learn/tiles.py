"""Training tiles on disk: written once per train-stage run, read back a crop or a site at a time.

Holding every labelled tile in memory made the train stage's memory grow with the number of sites
(about 0.8 MB a site: normalised pixels, targets, weights). Instead the stage writes each site's arrays
once, as ``.npy`` files in a scratch folder of the version draft (shared storage, so a fold trained on
another Dask worker reads the same bytes), and training reads the rows of each random crop with plain
file reads. Not ``np.memmap``: mapped pages count in the process's resident memory; read pages stay in
the page cache, which the kernel reclaims. The bytes are the arrays the in-memory path had, so the crops,
hence the trained weights, are identical.

Writing them (reading each site's window, rasterising its target) is CPU work a site at a time: chunks of
sites fan out as Dask tasks on the CPU workers, each reading only its own sites' label rows. The card's
``data_hash`` is therefore a hash of per-site digests (in site order), which any chunking gives alike.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.learn.inputs import CHUNK
from tasks.learn.site_inputs import chunk_inputs, chunks
from tasks.learn.train import Example, class_sums
from tasks.parallel import FanOut, cluster_scheduler
from tasks.store.grid import SiteGrid

SCRATCH = ".train-tiles"  # inside the version draft; removed when the stage ends
ARRAYS = ("x", "target", "weight", "valid")


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-order ``.npy`` file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (
            np.lib.format.read_array_header_1_0(f)
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0(f)
        )
        if fortran:
            raise ValueError(f"{path}: Fortran-order arrays are not written here")
        return shape, dtype, f.tell()


def read_rows(path: Path, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` (second-to-last axis) of an ``(..., H, W)`` ``.npy`` array, by explicit reads:
    one contiguous read per leading index (one per band of a tile)."""
    shape, dtype, offset = _npy_layout(path)
    *lead, h, w = shape
    r0, r1 = max(0, r0), min(h, r1)
    out = np.empty((*lead, r1 - r0, w), dtype)
    flat = out.reshape(-1, r1 - r0, w)
    row = w * dtype.itemsize
    with open(path, "rb", buffering=0) as f:
        for i in range(flat.shape[0]):
            f.seek(offset + (i * h + r0) * row)
            if f.readinto(memoryview(flat[i]).cast("B")) != flat[i].nbytes:
                raise OSError(f"{path}: short read")
    return out


@dataclass(frozen=True)
class DiskExample:
    """A labelled site's training tile on disk; duck-types ``train.Example`` for ``crop_batches``."""

    site_id: str
    role: str
    folder: str
    grid: SiteGrid
    channels: int
    mass: float  # float(weight.sum()), as Example.mass
    valid_fraction: float

    @property
    def hw(self) -> tuple[int, int]:
        return self.grid.height, self.grid.width

    def path(self, name: str) -> Path:
        return Path(self.folder) / f"{self.site_id}.{name}.npy"

    def crop(self, r0: int, c0: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols = slice(c0, c0 + size)
        return tuple(read_rows(self.path(n), r0, r0 + size)[..., cols] for n in ("x", "target", "weight"))

    def read(self, name: str) -> np.ndarray:
        """One whole array (``x``, ``target``, ``weight`` or ``valid``)."""
        return np.load(self.path(name))

    def load(self) -> Example:
        return Example(self.site_id, self.role, self.read("x"), self.read("target"), self.read("weight"))


@dataclass
class TileSummary:
    """What the stage needs of all tiles without keeping any: per-site records and running totals."""

    examples: list[DiskExample]
    usable: list[DiskExample]
    class_sums: list[list]  # per usable site, ``train.class_sums`` (float32 sums, summed later in order)
    masked: int  # nodata/cloud pixels of every labelled tile (weight 0, output NaN)
    pixels: int
    data_hash: str  # blake2b-128 of the usable sites' digests (``SiteTile.digest``), in order


@dataclass(frozen=True)
class SiteTile:
    """One site's tile as written: its record, whether it trains, and what the summary needs of it."""

    example: DiskExample
    usable: bool
    class_sums: list | None  # usable sites only
    masked: int
    pixels: int
    digest: bytes  # blake2b-128 of (site id, x, target, weight)


def write_tiles(inp, site_ids: list[str], params, folder: Path) -> TileSummary:
    """Write every site's tile into ``folder`` (see ``write_tile_chunk``), ``CHUNK`` sites per Dask task on
    the CPU workers when the stage runs on a Dask worker (``tasks.parallel.FanOut``: each task gets its
    sites' rows, not the region's tables), else here; then sum up in site order, so the summary does
    not depend on where or in what order the chunks ran."""
    if folder.exists():
        shutil.rmtree(folder)  # left by an interrupted run
    folder.mkdir(parents=True)
    with cluster_scheduler() as client:
        run = FanOut(client)
        parts = [
            run.cpu(write_tile_chunk, chunk_inputs(inp, c), c, params, str(folder))
            for c in chunks(site_ids, CHUNK)
        ]
        (parts,) = run.compute(parts)
    tiles = [t for part in parts for t in part]
    h = hashlib.blake2b(digest_size=16)
    usable = [t for t in tiles if t.usable]
    for t in usable:
        h.update(t.digest)
    return TileSummary(
        [t.example for t in tiles],
        [t.example for t in usable],
        [t.class_sums for t in usable],
        sum(t.masked for t in tiles),
        sum(t.pixels for t in tiles),
        h.hexdigest(),
    )


def write_tile_chunk(inp, site_ids: list[str], params, folder: str) -> list[SiteTile]:
    """Write each site's normalised pixels, target classes, weights (target weight x validity) and
    validity mask into ``folder``, one site in memory at a time; a site is usable for training when
    enough of it is valid and some pixel carries weight."""
    out = []
    for site_id in site_ids:
        px = inp.pixels(site_id)
        target, weight = inp.target(site_id, params)
        weight = weight * px.valid
        for name, arr in zip(ARRAYS, (px.x, target, weight, px.valid), strict=True):
            np.save(Path(folder) / f"{site_id}.{name}.npy", np.ascontiguousarray(arr))
        ex = DiskExample(
            site_id,
            inp.role(site_id),
            str(folder),
            inp.grids[site_id],
            int(px.x.shape[0]),
            float(weight.sum()),
            float(px.valid.mean()),
        )
        usable = ex.valid_fraction >= params.min_valid_fraction and ex.mass > 0
        h = hashlib.blake2b(digest_size=16)
        for part in (site_id.encode(), px.x, target, weight):
            h.update(part)
        out.append(
            SiteTile(
                ex,
                usable,
                class_sums(target, weight) if usable else None,
                int((~px.valid).sum()),
                int(px.valid.size),
                h.digest(),
            )
        )
    return out


def remove_tiles(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def scratch_folder(version_dir: Path) -> Path:
    return Path(version_dir) / SCRATCH
