"""Learn stage units: network, determinism, checkpoints, targets, vectorising, thresholds, folds, pixels."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
import torch
from shapely.geometry import box

from tasks.learn.data import (
    band_stats,
    consensus_target,
    consensus_weight,
    gold_target,
    instance_edges,
    read_site,
)
from tasks.learn.model import (
    CLASSES,
    ModelConfig,
    UNet,
    load_checkpoint,
    predict,
    save_checkpoint,
    seed_everything,
    train,
)
from tasks.learn.params import LearnParams
from tasks.learn.tiles import DiskExample, read_rows
from tasks.learn.train import Example, assign_folds, class_coverage, crop_batches
from tasks.learn.vectorise import best_iou, choose_threshold, instance_confidence, instances, polygons
from tasks.store.grid import SiteGrid

GRID = SiteGrid("S1", "EPSG:32630", (4.0, 0.0, 600000.0, 0.0, -4.0, 900000.0), 40, 32)


def px_box(c0, r0, c1, r1):
    """A box covering pixel columns c0..c1-1 and rows r0..r1-1 of GRID."""
    return box(600000 + 4 * c0, 900000 - 4 * r1, 600000 + 4 * c1, 900000 - 4 * r0)


def random_batches(seed, n=2, size=32):
    rng = np.random.default_rng(seed)
    while True:
        yield (
            rng.normal(size=(n, 4, size, size)).astype(np.float32),
            rng.integers(0, 3, size=(n, size, size)),
            rng.random((n, size, size)).astype(np.float32),
        )


def small_model(seed=0):
    seed_everything(seed)
    return UNet(ModelConfig(base_width=4, depth=2))


def test_forward_shapes_and_padding():
    model = UNet(ModelConfig(base_width=4, depth=3))
    assert model(torch.zeros(2, 4, 64, 64)).shape == (2, 3, 64, 64)
    prob = predict(
        model, np.random.default_rng(0).normal(size=(3, 4, 50, 70)).astype(np.float32), batch_size=2
    )
    assert prob.shape == (3, 3, 50, 70) and prob.dtype == np.float32
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    assert CLASSES == ("background", "interior", "boundary")


def test_same_seed_same_weights_after_training():
    def trained(seed):
        model = small_model(seed)
        losses = train(model, random_batches(seed), steps=4, class_weights=(1.0, 1.0, 2.0))
        return model.state_dict(), losses

    (a, la), (b, lb), (c, _) = trained(0), trained(0), trained(1)
    assert la == lb and all(np.isfinite(la))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = small_model()
    train(model, random_batches(0), steps=2)
    card = {
        "classes": list(CLASSES),
        "normalisation": {"mean": [1.0] * 4, "std": [2.0] * 4},
        "nan": float("nan"),
    }
    save_checkpoint(tmp_path / "model.pt", model, card)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)  # plain tensors and builtins only
    assert set(raw) == {"state_dict", "config", "card"}
    loaded, card2 = load_checkpoint(tmp_path / "model.pt")
    assert card2["classes"] == list(CLASSES) and loaded.config == model.config
    x = np.random.default_rng(1).normal(size=(2, 4, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(predict(model, x), predict(loaded, x))


def test_gold_target_interior_boundary_and_tile_border():
    left, right = px_box(0, 4, 10, 20), px_box(10, 4, 22, 20)  # touching at column 10
    t = gold_target(GRID, [left, right], boundary_px=1)
    assert set(np.unique(t)) == {0, 1, 2}
    assert (t[4:20, 9] == 2).all() and (t[4:20, 10] == 2).all()  # both sides of the shared edge
    assert (t[8:16, 3:7] == 1).all()  # interior
    assert (t[8:16, 0] == 1).all()  # the tile border is not a field edge
    assert (t[:4] == 0).all() and (t[:, 22:] == 0).all()


def test_consensus_target_takes_internal_edges_from_voters():
    prob = np.zeros((GRID.height, GRID.width), np.float32)
    prob[4:20, 0:22] = 1.0  # the consensus merges the two touching fields into one region
    left, right = px_box(0, 4, 10, 20), px_box(10, 4, 22, 20)
    merged = px_box(0, 4, 22, 20)
    p = LearnParams()
    split = consensus_target(prob, [[left, right], [left, right], [merged]], GRID, p)
    assert (split[4:20, 10] == 2).all()  # 2 of 3 voters drew the shared edge
    one = consensus_target(prob, [[left, right], [merged], [merged]], GRID, p)
    assert (one[8:16, 10] == 1).all()  # 1 of 3 is below the vote share
    assert (one[4:20, 21] == 2).all()  # the consensus outline itself is always a boundary
    risk = np.array([[0.0, 0.25, 0.5, np.nan]], np.float32)
    np.testing.assert_allclose(consensus_weight(risk), [[1.0, 0.5, 0.0, 0.0]])


def test_vectorise_splits_two_touching_fields_via_the_boundary_class():
    t = gold_target(GRID, [px_box(0, 4, 10, 20), px_box(10, 4, 22, 20)], boundary_px=1)
    prob = np.stack([t == c for c in range(3)]).astype(np.float32) * 0.9 + 0.1 / 3
    ids = instances(prob, grow_px=2, min_px=12)
    assert ids.max() == 2
    polys = polygons(ids, GRID)
    assert all(isinstance(g, shapely.Polygon) for g in polys)
    assert polys[0].touches(polys[1])  # grown back over the boundary: adjacent, not overlapping
    areas = sorted(round(g.area / 16) for g in polys)
    assert areas == [160, 192]  # 10x16 and 12x16 px: the whole fields
    conf = instance_confidence(ids, prob)
    assert np.all((conf > 0.9) & (conf <= 1.0))
    no_boundary = prob.copy()
    no_boundary[1] += no_boundary[2]
    no_boundary[2] = 0
    assert instances(no_boundary).max() == 1  # without the boundary class they merge
    nan = prob.copy()
    nan[:, :, :] = np.nan
    assert instances(nan).max() == 0  # nodata everywhere: no field


def test_best_iou():
    a = np.zeros((4, 6), np.int32)
    b = np.zeros((4, 6), np.int32)
    a[:, :3], a[:, 3:] = 1, 2
    b[:, :4] = 1
    bp, bt = best_iou(a, b)
    np.testing.assert_allclose(bp, [12 / 16, 4 / 24])
    np.testing.assert_allclose(bt, [12 / 16])


def test_threshold_reaches_target_precision():
    rng = np.random.default_rng(0)
    conf = rng.random(2000)
    tp = rng.random(2000) < conf  # precision rises with confidence
    out = choose_threshold(conf, tp, n_targets=1500, target_precision=0.9, min_support=20)
    kept = conf >= out["threshold"]
    assert out["precision"] >= 0.9 and tp[kept].mean() == pytest.approx(out["precision"])
    assert out["n_polygons"] == kept.sum() and out["recall"] == pytest.approx(tp[kept].sum() / 1500)
    lower = conf[conf < out["threshold"]].max()
    assert tp[conf >= lower].mean() < 0.9  # the lowest threshold that reaches the target
    none = choose_threshold(conf, np.zeros(2000, bool), 10, 0.9, 20)
    assert none["threshold"] == float("inf") and np.isnan(none["precision"]) and none["n_polygons"] == 0
    few = choose_threshold(np.array([0.9, 0.8]), np.array([True, True]), 2, 0.9, 20)
    assert few["threshold"] == float("inf")  # two polygons are not evidence enough


def test_folds_deterministic_stratified_and_order_free():
    ids = [f"S{i:03d}" for i in range(30)]
    roles = ["gold"] * 6 + ["multi"] * 12 + ["single"] * 12
    f = assign_folds(ids, roles, 3, seed=0)
    assert f == assign_folds(ids[::-1], roles[::-1], 3, seed=0)
    assert f != assign_folds(ids, roles, 3, seed=1)
    for role in ("gold", "multi", "single"):
        counts = np.bincount([f[i] for i, r in zip(ids, roles, strict=True) if r == role], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_crop_batches_pad_small_tiles_and_skip_weightless_sites():
    small = Example(
        "a", "gold", np.ones((4, 20, 24), np.float32), np.ones((20, 24), np.uint8), np.ones((20, 24))
    )
    dead = Example(
        "b", "gold", np.ones((4, 40, 40), np.float32), np.ones((40, 40), np.uint8), np.zeros((40, 40))
    )
    x, y, w = next(crop_batches([small, dead], batch=3, crop=32, seed=0))
    assert x.shape == (3, 4, 32, 32) and w.sum() == 3 * 20 * 24  # padding carries weight 0
    coverage, notes = class_coverage([small])
    assert coverage["boundary"] == 0 and any("'boundary' never seen" in n for n in notes)


def test_tiles_on_disk_give_the_same_crops_and_batches_as_tiles_in_memory(tmp_path):
    """Training reads crops from the scratch folder: the same rows and columns as slicing the arrays,
    at the tile's edges too, so a seed draws the same batches (hence the same weights) either way."""
    rng = np.random.default_rng(3)
    tiles = []
    for i, (h, w) in enumerate([(40, 36), (20, 24), (33, 50)]):
        grid = SiteGrid(f"S{i}", GRID.crs, GRID.transform, w, h)
        x = rng.normal(size=(4, h, w)).astype(np.float32)
        target = rng.integers(0, 3, (h, w)).astype(np.uint8)
        weight = rng.random((h, w)).astype(np.float32)
        for name, arr in (("x", x), ("target", target), ("weight", weight), ("valid", weight > 0.1)):
            np.save(tmp_path / f"S{i}.{name}.npy", arr)
        mem = Example(f"S{i}", "gold", x, target, weight)
        disk = DiskExample(f"S{i}", "gold", str(tmp_path), grid, 4, float(weight.sum()), 1.0)
        assert disk.hw == mem.hw and disk.mass == mem.mass
        for r0, c0 in [(0, 0), (h - 5, w - 3), (7, 11)]:
            for a, b in zip(disk.crop(r0, c0, 16), mem.crop(r0, c0, 16), strict=True):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(read_rows(disk.path("x"), -3, h + 4), x)  # clipped to the tile
        tiles.append((mem, disk))
    from_mem = crop_batches([m for m, _ in tiles], batch=3, crop=32, seed=5)
    from_disk = crop_batches([d for _, d in tiles], batch=3, crop=32, seed=5)
    for _ in range(4):
        for a, b in zip(next(from_mem), next(from_disk), strict=True):
            np.testing.assert_array_equal(a, b)


def test_large_allocations_reused_only_under_the_nannys_malloc_setting():
    """Dask's nanny exports MALLOC_TRIM_THRESHOLD_ (training 1.5x slower); the mmap threshold is raised
    in such a process only (a fresh interpreter each, since mallopt changes the whole process)."""
    import os
    import subprocess
    import sys

    code = "from tasks.learn.train import reuse_large_allocations as r; print(r())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    out = [
        subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True)
        for e in (env, {**env, "MALLOC_TRIM_THRESHOLD_": "65536"})
    ]
    assert [o.stdout.strip() for o in out] == ["False", "True"]


def test_read_site_masks_nodata_and_cloud(tmp_path):
    arr = np.full((4, 32, 40), 1000, np.uint16)
    arr[:, :4, :] = 0  # nodata rows
    arr[:3, 10:12, 5:9] = 9000  # bright in B, G, R: cloud
    path = tmp_path / "scene.tif"
    profile = dict(driver="GTiff", width=40, height=32, count=4, dtype="uint16", crs=GRID.crs, nodata=0)
    with rasterio.open(path, "w", transform=GRID.affine, **profile) as dst:
        dst.write(arr)
        dst.descriptions = ("B", "G", "R", "NIR")
    px = read_site(str(path), GRID, np.full(4, 1000, np.float32), np.full(4, 10, np.float32), None)
    assert px.x.shape == (4, 32, 40) and not px.valid[:4].any() and not px.valid[10:12, 5:9].any()
    assert px.valid.sum() == 32 * 40 - 4 * 40 - 8 and np.all(px.x[:, ~px.valid] == 0)
    assert instance_edges(np.ones((5, 5), np.int32)).sum() == 0  # the tile border is no edge


def test_band_stats_pool_tiles_exactly():
    import pandas as pd

    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 2, (4, 300)), rng.normal(20, 5, (4, 100))
    tiles = pd.DataFrame(
        {
            "site_id": ["a", "b", "b"],
            "scene_id": ["s1", "s1", "s2"],
            "mean": [a.mean(1).tolist(), b.mean(1).tolist(), [np.nan] * 4],
            "std": [a.std(1).tolist(), b.std(1).tolist(), [np.nan] * 4],
            "valid_fraction": [1.0, 1.0, 0.0],
            "width": [20, 10, 10],
            "height": [15, 10, 10],
            "band_names": [["B", "G", "R", "NIR"]] * 3,
        }
    )
    sites = pd.DataFrame({"site_id": ["a", "b"], "scene_id": ["s1", "s1"]})
    mean, std, names = band_stats(tiles, sites)
    both = np.concatenate([a, b], axis=1)
    np.testing.assert_allclose(mean, both.mean(1), rtol=1e-5)
    np.testing.assert_allclose(std, both.std(1), rtol=1e-5)
    assert names == ["B", "G", "R", "NIR"]


def test_gpu_benchmark_runs_on_cpu_with_torch_and_numpy_only(tmp_path):
    """The device check imports the pipeline's model.py and nothing the GPU machine lacks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    blocked = [
        "prefect",
        "dask",
        "distributed",
        "rasterio",
        "geopandas",
        "pandas",
        "pydantic",
        "shapely",
        "scipy",
    ]
    args = "--device cpu --size 32 --infer-batch 2 --train-size 32 --train-batch 2 --configs tiny:4:2"
    argv = ["gpu_pseudolabel.py", *args.split(), "--seconds", "0.2", "--json", str(tmp_path / "r.json")]
    code = (
        f"import sys, runpy; sys.modules.update(dict.fromkeys({blocked!r})); sys.argv = {argv!r};"
        f"runpy.run_path({str(repo / 'benchmarks' / 'gpu_pseudolabel.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tiny" in out.stdout and "tiles/s" in out.stdout and "bf16: skipped" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    run = result["runs"][0]
    assert run["train_steps_per_s"] > 0 and run["infer_tiles_per_s"] > 0 and run["predict_tiles_per_s"] > 0
