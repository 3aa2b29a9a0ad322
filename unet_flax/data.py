"""Training data: image/label scenes read with rasterio, normalisation statistics, a
spatial hold-out, and random augmented patches drawn with a seeded numpy generator.

A scene holds raw image values ``(H, W, B)``, the image validity mask and integer targets:
class indexes ``0..C-1``, or ``IGNORE`` (-1) where the pixel is unlabelled, outside the
image's data or held out for validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import fiona
import numpy as np
import rasterio
from fiona.transform import transform_geom
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.transform import Affine
from rasterio.warp import Resampling, reproject

from pipeline.errors import InputError
from pipeline.io import open_input
from unet_flax.losses import IGNORE
from unet_flax.train_config import VECTOR_SUFFIXES, DataSection


@dataclasses.dataclass(frozen=True)
class Grid:
    """The pixel grid of an image: size, transform and CRS."""

    height: int
    width: int
    transform: Affine
    crs: CRS | None


@dataclasses.dataclass(frozen=True)
class Scene:
    """One labelled scene in memory."""

    name: str
    image: np.ndarray  # (H, W, B) float32 raw values, NaN where a band has no data
    valid: np.ndarray  # (H, W) bool, the pixel has image data (see ``read_image``)
    targets: np.ndarray  # (H, W) int32 class index or IGNORE
    grid: Grid

    @property
    def shape(self) -> tuple[int, int]:
        return self.targets.shape  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-band mean and standard deviation of the valid training pixels."""

    mean: np.ndarray
    std: np.ndarray

    def normalise(self, image: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``(image - mean) / std`` as float32; 0 (the mean) where a band or the pixel has no data."""
        out = np.nan_to_num((image - self.mean) / self.std, nan=0.0)
        return np.where(valid[..., None], out, 0.0).astype(np.float32)


# --- reading images -------------------------------------------------------------------------


def read_image(
    paths: Sequence[Path], bands: Sequence[int] | None, require: str = "all"
) -> tuple[np.ndarray, np.ndarray, Grid, tuple[str, ...]]:
    """Raw values ``(H, W, B)`` as float32 (NaN where a band's dataset mask says no data, as
    :func:`pipeline.io.read_tile` reads it), validity, grid and band names of one image.

    ``paths`` is one multi-band file or several files (any dtypes and nodata values) whose
    bands are stacked in order; ``bands`` (1-based) then picks from the stack. A pixel is
    valid where ``all`` picked bands have data, or with ``require="any"`` where one has.
    """
    layers: list[np.ndarray] = []
    names: list[str] = []
    grid: Grid | None = None
    for path in paths:
        with open_input(path, "image") as src:
            here = Grid(src.height, src.width, src.transform, src.crs)
            if grid is None:
                grid = here
            elif not same_grid(here, grid):
                raise InputError(f"{path}: grid differs from {paths[0]}; stacked band files must share one grid")
            data = src.read().astype(np.float32)
            masks = src.read_masks()  # nodata value, internal mask or alpha: what inference reads too
            for i in range(src.count):
                band = data[i]
                band[masks[i] == 0] = np.nan
                layers.append(band)
                fallback = Path(path).stem if len(paths) > 1 and src.count == 1 else f"band{len(names) + 1}"
                names.append(src.descriptions[i] or fallback)
    assert grid is not None
    picks = list(range(len(layers))) if bands is None else [b - 1 for b in bands]
    if max(picks) >= len(layers):
        raise InputError(f"{paths[0]}: band {max(picks) + 1} requested but the image has {len(layers)} bands")
    image = np.stack([layers[i] for i in picks], axis=-1)
    has_data = np.isfinite(image)
    valid = has_data.all(axis=-1) if require == "all" else has_data.any(axis=-1)
    image[~valid] = np.nan
    return image, valid, grid, tuple(names[i] for i in picks)


def same_grid(a: Grid, b: Grid) -> bool:
    """Same size, (almost) the same transform and the same CRS (or no CRS on either side)."""
    crs_ok = a.crs is None or b.crs is None or a.crs == b.crs
    return (a.height, a.width) == (b.height, b.width) and a.transform.almost_equals(b.transform) and crs_ok


# --- reading labels ---------------------------------------------------------------------------


def read_label_raster(path: Path, grid: Grid) -> np.ndarray:
    """Label values on the image ``grid`` as float64, NaN where nodata or outside the labels.

    A label raster on another grid or CRS is reprojected with nearest-neighbour resampling.
    """
    with open_input(path, "labels") as src:
        here = Grid(src.height, src.width, src.transform, src.crs)
        nodata = src.nodata
        if same_grid(here, grid):
            values = src.read(1).astype(np.float64)
        else:
            if src.crs is None or grid.crs is None:
                raise InputError(f"{path}: label grid differs from the image grid and a CRS is missing to reproject it")
            values = np.full((grid.height, grid.width), np.nan, dtype=np.float64)
            reproject(rasterio.band(src, 1), values, dst_transform=grid.transform, dst_crs=grid.crs,
                      src_nodata=nodata, dst_nodata=np.nan, resampling=Resampling.nearest)
    if nodata is not None and not np.isnan(nodata):
        values[values == nodata] = np.nan
    return values


def class_value(value: object, codes: Sequence[int], names: Sequence[str], source: str) -> float:
    """A vector attribute as a class code: a number, or a class name (any case)."""
    if value is None:
        return np.nan
    if isinstance(value, str):
        by_name = {n.casefold(): c for n, c in zip(names, codes)}
        if value.strip().casefold() in by_name:
            return float(by_name[value.strip().casefold()])
        try:
            return float(value)
        except ValueError:
            raise InputError(f"{source}: class {value!r} is neither a class code nor one of {list(names)}") from None
    return float(value)  # type: ignore[arg-type]


def read_label_vector(
    path: Path, grid: Grid, attribute: str, codes: Sequence[int], names: Sequence[str], layer: str | None = None,
    all_touched: bool = False,
) -> np.ndarray:
    """Polygons or points rasterised onto the image ``grid`` (float64 codes, NaN elsewhere).

    The class comes from ``attribute`` (a code or a class name); geometries are transformed
    to the grid's CRS when the layer has another one; later features overwrite earlier ones.
    """
    try:
        collection = fiona.open(path, layer=layer)
    except (fiona.errors.DriverError, ValueError) as exc:
        raise InputError(f"{path}: cannot open vector labels ({exc})") from exc
    with collection as src:
        if attribute not in src.schema["properties"]:
            raise InputError(f"{path}: no attribute {attribute!r}; data.label_attribute is one of {list(src.schema['properties'])}")
        layer_crs = CRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        reprojecting = layer_crs is not None and grid.crs is not None and layer_crs != grid.crs
        shapes = []
        for feature in src:
            if feature.geometry is None:
                continue
            code = class_value(feature.properties[attribute], codes, names, str(path))
            if np.isnan(code):
                continue
            geometry = dict(feature.geometry.__geo_interface__)
            if reprojecting:
                geometry = transform_geom(layer_crs, grid.crs, geometry)
            shapes.append((geometry, code))
    values = np.full((grid.height, grid.width), np.nan, dtype=np.float64)
    if shapes:
        values = rasterize(shapes, out_shape=(grid.height, grid.width), transform=grid.transform,
                           fill=np.nan, dtype="float64", all_touched=all_touched)
    return values


def to_targets(values: np.ndarray, codes: Sequence[int], ignore: Sequence[float], source: str) -> np.ndarray:
    """Class indexes for label ``values``; IGNORE where NaN or in ``ignore``."""
    labelled = np.isfinite(values) & ~np.isin(values, np.asarray(ignore, dtype=np.float64))
    targets = np.full(values.shape, IGNORE, dtype=np.int32)
    for index, code in enumerate(codes):
        targets[labelled & (values == code)] = index
    unknown = labelled & (targets == IGNORE)
    if unknown.any():
        found = np.unique(values[unknown])[:8].tolist()
        raise InputError(f"{source}: label values {found} are not class codes {list(codes)}; "
                         "add them to classes or to data.ignore")
    return targets


def load_scene(
    images: Sequence[Path], labels: Path, data: DataSection, codes: Sequence[int], names: Sequence[str] = ()
) -> tuple[Scene, tuple[str, ...]]:
    """One scene from its image file(s) and labels (raster or vector), and its band names."""
    image, valid, grid, band_names = read_image(images, data.bands, data.valid)
    if labels.suffix.lower() in VECTOR_SUFFIXES:
        values = read_label_vector(labels, grid, data.label_attribute, codes, names, data.label_layer, data.all_touched)
    else:
        values = read_label_raster(labels, grid)
    targets = np.where(valid, to_targets(values, codes, data.ignore, str(labels)), IGNORE).astype(np.int32)
    return Scene(Path(images[0]).stem, image, valid, targets, grid), band_names


def read_scenes(data: DataSection, codes: Sequence[int], names: Sequence[str] = ()) -> tuple[tuple[Scene, ...], tuple[str, ...]]:
    """Every scene of a workflow's data section and the band names of the first."""
    scenes: list[Scene] = []
    band_names: tuple[str, ...] = ()
    for pair in data.scene_pairs():
        scene, scene_bands = load_scene(pair.images, pair.labels, data, codes, names)
        if scenes and scene.image.shape[-1] != len(band_names):
            raise InputError(f"{pair.images[0]}: has {scene.image.shape[-1]} bands, {scenes[0].name} has {len(band_names)}")
        scenes.append(scene)
        band_names = band_names or scene_bands
    return tuple(scenes), band_names


# --- statistics and hold-out ---------------------------------------------------------------


def band_stats(scenes: Sequence[Scene], masks: Sequence[np.ndarray] | None = None) -> Stats:
    """Mean and std per band over the pixels with data (and inside ``masks`` when given)."""
    total = square = count = 0.0
    for i, scene in enumerate(scenes):
        keep = scene.valid if masks is None else scene.valid & masks[i]
        pixels = scene.image[keep].astype(np.float64)
        has = np.isfinite(pixels)
        pixels = np.where(has, pixels, 0.0)
        total = total + pixels.sum(axis=0)
        square = square + (pixels**2).sum(axis=0)
        count = count + has.sum(axis=0)
    if np.any(np.asarray(count) == 0):
        raise InputError("a band has no valid training pixels to compute normalisation statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(square / count - mean**2, 0.0))
    return Stats(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))


def holdout_blocks(shape: tuple[int, int], block: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """True inside a random ``fraction`` of the ``block``-sized squares (at least one)."""
    rows, cols = -(-shape[0] // block), -(-shape[1] // block)
    n = max(1, round(fraction * rows * cols))
    chosen = np.zeros(rows * cols, dtype=bool)
    chosen[rng.permutation(rows * cols)[:n]] = True
    cells = chosen.reshape(rows, cols)
    return np.repeat(np.repeat(cells, block, axis=0), block, axis=1)[: shape[0], : shape[1]]


def holdout_strip(shape: tuple[int, int], strips: int, fold: int) -> np.ndarray:
    """True inside vertical strip ``fold`` of ``strips`` equal-width strips."""
    edges = np.linspace(0, shape[1], strips + 1).round().astype(int)
    mask = np.zeros(shape, dtype=bool)
    mask[:, edges[fold] : edges[fold + 1]] = True
    return mask


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (a square neighbourhood)."""
    if radius <= 0:
        return mask
    out = mask
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows.any(axis=-1)
    return out


def without(scene: Scene, mask: np.ndarray) -> Scene:
    """``scene`` with the targets inside ``mask`` ignored."""
    return dataclasses.replace(scene, targets=np.where(mask, IGNORE, scene.targets).astype(np.int32))


def class_counts(scenes: Sequence[Scene], num_classes: int) -> np.ndarray:
    """Labelled pixels of each class over ``scenes``."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for scene in scenes:
        t = scene.targets[scene.targets >= 0]
        counts += np.bincount(t, minlength=num_classes)
    return counts


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights with mean 1; absent classes get weight 1."""
    present = counts > 0
    weights = np.ones(len(counts), dtype=np.float64)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return (weights / weights.mean()).astype(np.float32)


# --- patches ----------------------------------------------------------------------------------


def pad_to(scene: Scene, size: int) -> Scene:
    """``scene`` padded (no data, ignored) at the bottom/right to at least ``size`` pixels."""
    h, w = scene.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return scene
    return dataclasses.replace(
        scene,
        image=np.pad(scene.image, ((0, ph), (0, pw), (0, 0)), constant_values=np.nan),
        valid=np.pad(scene.valid, ((0, ph), (0, pw))),
        targets=np.pad(scene.targets, ((0, ph), (0, pw)), constant_values=IGNORE),
    )


def augment(image: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flip and 90-degree rotation applied to an ``(H, W, B)`` image and its ``(H, W)`` targets."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    image, targets = np.rot90(image, k, axes=(0, 1)), np.rot90(targets, k, axes=(0, 1))
    if flip:
        image, targets = image[:, ::-1], targets[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(targets)


def radiometric_jitter(image: np.ndarray, valid: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A normalised ``(H, W, B)`` patch with a random gain and offset per band on its valid pixels,
    as between acquisitions or across a scene."""
    bands = image.shape[-1]
    gain = np.exp(rng.normal(0.0, scale, bands)).astype(np.float32)
    offset = rng.normal(0.0, scale, bands).astype(np.float32)
    return np.where(valid[..., None], image * gain + offset, image).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PatchSampler:
    """Draws batches of normalised, augmented patches; centres favour labelled pixels."""

    scenes: tuple[Scene, ...]
    stats: Stats
    patch: int
    labelled_fraction: float = 0.9
    balance_classes: bool = False
    augment: bool = True
    jitter: float = 0.0

    def __post_init__(self) -> None:
        padded = tuple(pad_to(s, self.patch) for s in self.scenes)
        object.__setattr__(self, "scenes", padded)
        object.__setattr__(self, "_normalised", tuple(self.stats.normalise(s.image, s.valid) for s in padded))
        labelled = [np.flatnonzero(s.targets.ravel() >= 0) for s in padded]
        object.__setattr__(self, "_labelled", labelled)
        object.__setattr__(self, "_valid", [np.flatnonzero(s.valid.ravel()) for s in padded])
        by_class: dict[int, list[tuple[int, np.ndarray]]] = {}
        for i, s in enumerate(padded):
            flat = s.targets.ravel()
            for c in np.unique(flat[flat >= 0]):
                by_class.setdefault(int(c), []).append((i, np.flatnonzero(flat == c)))
        object.__setattr__(self, "_by_class", by_class)
        if not any(len(v) for v in self._valid):
            raise InputError("no valid image pixels to sample training patches from")

    def _centre(self, rng: np.random.Generator) -> tuple[int, int]:
        """A scene index and a flat pixel index to centre a patch on."""
        if rng.random() < self.labelled_fraction and self._by_class:
            if self.balance_classes:
                options = self._by_class[sorted(self._by_class)[int(rng.integers(len(self._by_class)))]]
                weights = np.array([len(p) for _, p in options], dtype=np.float64)
                i, pixels = options[int(rng.choice(len(options), p=weights / weights.sum()))]
                return i, int(pixels[rng.integers(len(pixels))])
            return self._pick(self._labelled, rng)
        return self._pick(self._valid, rng)

    @staticmethod
    def _pick(pools: list[np.ndarray], rng: np.random.Generator) -> tuple[int, int]:
        sizes = np.array([len(p) for p in pools], dtype=np.float64)
        i = int(rng.choice(len(pools), p=sizes / sizes.sum()))
        return i, int(pools[i][rng.integers(len(pools[i]))])

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One patch: normalised image ``(P, P, B)`` and targets ``(P, P)``."""
        i, flat = self._centre(rng)
        scene = self.scenes[i]
        h, w = scene.shape
        cy, cx = divmod(flat, w)
        top = int(np.clip(cy - rng.integers(self.patch), 0, h - self.patch))
        left = int(np.clip(cx - rng.integers(self.patch), 0, w - self.patch))
        window = (slice(top, top + self.patch), slice(left, left + self.patch))
        image, targets = self._normalised[i][window], scene.targets[window]
        if self.jitter:
            image = radiometric_jitter(image, scene.valid[window], self.jitter, rng)
        if self.augment:
            return augment(image, targets, rng)
        return image.copy(), targets.copy()

    def batch(self, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``size`` patches stacked: ``(N, P, P, B)`` float32 and ``(N, P, P)`` int32."""
        pairs = [self.sample(rng) for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.int32)
