"""Write the three sample scenes and their label rasters, seeded and byte-reproducible.

Run ``python sample_tiles/make_samples.py [OUT_DIR]``; without an argument it rewrites the
committed files next to this script. Each scene is a 4-band uint16 surface-reflectance
image (blue, green, red, nir; reflectance x 10000) in UTM zone 33N at 10 m, with five land
cover classes in spatially coherent patches and a slanted no-data wedge along one edge, as
at the swath edge of a real Landsat or Sentinel-2 scene. Labels are uint8 class codes 0..4
on the same grid, 255 where the image is no-data.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

BAND_NAMES = ("blue", "green", "red", "nir")
CLASSES = (
    (0, "water", "#1f78b4"),
    (1, "forest", "#33a02c"),
    (2, "cropland", "#e6c84c"),
    (3, "built-up", "#e31a1c"),
    (4, "bare soil", "#b07b4f"),
)
IMAGE_NODATA = 0
LABEL_NODATA = 255
CRS_UTM33N = CRS.from_epsg(32633)
PIXEL = 10.0

# Mean surface reflectance x 10000 of each class in blue, green, red, nir.
SIGNATURES = np.array(
    [
        [620, 780, 520, 310],     # water: dark, NIR absorbed
        [310, 580, 340, 3100],    # forest: dark visible, bright NIR
        [480, 880, 620, 3700],    # cropland (green crop); stripes mix in soil
        [1050, 1150, 1250, 1850],  # built-up: bright, flat spectrum
        [1180, 1480, 1880, 2480],  # bare soil: rising towards red and NIR
    ],
    dtype=np.float64,
)
# Spatially smooth within-class variation (reflectance x 10000, per class).
TEXTURE = np.array([25.0, 110.0, 90.0, 120.0, 100.0])


@dataclasses.dataclass(frozen=True)
class Scene:
    """One sample scene: size, upper-left corner in UTM metres, seed and wedge side."""

    stem: str
    height: int
    width: int
    west: float
    north: float
    seed: int
    wedge: str  # "left", "right", "top" or "bottom"


SCENES = (
    Scene("scene_a", 512, 512, 500_000.0, 5_300_000.0, 11, "left"),
    Scene("scene_b", 300, 400, 512_340.0, 5_286_120.0, 22, "right"),
    Scene("scene_c", 457, 333, 493_870.0, 5_311_450.0, 33, "bottom"),
)


def smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with periodic edges via the FFT, rescaled to unit standard deviation."""
    h, w = field.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(field) * kernel, s=(h, w))
    return (out - out.mean()) / (out.std() + 1e-12)


def class_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Class codes 0..4 as the argmax of smoothed noise fields, water rarer and smoother."""
    scales = (28.0, 22.0, 18.0, 12.0, 16.0)
    bias = (-0.55, 0.15, 0.2, -0.25, -0.2)
    fields = [smooth(rng.standard_normal((h, w)), s) + b for s, b in zip(scales, bias)]
    return np.argmax(np.stack(fields), axis=0).astype(np.uint8)


def crop_stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """True on crop rows, False on the bare soil between them, in field parcels of random
    row direction, spacing and cover."""
    cell = 48
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rows, cols = -(-h // cell), -(-w // cell)
    angle = rng.uniform(0, np.pi, (rows, cols))
    period = rng.uniform(5.0, 11.0, (rows, cols))
    phase = rng.uniform(0, 2 * np.pi, (rows, cols))
    cover = rng.uniform(-0.6, 0.2, (rows, cols))
    iy, ix = (yy // cell).astype(int), (xx // cell).astype(int)
    a, p = angle[iy, ix], period[iy, ix]
    wave = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / p + phase[iy, ix])
    return wave > cover[iy, ix]


def reflectance(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """Float reflectance x 10000, shape (4, h, w), with class-specific texture.

    Within-class variation is spatially smooth (soil moisture, canopy density), cropland
    has rows of crop and soil, built-up a speckle of bright roofs and dark shadows in
    2x2-pixel blocks. There is no per-pixel white noise: it would make the files large.
    """
    h, w = classes.shape
    image = SIGNATURES[classes].transpose(2, 0, 1).copy()
    variation = smooth(rng.standard_normal((h, w)), 8.0)
    image *= 1.0 + (TEXTURE[classes] / SIGNATURES[classes].mean(axis=-1) * variation)[None]
    rows = crop_stripes(rng, h, w)
    soil = SIGNATURES[4][:, None, None] * 0.85
    image = np.where(((classes == 2) & ~rows)[None], soil, image)
    blocks = rng.gamma(2.0, 0.5, (-(-h // 2), -(-w // 2)))
    speckle = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)[:h, :w]
    return np.where((classes == 3)[None], image * (0.55 + 0.45 * speckle[None]), image)


def nodata_wedge(rng: np.random.Generator, h: int, w: int, side: str) -> np.ndarray:
    """True where the scene has no data: a slanted wedge along one edge."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    along, across, extent = (yy, xx, w) if side in ("left", "right") else (xx, yy, h)
    length = h if side in ("left", "right") else w
    start, end = rng.uniform(0.02, 0.08) * extent, rng.uniform(0.18, 0.3) * extent
    edge = start + (end - start) * along / length
    distance = across if side in ("left", "top") else (extent - 1 - across)
    return distance < edge


def make_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Image (4, h, w) uint16 and labels (h, w) uint8 of one scene."""
    rng = np.random.default_rng(scene.seed)
    classes = class_map(rng, scene.height, scene.width)
    image = np.clip(np.rint(reflectance(rng, classes)), 1, 10000).astype(np.uint16)
    empty = nodata_wedge(rng, scene.height, scene.width, scene.wedge)
    image[:, empty] = IMAGE_NODATA
    labels = np.where(empty, LABEL_NODATA, classes).astype(np.uint8)
    return image, labels


def _profile(scene: Scene, count: int, dtype: str, nodata: int) -> dict:
    return {
        "driver": "GTiff", "height": scene.height, "width": scene.width, "count": count,
        "dtype": dtype, "nodata": nodata, "crs": CRS_UTM33N,
        "transform": from_origin(scene.west, scene.north, PIXEL, PIXEL),
        "tiled": True, "blockxsize": 128, "blockysize": 128,
        "compress": "deflate", "predictor": 2, "zlevel": 9, "interleave": "pixel",
    }


def write_scene(scene: Scene, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<stem>.tif`` and ``labels/<stem>.tif`` under ``out_dir``."""
    image, labels = make_scene(scene)
    image_path, label_path = out_dir / f"{scene.stem}.tif", out_dir / "labels" / f"{scene.stem}.tif"
    label_path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(image_path, "w", **_profile(scene, 4, "uint16", IMAGE_NODATA)) as dst:
        dst.write(image)
        for band, name in enumerate(BAND_NAMES, start=1):
            dst.set_band_description(band, name)
    with rasterio.open(label_path, "w", **_profile(scene, 1, "uint8", LABEL_NODATA)) as dst:
        dst.write(labels, 1)
        dst.set_band_description(1, "class")
        dst.write_colormap(1, {code: _rgb(color) for code, _, color in CLASSES})
        dst.update_tags(1, **{f"class_{code}": name for code, name, _ in CLASSES})
    return image_path, label_path


def _rgb(color: str) -> tuple[int, int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16), 255


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent
    for scene in SCENES:
        for path in write_scene(scene, out_dir):
            print(path)


if __name__ == "__main__":
    main()
