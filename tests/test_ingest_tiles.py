"""The ingest ``tiles`` phase (strip sweeps read inside Dask tasks) against the previous implementation.

The reference below is the tiles code this path replaced, kept verbatim where it computes: each tile a
slice of the scene opened as a Dask-chunked xarray (rioxarray), padded with the fill outside the scene,
summarised by the previous ``_stats`` (its content hash now XXH3-128 of the same bytes and shape instead
of BLAKE2b). The new path must give the same table, bit for bit (content hash,
fractions and every per-band statistic), on the demo region, on the real rasters and on synthetic scenes
with other block layouts, dtypes and nodata values, for windows anywhere over and past the scene edges.
"""

from __future__ import annotations

import pickle
import tracemalloc
from functools import partial
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray
import xxhash
from distributed import Client, LocalCluster

from schemas.catalog import load_catalog
from tasks import memory
from tasks.ingest import pixels, tile_summary, tiles
from tasks.ingest.imagery import open_scene, site_windows
from tasks.ingest.labels import normalise_sites
from tasks.ingest.readers import read_vector
from tasks.ingest.tiles import cloud_dn, scene_tasks, tile_stats, visible_bands
from tasks.store.errors import InputError

IMAGERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "imagery"
needs_real = pytest.mark.skipif(not IMAGERY.is_dir(), reason=f"real data not found at {IMAGERY}")
FLOATS = ("nodata_fraction", "cloud_fraction", "valid_fraction", "mean", "std", "p02", "p50", "p98")


# ---- the previous implementation (reference) ---------------------------------------------------------
_PERCENTILES = (2, 50, 98)
_Q = np.true_divide(np.asarray(_PERCENTILES), 100)
_HIST_OFFSET = {"uint8": 0, "uint16": 0, "int8": 128, "int16": 32768}


def _lerp(a, b, t):
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _hist_summary(flat, keep, n_keep, offset):
    bands, n = flat.shape
    if offset:
        flat = flat.astype(np.int32) + offset
    size = int(flat.max()) + 1
    hist = np.empty((bands, size), np.int64)
    if n_keep == n:
        for b in range(bands):
            hist[b] = np.bincount(flat[b], minlength=size)
    elif 2 * n_keep >= n:
        drop = flat.compress(~keep, axis=1)
        for b in range(bands):
            hist[b] = np.bincount(flat[b], minlength=size) - np.bincount(drop[b], minlength=size)
    else:
        kept = flat.compress(keep, axis=1)
        for b in range(bands):
            hist[b] = np.bincount(kept[b], minlength=size)
    v = np.arange(size, dtype=np.int64)
    s1, s2 = (hist @ v).tolist(), (hist @ (v * v)).tolist()
    m = n_keep
    mean = [(s - offset * m) / m for s in s1]
    std = [float(np.sqrt((m * q - s * s) / (m * m))) for s, q in zip(s1, s2, strict=True)]
    vi = (m - 1) * _Q
    prev = np.floor(vi)
    above = vi >= m - 1
    ks = np.concatenate([np.where(above, m - 1, prev), np.where(above, m - 1, prev + 1)]).astype(np.int64)
    gamma = vi - np.where(above, -1, prev)
    cum = np.cumsum(hist, axis=1)
    order = np.array([np.searchsorted(cum[b], ks, side="right") for b in range(bands)], np.float64) - offset
    k = len(gamma)
    return mean, std, _lerp(order[:, :k].T, order[:, k:].T, gamma[:, None])


def _reference_stats(arr, nodata, vis_idx, cloud_dn, pad):
    arr = np.ascontiguousarray(arr)
    bands = arr.shape[0]
    if nodata is None:
        data_mask = np.ones(arr.shape[1:], bool)
    elif np.isnan(nodata):
        data_mask = ~np.isnan(arr).any(axis=0)
    else:
        data_mask = ~(arr == nodata).any(axis=0)
    (top, bottom), (left, right) = pad
    if top or bottom or left or right:
        inside = np.zeros_like(data_mask)
        inside[top : arr.shape[1] - bottom, left : arr.shape[2] - right] = True
        data_mask &= inside
    if vis_idx:
        vis_mean = np.add.reduce(arr[vis_idx], axis=0, dtype=np.float32) / np.float32(len(vis_idx))
        cloud = data_mask & (vis_mean > cloud_dn)
    else:
        cloud = np.zeros_like(data_mask)
    valid = data_mask & ~cloud
    n = arr.shape[1] * arr.shape[2]
    n_data = int(data_mask.sum())
    out = {
        "nodata_fraction": 1.0 - n_data / n,
        "cloud_fraction": float(cloud.sum() / n_data) if n_data else 0.0,
        "valid_fraction": float(valid.sum() / n),
        "content_hash": xxhash.xxh3_128(arr.tobytes() + str(arr.shape).encode()).hexdigest(),
    }
    n_valid = int(np.count_nonzero(valid))
    if n_valid:
        flat, keep = arr.reshape(bands, -1), valid.reshape(-1)
        offset = _HIST_OFFSET.get(arr.dtype.name)
        if offset is not None and n_valid < 2**31:
            mean, std, q = _hist_summary(flat, keep, n_valid, offset)
        else:
            px = arr[:, valid].astype(np.float64)
            q = np.percentile(px, _PERCENTILES, axis=1)
            mean, std = px.mean(axis=1).tolist(), px.std(axis=1).tolist()
        out.update(mean=mean, std=std)
        out.update({f"p{p:02d}": q[i].tolist() for i, p in enumerate(_PERCENTILES)})
    else:
        nan = [float("nan")] * bands
        out.update(mean=nan, std=nan, **{f"p{p:02d}": nan for p in _PERCENTILES})
    return out


def _reference_tiles(pairs: pd.DataFrame, scenes: dict, threshold) -> pd.DataFrame:
    """Every tile as a slice of the scene's lazy rioxarray array, padded off the scene, old statistics."""
    stats = []
    arrays = {}
    for p in pairs.itertuples(index=False):
        sc = scenes[p.scene_id]
        if p.scene_id not in arrays:
            arrays[p.scene_id] = rioxarray.open_rasterio(
                sc.path, chunks={"band": -1, "y": 256, "x": 2048}, lock=False, cache=False, masked=False
            ).data
        r0, r1 = max(p.row_off, 0), min(p.row_off + p.height, sc.height)
        c0, c1 = max(p.col_off, 0), min(p.col_off + p.width, sc.width)
        pad = ((r0 - p.row_off, p.row_off + p.height - r1), (c0 - p.col_off, p.col_off + p.width - c1))
        if r1 <= r0 or c1 <= c0:
            tile = np.empty((sc.count, max(r1 - r0, 0), max(c1 - c0, 0)), sc.dtype)
        else:
            tile = arrays[p.scene_id][:, r0:r1, c0:c1].compute(scheduler="sync")
        fill = sc.nodata if sc.nodata is not None else 0
        if any(any(x) for x in pad):
            tile = np.pad(tile, ((0, 0), *pad), constant_values=fill)
        vis = visible_bands(sc.band_names)
        stats.append(_reference_stats(tile, sc.nodata, vis, cloud_dn(sc.dtype, threshold), pad))
    out = pairs[["site_id", "scene_id", "crs", "transform", "width", "height"]].reset_index(drop=True).copy()
    out["band_names"] = [list(scenes[s].band_names) for s in out.scene_id]
    return pd.concat([out, pd.DataFrame(stats)], axis=1)


def _bits(value) -> list[int]:
    """A float or a list of floats as their IEEE bit patterns (NaN == NaN, 0.0 != -0.0)."""
    return np.asarray(value, dtype=np.float64).view(np.int64).tolist()


def _assert_identical(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for col in want.columns:
        for i, (a, b) in enumerate(zip(got[col], want[col], strict=True)):
            where = f"{col} of row {i} ({want['site_id'].iloc[i]})"
            if col in FLOATS:
                assert type(a) is type(b) and _bits(a) == _bits(b), f"{where}: {a!r} != {b!r}"
            elif col in ("transform", "band_names"):
                assert list(a) == list(b), where
            else:
                assert a == b, f"{where}: {a!r} != {b!r}"


# ---- scenes and windows --------------------------------------------------------------------------------
def _pairs(scene, windows, prefix="W") -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "site_id": f"{prefix}{i:04d}",
                "scene_id": scene.scene_id,
                "crs": scene.crs,
                "col_off": c,
                "row_off": r,
                "width": w,
                "height": h,
                "transform": [float(i), 0.0, 0.0, 0.0, -1.0, 0.0],
                "coverage": 1.0,
            }
            for i, (r, c, h, w) in enumerate(windows)
        ]
    )


def _random_windows(rng, height: int, width: int, n: int, largest: int) -> list[tuple[int, int, int, int]]:
    """(row_off, col_off, height, width): anywhere over the scene, past its edges, or just touching one."""
    out = []
    for _ in range(n):
        h, w = int(rng.integers(1, largest + 1)), int(rng.integers(1, largest + 1))
        out.append((int(rng.integers(-h + 1, height)), int(rng.integers(-w + 1, width)), h, w))
    out += [(-7, 3, 7, 5), (height, 0, 4, 4), (2, width, 3, 9), (-2, -3, height + 5, width + 6)]
    return out


def _write(path: Path, data: np.ndarray, nodata, **layout) -> None:
    profile = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": "EPSG:32633",
        "transform": rasterio.Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0),
        "nodata": nodata,
        **layout,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


SYNTHETIC = {
    # name: dtype, nodata, band names, GeoTIFF layout
    "u16_tiled_pixel": (
        "uint16",
        0,
        ["B", "G", "R", "NIR"],
        {"tiled": True, "blockxsize": 64, "blockysize": 32},
    ),
    "u8_striped": ("uint8", None, ["red", "green", "blue"], {"tiled": False, "blockysize": 3}),
    "i16_tiled_band": (
        "int16",
        -9999,
        ["b02", "b03", "b04", "nir"],
        {"tiled": True, "blockxsize": 48, "blockysize": 80, "interleave": "band", "compress": "deflate"},
    ),
    "f32_nan_striped": (
        "float32",
        float("nan"),
        ["blue", "green", "red"],
        {"tiled": False, "compress": "lzw"},
    ),
}


def _synthetic_scene(folder: Path, name: str, rng) -> str:
    dtype, nodata, names, layout = SYNTHETIC[name]
    shape = (len(names), 203, 171)
    if dtype == "float32":
        data = rng.uniform(0.0, 0.8, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -3000), min(info.max, 9000), shape, endpoint=True).astype(dtype)
    if nodata is not None:
        data[:, 20:45, 10:90] = nodata
        data[1, 100:140, 50:60] = nodata  # one band's nodata: the pixel is nodata in every band
    path = folder / f"{name}.tif"
    _write(path, data, nodata, **layout)
    return str(path)


# ---- equal to the previous implementation --------------------------------------------------------------
def _demo_pairs(demo_root: Path):
    cat = load_catalog(demo_root / "data_catalog.yaml")
    s, ds = cat.settings, cat.datasets
    paths = sorted((demo_root / "inputs" / "imagery").glob("*.tif"))
    scenes = [open_scene(str(p), s.ingest.band_names, s.ingest.required_bands) for p in paths]
    sp = cat.input_path("input_sites")
    sites = normalise_sites(read_vector(sp, ds["input_sites"].columns, ds["input_sites"].constants), sp)
    return site_windows(sites, scenes, sp), {sc.scene_id: sc for sc in scenes}, s.ingest.cloud_threshold


def test_demo_region_tiles_equal_the_previous_implementation(demo_root, monkeypatch):
    pairs, scenes, threshold = _demo_pairs(demo_root)
    want = _reference_tiles(pairs, scenes, threshold)
    assert (want["cloud_fraction"] > 0).any() and (want["nodata_fraction"] > 0).any()
    _assert_identical(tile_stats(pairs, scenes, threshold), want)
    # The same with every tile summarised in the reading thread, and with a helper thread per task,
    # with one task per three tiles.
    monkeypatch.setattr(tiles, "SECTION_TILES", 3)
    assert len(scene_tasks(pairs, scenes)) == sum(-(-n // 3) for n in pairs.groupby("scene_id").size())
    for threads in (0, 1):
        _assert_identical(tile_stats(pairs, scenes, threshold, threads=threads), want)


@needs_real
@pytest.mark.parametrize(
    "name, band_names, threshold",
    [
        ("landsat_rgb_byte.tif", ["R", "G", "B"], None),  # uint8, nodata 0, cloud screening at 220
        ("landsat_rgb_byte.tif", ["R", "G", "B"], 90.0),
        ("sentinel2_austria_8band.tif", None, None),  # 8 unnamed bands, no nodata value
        ("spacenet_sample.tif", None, None),  # one panchromatic band
    ],
)
def test_real_rasters_random_windows_equal_the_previous_implementation(name, band_names, threshold):
    scene = open_scene(str(IMAGERY / name), band_names, 1)
    rng = np.random.default_rng(sum(map(ord, name)))
    pairs = _pairs(scene, _random_windows(rng, scene.height, scene.width, 60, 300))
    got = tile_stats(pairs, {scene.scene_id: scene}, threshold)
    _assert_identical(got, _reference_tiles(pairs, {scene.scene_id: scene}, threshold))


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_other_layouts_and_dtypes_equal_the_previous_implementation(name, tmp_path, monkeypatch):
    """Striped and tiled files, pixel and band interleaving, int16/uint8/float32, nodata value/NaN/none;
    short strips so that tiles span several of them and tasks split a scene."""
    rng = np.random.default_rng(sum(map(ord, name)))
    scene = open_scene(_synthetic_scene(tmp_path, name, rng), SYNTHETIC[name][2], 1)
    pairs = _pairs(scene, _random_windows(rng, scene.height, scene.width, 70, 90))
    monkeypatch.setattr(pixels, "STRIP_ROWS", 24)
    monkeypatch.setattr(tiles, "SECTION_TILES", 25)
    for threshold, threads in ((None, 0), (2000.0, 1)):
        want = _reference_tiles(pairs, {scene.scene_id: scene}, threshold)
        _assert_identical(tile_stats(pairs, {scene.scene_id: scene}, threshold, threads=threads), want)


DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_mean_and_nodata_masks_equal_the_float32_reduce(dtype):
    """The band-by-band masks give what the whole-array expressions give, to the bit, at the extremes of
    each dtype (where an int32 sum would have to be exact for float32 to agree)."""
    rng = np.random.default_rng(len(dtype))
    n = 5000
    if np.dtype(dtype).kind == "f":
        flat = rng.uniform(-1e6, 1e6, (5, n)).astype(dtype)
        flat[:, :3] = np.array([np.finfo(dtype).max / 8, 1e-30, -3.5], dtype)
    else:
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, (5, n), endpoint=True).astype(dtype)
        flat[:, :4] = np.array([info.max, info.min, info.max - 1, 0], dtype)
    mean = np.empty(n, np.float32)
    for vis in ([0], [0, 1, 2], [1, 3, 4], [0, 1, 2, 3, 4]):
        tile_summary._visible_mean(flat, vis, mean)
        want = np.add.reduce(flat[vis], axis=0, dtype=np.float32) / np.float32(len(vis))
        assert mean.tobytes() == want.tobytes(), vis
    value = flat[2, 7]
    hits, out = np.empty(n, bool), np.empty(n, bool)
    got = tile_summary._any_band(flat, lambda band, out: np.equal(band, value, out=out), hits, out)
    assert np.array_equal(got, (flat == value).any(axis=0)) and got.sum() >= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_cloud_mask_equals_the_float32_mean_test_at_the_threshold(dtype):
    """The cloud mask gives ``float32 mean > dn`` to the bit: for thresholds equal to means that occur,
    just around them, between two of them, past the extremes, and NaN. Pixels of at most 16 bits go
    through the compiled kernel (an exact integer sum against the least sum that passes, with a nodata
    value and padding beside), the others through ``_bright``."""
    rng = np.random.default_rng(7 + len(dtype))
    h, w = 40, 100
    n = h * w
    if np.dtype(dtype).kind == "f":
        flat = rng.uniform(-1e4, 1e4, (4, n)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, (4, n), endpoint=True).astype(dtype)
        flat[:, :2] = np.array([info.max, info.min], dtype)
    small = dtype in ("uint8", "int8", "uint16", "int16")
    nodata = int(flat[1, 17])
    pad = ((2, 3), (0, 5))
    nod = (flat == nodata).any(axis=0).reshape(h, w)
    nod[:2] = nod[h - 3 :] = nod[:, w - 5 :] = True
    nod = nod.reshape(-1)
    out, mean = np.empty(n, bool), np.empty(n, np.float32)
    keep, acc = np.empty(n, bool), np.empty(n, np.int64)
    for vis in ([2], [0, 1, 2], [0, 1, 2, 3]):
        want_mean = np.add.reduce(flat[vis], axis=0, dtype=np.float32) / np.float32(len(vis))
        some = [float(x) for x in want_mean[[0, 1, 5, 9]]]
        dns = [*some, *(float(np.nextafter(np.float32(x), np.float32(np.inf))) for x in some)]
        dns += [*(float(np.nextafter(np.float32(x), np.float32(-np.inf))) for x in some), some[2] + 0.3]
        dns += [220.0, 4500.0, -1e9, 1e9, float("nan")]
        for dn in dns:
            want = want_mean > dn
            if small:
                counts = tile_summary._small_int_masks(flat, w, pad, nodata, vis, dn, keep, acc)
                assert np.array_equal(keep, ~(nod | want)), (vis, dn)
                assert counts == (nod.sum(), (nod | want).sum()), (vis, dn)
            else:
                assert np.array_equal(tile_summary._bright(flat, vis, dn, out, mean), want), (vis, dn)
        assert 0 < (want_mean > some[2]).sum() < n  # the data straddles a threshold tested above


def test_helper_threads_follow_the_scheduler():
    """A helper thread per task only while tasks are fewer than the scheduler's threads."""
    with dask.config.set(scheduler="sync"):
        assert tiles.scheduler_threads() == 1
    with dask.config.set(scheduler="threads", num_workers=3):
        assert tiles.scheduler_threads() == 3
    assert [tiles.helper_threads(n, 2) for n in (1, 2, 5)] == [1, 0, 0]


# ---- how a task reads --------------------------------------------------------------------------------
def _sweep_rows_held(pl: pixels.Plan) -> int:
    """The most strips a sweep holds at once (as ``pixels.sweep`` keeps and drops them)."""
    held, most = set(), 0
    for s in pl.reads:
        held.add(s)
        most = max(most, len(held))
        held = {t for t in held if t >= pl.keep_from[s]}
    return most


@pytest.mark.parametrize("block", [(256, 256), (3, 400), (64, 32), (2000, 2000)])
def test_each_block_is_read_once_and_a_task_holds_a_strip_not_the_scene(block):
    rng = np.random.default_rng(block[0])
    height, width = 1936, 1500
    windows = [w for w in _random_windows(rng, height, width, 150, 224) if w[2] <= 224]
    job = pixels.SceneTiles(
        path="scene.tif",
        height=height,
        width=width,
        count=4,
        dtype="uint16",
        block_h=block[0],
        block_w=block[1],
        fill=0,
        windows=tuple(windows),
        names=tuple(str(i) for i in range(len(windows))),
    )
    pl = pixels.plan(job)
    S = pl.strip_rows
    assert S >= pixels.STRIP_ROWS and (S % block[0] == 0 or block[0] > S)
    covered = np.zeros((height, width), np.int32)
    for s, spans in pl.reads.items():
        r0, r1 = pl.rows(s, height)
        assert r1 - r0 <= S
        for a, b in spans:
            assert a % block[1] == 0 and (b % block[1] == 0 or b == width)
            covered[r0:r1, a:b] += 1
    assert covered.max() == 1  # no pixel (so no block) is read twice by the task
    for (r0, r1, c0, c1), first in zip(pl.inside, pl.first, strict=True):
        if first >= 0:
            assert (covered[r0:r1, c0:c1] == 1).all()  # every tile pixel is read
    tallest = max(h for _, _, h, _ in windows)
    assert _sweep_rows_held(pl) <= -(-tallest // S) + 1  # about a tile's height plus a strip
    assert len(pickle.dumps(job)) < 20_000  # the graph carries windows, never pixels


@pytest.mark.parametrize("threads", [0, 1])
def test_a_sweep_never_holds_the_scene(tmp_path, threads):
    """Peak Python-side memory of a sweep over a 16 MB scene: a few strips and tiles, not the scene."""
    height, width = 4096, 2048
    data = (np.add.outer(np.arange(height), np.arange(width)) % 4000 + 1).astype("uint16")[None]
    path = tmp_path / "big.tif"
    _write(path, data, 0, tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    scene = open_scene(str(path), ["nir"], 1)
    rng = np.random.default_rng(3)
    windows = [(int(r), int(c), 224, 224) for r, c in rng.integers(-100, width - 100, (120, 2)) * (2, 1)]
    job = scene_tasks(_pairs(scene, windows), {scene.scene_id: scene})[0][0]
    summarise = partial(tiles._summarise, nodata=0, vis_idx=[], dn=cloud_dn("uint16", None))
    pixels.sweep(job, summarise, threads)  # warm up GDAL and this thread's scratch buffers
    tracemalloc.start()
    try:
        stats = pixels.sweep(job, summarise, threads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(stats) == len(windows) and all(s["content_hash"] for s in stats)
    strip, tile = 256 * width * data.itemsize, 224 * 224 * data.itemsize
    scratch = 16 * 224 * 224  # a helper thread's masks, float32 means and intp histogram input
    allowed = 3 * strip + (pixels._QUEUE + 2) * tile + scratch + 2**20
    assert peak < allowed < data.nbytes / 2, (peak, allowed)


def test_truncated_scene_names_the_file_and_window(make_catalog, tmp_path):
    make_catalog(tmp_path)
    pairs, scenes, threshold = _demo_pairs(tmp_path)
    scene = scenes["scene_001"]
    data = Path(scene.path).read_bytes()
    Path(scene.path).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        tile_stats(pairs, scenes, threshold)
    err = exc.value
    assert err.path == scene.path
    assert "corrupt or truncated imagery" in err.reason and "pixel window rows" in err.reason
    assert "site 'S" in err.reason


# ---- on a cluster of worker processes -------------------------------------------------------------------
def test_on_worker_processes_same_table_and_the_same_error(demo_root, make_catalog, tmp_path):
    pairs, scenes, threshold = _demo_pairs(demo_root)
    want = tile_stats(pairs, scenes, threshold)
    make_catalog(tmp_path)
    bad_pairs, bad_scenes, _ = _demo_pairs(tmp_path)
    path = Path(bad_scenes["scene_000"].path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as lc,
        Client(lc),
    ):
        _assert_identical(tile_stats(pairs, scenes, threshold), want)
        with pytest.raises(InputError) as exc:
            tile_stats(bad_pairs, bad_scenes, threshold)
    assert exc.value.path == str(path) and "pixel window rows" in exc.value.reason


_FAULTS = """
import resource, sys, time
import numpy as np
from tasks import memory
memory.RELEASE_AFTER_S = 0.3

def faults(keep):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with memory.keep_freed_memory() if keep else open("/dev/null"):
        for _ in range(100):
            np.ones(1 << 20, np.uint8).sum()  # 1 MiB allocated, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults(False)
faults(True)
kept = faults(True)  # the next sweep right after the last: its freed pages are still there
time.sleep(1.0)  # past RELEASE_AFTER_S: thresholds set back, memory returned
print(plain, kept, faults(False))
"""


@pytest.mark.skipif(not hasattr(memory._libc(), "mallopt"), reason="glibc only")
def test_sweeps_keep_freed_memory_on_a_worker_with_malloc_trim_threshold():
    """With ``MALLOC_TRIM_THRESHOLD_`` set (as Dask's nanny sets it), every freed 1 MiB block is unmapped and
    faulted in again (256 pages each time) unless a sweep's ``keep_freed_memory`` is active; a sweep right
    after another reuses its pages, and once no sweep has run for ``RELEASE_AFTER_S`` glibc's thresholds
    are back (blocks unmapped again)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    plain, kept, released = map(int, out.stdout.split())
    assert plain > 100 * 200 and kept < plain / 10 and released > plain / 2, (plain, kept, released)
