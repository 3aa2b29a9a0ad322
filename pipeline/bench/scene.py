"""What the bench runs on: a randomly initialised U-Net, generated uint16 GeoTIFFs stored as an
archive's files are (blocks, compression), and tiles of them read as a worker reads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench.options import BenchOptions
from pipeline.bench.timing import best_time


def make_checkpoint(path: Path, arch: tuple[int, int, int, int], seed: int = 0) -> Path:
    """A randomly initialised U-Net of ``arch`` with a full model card."""
    from unet_flax.card import ClassInfo, ModelCard
    from unet_flax.checkpoint import save_checkpoint
    from unet_flax.model import UNetConfig, create_unet

    depth, width, bands, classes = arch
    config = UNetConfig(in_bands=bands, num_classes=classes, depth=depth, base_width=width)
    model = create_unet(config, seed=seed)
    model.eval()
    palette = [f"#{(37 * i) % 256:02x}{(91 * i) % 256:02x}{(173 * i) % 256:02x}" for i in range(classes)]
    card = ModelCard(name=f"bench-{depth}x{width}", unet=config, band_names=tuple(f"b{i + 1}" for i in range(bands)),
                     classes=tuple(ClassInfo(i, f"class{i}", palette[i]) for i in range(classes)),
                     mean=(0.5,) * bands, std=(0.25,) * bands)
    save_checkpoint(path, model, card)
    return path


SCENE_DTYPE = "uint16"
"""The dtype of :func:`write_scene`'s bands, which batches of it are sent in."""


SCENE_COMPRESSIONS = ("deflate", "lzw", "zstd", "none")
"""Compressions :func:`write_scene` offers (``--compress``): what archives commonly hold."""


def write_scene(path: Path, size: int, bands: int, seed: int = 0, block: int = 256,
                compress: str = "deflate") -> Path:
    """A ``size`` x ``size`` uint16 GeoTIFF, tiled in ``block`` x ``block`` blocks and
    ``compress``-ed, written a row of blocks (at least 512 rows) at a time, so the whole scene is
    never in memory."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if block <= 0 or block % 16:
        raise ValueError(f"block must be a positive multiple of 16 (a GeoTIFF's tiles), got {block}")
    if compress not in SCENE_COMPRESSIONS:
        raise ValueError(f"compress must be one of {', '.join(SCENE_COMPRESSIONS)}, got {compress!r}")
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.005, 0.05, (bands, 2))
    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype=SCENE_DTYPE, tiled=True,
                   blockxsize=block, blockysize=block, crs=CRS.from_epsg(32633),
                   transform=from_origin(500000.0, 4650000.0, 10.0, 10.0),
                   **({} if compress == "none" else {"compress": compress}))
    strip = -(-512 // block) * block
    xx = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, strip):
            h = min(strip, size - row)
            yy = np.arange(row, row + h, dtype=np.float32)[:, None]
            data = np.empty((bands, h, size), np.uint16)
            for b in range(bands):
                wave = np.sin(xx * freqs[b, 0]) * np.cos(yy * freqs[b, 1])
                noise = rng.normal(0, 0.15, (h, size)).astype(np.float32)
                data[b] = np.clip(4000 + 3000 * (wave + noise), 0, 65535).astype(np.uint16)
            dst.write(data, window=Window(0, row, size, h))
    return path


def make_scenes(work: Path, opts: BenchOptions, bands: int) -> tuple[Path, Path]:
    """The folder the end-to-end runs read, and the scene in it (``opts.size``, stored as
    ``opts.block`` and ``opts.compress`` say), with ``opts.scenes - 1`` more names of it."""
    scene_dir = work / "scene"
    scene_dir.mkdir(exist_ok=True)
    scene = write_scene(scene_dir / "scene.tif", opts.size, bands, block=opts.block, compress=opts.compress)
    for i in range(2, opts.scenes + 1):
        _link_or_copy(scene, scene_dir / f"scene-{i}.tif")
    return scene_dir, scene


def _link_or_copy(source: Path, dest: Path) -> None:
    """``dest`` as another name of ``source`` where the file system allows, else a copy."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def scene_layout(scene: Path, bands: int, opts: BenchOptions) -> dict[str, Any]:
    """How the generated scene is stored, and the chunks it is decoded in (:mod:`pipeline.chunks`)."""
    import rasterio

    from pipeline.chunks import ChunkReader

    with rasterio.open(scene) as src:
        grid = ChunkReader.of(src, range(1, bands + 1)).grid
    return {"size": opts.size, "bands": bands, "dtype": SCENE_DTYPE, "block": opts.block,
            "compress": opts.compress, "chunk": [grid.rows, grid.cols],
            "chunks": grid.count}


def scene_batch(scene: Path, spec: Any, batch: int, card: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """The first ``batch`` tiles of ``scene`` as a worker reads them (values and validity), and
    the normaliser the device applies to them: :meth:`pipeline.infer.Predictor.put`'s arguments."""
    import rasterio

    from pipeline.io import Normaliser
    from pipeline.reading import read_tiles
    from pipeline.windows import plan_tiles

    bands = range(1, card.unet.in_bands + 1)
    normaliser = Normaliser((1 / 10000,) * len(bands), (0.0,) * len(bands), card.mean, card.std)
    with rasterio.open(scene) as src:
        tiles = plan_tiles(src.width, src.height, spec)
    read = read_tiles(str(scene), [tiles[i % len(tiles)] for i in range(batch)], bands, spec.read_size)
    return read.x, read.valid, normaliser


def checksum_rate(scene: Path, pixels: int, repeats: int = 3) -> dict[str, Any]:
    """How fast the scene file is checksummed (:func:`pipeline.checksums.file_checksum`, on the
    run's one checksum thread, beside the inference): in bytes, and in pixels of output a
    second, which no run of such files can outpace."""
    from pipeline.checksums import ALGORITHM, file_checksum

    seconds = best_time(lambda: file_checksum(scene), 0.0, repeats)
    return {"checksum": ALGORITHM, "checksum_gb_per_s": scene.stat().st_size / seconds / 1e9,
            "checksum_mpx_per_s": pixels / seconds / 1e6}
