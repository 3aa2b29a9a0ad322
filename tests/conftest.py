"""Shared factories: small real rasters in tmp_path, a tiny checkpoint, a workflow writer."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.transform import from_origin

from unet_flax.card import ClassInfo, ModelCard
from unet_flax.checkpoint import save_checkpoint
from unet_flax.model import UNetConfig, create_unet

CRSS = {
    "utm": (CRS.from_epsg(32633), from_origin(500000.0, 4650000.0, 10.0, 10.0)),
    "geographic": (CRS.from_epsg(4326), from_origin(12.5, 41.9, 0.0001, 0.0001)),
    "webmercator": (CRS.from_epsg(3857), from_origin(1391493.6, 5146011.7, 9.5, 9.5)),
}


def write_raster(path: Path, data: np.ndarray, *, crs: str | None = "utm", nodata=None, tiled: bool = True,
                 mask: np.ndarray | None = None) -> Path:
    """A GeoTIFF of ``data`` (bands, rows, cols); ``mask`` (rows, cols) writes an internal mask."""
    count, height, width = data.shape
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name, nodata=nodata)
    if crs is not None:
        profile.update(crs=CRSS[crs][0], transform=CRSS[crs][1])
    if tiled and width >= 16 and height >= 16:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask is not None:
            dst.write_mask(mask.astype(np.uint8) * 255)
    return path


def open_memfds(name: str) -> list[int]:
    """This process's open descriptors of anonymous files named ``name`` (``memfd_create``)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if f"/memfd:{name}" in os.readlink(f"/proc/self/fd/{fd}"):
                fds.append(int(fd))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(fds)


def scene(height: int, width: int, bands: int = 4, dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    """Smooth, spatially coherent test imagery in the value range of ``dtype``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    layers = []
    for b in range(bands):
        fx, fy, phase = rng.uniform(0.02, 0.15, 2).tolist() + [rng.uniform(0, 6.28)]
        layers.append(np.sin(xx * fx + phase) * np.cos(yy * fy) + 0.3 * rng.standard_normal((height, width)))
    x = np.stack(layers)
    x = (x - x.min()) / (np.ptp(x) + 1e-9)
    if dtype == "uint8":
        return (1 + x * 250).astype(np.uint8)
    if dtype == "int16":
        return (x * 20000 - 5000).astype(np.int16)
    if dtype == "uint16":
        return (100 + x * 9000).astype(np.uint16)
    return (x * 0.6).astype(np.float32)


TINY = UNetConfig(in_bands=4, num_classes=3, depth=2, base_width=4)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random U-Net (factor 4, receptive radius 26) with a full model card."""
    model = create_unet(TINY, seed=3)
    model.eval()
    card = ModelCard(
        name="tiny", unet=TINY, band_names=("blue", "green", "red", "nir"),
        classes=(ClassInfo(0, "water", "#1f78b4"), ClassInfo(1, "forest", "#33a02c"), ClassInfo(2, "bare", "#b07b4f")),
        mean=(0.5, 0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25, 0.25),
    )
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture
def make_workflow(tmp_path, tiny_checkpoint):
    """Write a workflow YAML for ``input_dir`` with the tiny model; returns its path."""

    def make(input_dir: Path, **sections) -> Path:
        data = {
            "name": "test",
            "input": {"dir": str(input_dir)},
            "output": {"dir": str(tmp_path / "out")},
            "model": {"checkpoint": str(tiny_checkpoint)},
            "bands": [1, 2, 3, 4],
            "normalise": {"scale": 1 / 10000},
            "tiling": {"tile": 32, "halo": 28, "batch": 4},
            "runtime": {"compilation_cache": str(tmp_path / "jax-cache")},
        }
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / "workflow.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


class SignalledInFinaliser:
    """An object whose finaliser is where a signal's handler runs: there Python prints the
    handler's exception and drops it, as it did in a Dask future's ``__del__`` mid-run."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self) -> None:
        signal.raise_signal(self.signum)  # its handler runs before this returns


@pytest.fixture
def dropped(monkeypatch):
    """The exceptions Python drops (its unraisable hook), kept for the test to look at."""
    kept = []
    monkeypatch.setattr(sys, "unraisablehook", kept.append)
    return kept
