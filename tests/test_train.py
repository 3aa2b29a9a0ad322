"""Training end to end on a tiny generated scene: the loss falls, runs are reproducible,
a split run resumed equals an uninterrupted one, and the checkpoint loads on its own."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import from_origin
from safetensors.numpy import load_file

from unet_flax.checkpoint import load_checkpoint
from unet_flax.train import TrainResult, load_train_workflow, train

CLASSES = [{"code": 10, "name": "water", "color": "#1f78b4"}, {"code": 20, "name": "forest", "color": "#33a02c"},
           {"code": 30, "name": "bare", "color": "#b07b4f"}]
SIGNATURES = np.array([[600, 700, 400, 300], [300, 600, 350, 3000], [1200, 1500, 1900, 2500]])


def write_scene(folder: Path, size: int = 64) -> tuple[Path, Path]:
    """Three classes in bands of rows with per-pixel noise, a no-data corner, sparse labels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    classes = ((xx + 2 * yy) // 24) % 3
    image = SIGNATURES[classes].transpose(2, 0, 1) + rng.normal(0, 150, (4, size, size))
    image = np.clip(image, 1, 10000).astype(np.uint16)
    image[:, :8, :8] = 0
    labels = np.array([10, 20, 30], np.uint8)[classes]
    labels[rng.random((size, size)) < 0.3] = 0  # "unlabelled"
    labels[:8, :8] = 255
    profile = {"driver": "GTiff", "width": size, "height": size, "crs": CRS.from_epsg(32633),
               "transform": from_origin(600000.0, 5000000.0, 10.0, 10.0)}
    with rasterio.open(folder / "tiny.tif", "w", count=4, dtype="uint16", nodata=0, **profile) as dst:
        dst.write(image)
    (folder / "labels").mkdir()
    with rasterio.open(folder / "labels" / "tiny.tif", "w", count=1, dtype="uint8", nodata=255, **profile) as dst:
        dst.write(labels, 1)
    return folder / "tiny.tif", folder / "labels" / "tiny.tif"


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_scene(folder)
    data = {
        "name": "tiny",
        "data": {"pairs": [{"image": "tiny.tif", "labels": "labels/tiny.tif"}], "ignore": [0]},
        "classes": CLASSES,
        "architecture": {"depth": 2, "base_width": 4},
        "loss": {"kind": "ce+dice", "class_weights": "balanced"},
        "optimizer": {"lr": 0.01, "warmup": 3, "steps": 24},
        "sampling": {"patch": 32, "batch": 4},
        "validation": {"mode": "strips", "strips": 4, "fold": 3, "gap": 2, "every": 8},
        "output": {"checkpoint": "run/tiny.safetensors"},
        "seed": 7,
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(workflow: Path, out: str, **kwargs) -> TrainResult:
    cfg = load_train_workflow(workflow, [f"output.checkpoint={workflow.parent / out / 'tiny.safetensors'}"])
    return train(cfg, progress=False, **kwargs)


@pytest.fixture(scope="module")
def first(workflow) -> TrainResult:
    return run(workflow, "a")


def arrays(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    assert left.keys() == right.keys()
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def test_loss_falls_and_validation_is_recorded(first):
    history = yaml.safe_load(first.metrics.read_text())["history"]
    assert [h["step"] for h in history] == [8, 16, 24]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert first.best["mean_iou"] == max(h["mean_iou"] for h in history)
    assert first.best["pixel_accuracy"] > 0.5


def test_metrics_count_only_labelled_holdout_pixels(first):
    metrics = yaml.safe_load(first.metrics.read_text())
    confusion = np.array(metrics["best"]["confusion"])
    assert confusion.sum() == metrics["holdout_pixels"] == metrics["best"]["pixels"]
    with rasterio.open(first.checkpoint.parents[1] / "labels" / "tiny.tif") as src:
        labels = src.read(1)
    strip = labels[:, 48:]
    assert metrics["holdout_pixels"] == int(np.isin(strip, [10, 20, 30]).sum())


def test_same_seed_gives_identical_weights(first, workflow):
    second = run(workflow, "b")
    assert_same_arrays(first.last_state, second.last_state)
    assert_same_arrays(first.checkpoint, second.checkpoint)


def test_a_resumed_run_equals_an_uninterrupted_one(first, workflow):
    half = run(workflow, "c", until=12)
    assert half.steps == 12
    resumed = run(workflow, "c", resume=half.checkpoint)
    assert resumed.steps == 24
    assert_same_arrays(first.last_state, resumed.last_state)
    assert_same_arrays(first.checkpoint, resumed.checkpoint)
    assert yaml.safe_load(resumed.metrics.read_text())["history"] == yaml.safe_load(first.metrics.read_text())["history"]


def test_checkpoint_is_self_describing_and_loads_alone(first):
    loaded = load_checkpoint(first.checkpoint)
    card = loaded.card
    assert [(c.code, c.name, c.color) for c in card.classes] == [(c["code"], c["name"], c["color"]) for c in CLASSES]
    assert card.band_names == ("band1", "band2", "band3", "band4")
    assert card.unet.depth == 2 and card.unet.in_bands == 4
    assert 300 < card.mean[3] < 3000 and all(s > 0 for s in card.std)
    assert card.training["step"] == first.best["step"]
    assert card.training["workflow"]["loss"]["class_weights"] == "balanced"
    assert {"jax", "flax", "optax"} <= set(card.versions)
    logits = loaded.model(np.zeros((1, 32, 32, 4), np.float32))
    assert logits.shape == (1, 32, 32, 3)


def test_sample_workflow_twin_trains(tmp_path):
    """The committed sample workflow, shrunk to a few steps of a tiny model."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_train_workflow(root / "workflows" / "sample-train.yaml", [
        "architecture.depth=2", "architecture.base_width=4", "optimizer.steps=2", "optimizer.warmup=1",
        "sampling.patch=32", "sampling.batch=2", f"output.checkpoint={tmp_path / 'sample.safetensors'}",
    ])
    assert [p.image.name for p in cfg.data.scene_pairs()] == ["scene_a.tif", "scene_b.tif", "scene_c.tif"]
    result = train(cfg, progress=False)
    card = load_checkpoint(result.checkpoint).card
    assert card.band_names == ("blue", "green", "red", "nir")
    assert [c.name for c in card.classes] == ["water", "forest", "cropland", "built-up", "bare soil"]


def test_a_trained_checkpoint_runs_in_tilepipe_run_with_no_other_file(first, workflow, tmp_path):
    from pipeline.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "tiny.tif").write_bytes((workflow.parent / "tiny.tif").read_bytes())
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "input": {"dir": "in"}, "output": {"dir": "out"}, "model": {"checkpoint": str(first.checkpoint)},
        "bands": [1, 2, 3, 4], "tiling": {"tile": 32, "halo": 16, "batch": 2},
        "runtime": {"compilation_cache": None},
    }))
    assert main(["run", str(run_yaml), "--no-progress"]) == 0
    with rasterio.open(tmp_path / "out" / "tiny.tif") as out, rasterio.open(workflow.parent / "tiny.tif") as src:
        classes = out.read(1)
        assert out.transform == src.transform and out.crs == src.crs
    assert set(np.unique(classes)) <= {10, 20, 30, 255}
    assert (classes[:8, :8] == 255).all() and (classes[8:, 8:] != 255).all()
