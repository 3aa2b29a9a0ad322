"""Workflow files: YAML loaded safely, ``--set`` overrides applied, validated once.

Everything below the CLI receives the frozen :class:`Workflow`, never raw dicts. Relative
paths in a workflow file are relative to that file, so a workflow means the same thing
wherever it is run from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import WorkflowError
from pipeline.io import GdalPath, is_gdal_path
from pipeline.outputs import CODECS, Compression


class Section(BaseModel):
    """Base of every workflow section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSection(Section):
    dir: Path | str
    """A folder, or a GDAL virtual folder (``/vsizip//data/scenes.zip``, ``/vsis3/bucket/prefix``)."""
    pattern: str = "*.tif"

    @field_validator("dir", mode="before")
    @classmethod
    def _local_or_gdal(cls, value: Any) -> Path | str:
        return str(value) if isinstance(value, str) and is_gdal_path(value) else Path(value)

    @property
    def source(self) -> Path | GdalPath:
        """The folder as something the runner lists and opens."""
        return GdalPath(self.dir) if isinstance(self.dir, str) else self.dir


class OutputSection(Section):
    dir: Path
    confidence: bool = False
    """Also write ``<stem>.confidence.tif``: max softmax probability as uint8 0-100."""
    probabilities: bool = False
    """Also write ``<stem>.probabilities.tif``: one uint8 0-100 band per class."""
    polygons: bool = False
    """Also write ``<stem>.gpkg``: the classes as simplified polygons."""
    simplify: float = Field(0.0, ge=0, description="polygon simplification tolerance, in CRS units")
    compression: Literal["deflate", "zstd", "lzw"] = Field(
        "deflate", description="codec of every COG written: deflate (the default, which every GeoTIFF reader "
        "opens), zstd (GDAL 2.3 or later: as small for a fraction of the CPU at low levels) or lzw")
    level: int | Literal["auto"] = Field(
        "auto", description="the codec's level (deflate 1-12, zstd 1-22; lzw has none), or auto (the default): "
        "GDAL's own (deflate 6, zstd 9) when the workers run on CPU, a cheaper one on GPU/TPU, where the host's "
        "CPU is the cost (deflate 5, zstd 1)")
    run_products: bool = True
    """Write per-run VRT mosaics, STAC Items and a STAC Collection."""

    @model_validator(mode="before")
    @classmethod
    def _former_deflate_level(cls, data: Any) -> Any:
        """``deflate_level: N``, the former name of ``level`` with DEFLATE, still reads as that."""
        if not isinstance(data, dict) or "deflate_level" not in data:
            return data
        data = dict(data)
        value = data.pop("deflate_level")
        if "level" in data or data.get("compression", "deflate") != "deflate":
            raise ValueError("deflate_level is the former name of level, for compression deflate: give level only")
        levels = CODECS["deflate"]
        if value != "auto" and not (isinstance(value, int) and levels.lowest <= value <= levels.highest):
            raise ValueError(f"deflate_level (now level) must be auto or {levels.lowest}-{levels.highest}, "
                             f"got {value!r}")
        return {**data, "level": value}

    @field_validator("level")
    @classmethod
    def _level_of_the_codec(cls, level: int | str, info: ValidationInfo) -> int | str:
        if level != "auto" and "compression" in info.data:
            Compression(info.data["compression"], level)  # its message names the codec's levels
        return level


class ModelSection(Section):
    checkpoint: Path


class NormaliseSection(Section):
    """Raw values become model units as ``raw * scale + offset`` (per band or one for all);
    the model's stored mean/std are applied after that."""

    scale: list[float] | float = 1.0
    offset: list[float] | float = 0.0

    def per_band(self, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        def expand(value: list[float] | float, field: str) -> tuple[float, ...]:
            if isinstance(value, (int, float)):
                return (float(value),) * n
            if len(value) != n:
                raise WorkflowError(f"normalise.{field}: has {len(value)} values for {n} bands")
            return tuple(float(v) for v in value)

        return expand(self.scale, "scale"), expand(self.offset, "offset")


class TilingSection(Section):
    tile: int = Field(512, ge=16, le=8192, description="core tile size in pixels (512 by default: "
                      "the halo is read and computed for every tile, so bigger tiles pay for less of it)")
    halo: int | Literal["auto"] = Field("auto", description="context pixels read on every side, or auto (the "
                                        "default): the model's receptive radius, rounded up to a multiple of its "
                                        "down-sampling factor, so that tiles join without seams")
    batch: int | Literal["auto"] = Field("auto", description="tiles per compiled batch, or auto (the default): "
                                         "the largest power of two that still speeds the model up (probed once, "
                                         "remembered in runtime.compilation_cache)")

    @field_validator("halo", "batch")
    @classmethod
    def _auto_or_in_range(cls, value: int | str, info: ValidationInfo) -> int | str:
        low, high = {"halo": (0, 1024), "batch": (1, 1024)}[info.field_name]
        if isinstance(value, int) and not low <= value <= high:
            raise ValueError(f"{info.field_name} must be auto or an integer in {low}..{high}")
        return value


class DaskSection(Section):
    scheduler: str | None = None
    """Address of an existing scheduler (tcp://host:port); none starts a local cluster."""
    workers: int = Field(1, ge=1)
    threads: int = Field(2, ge=1)
    processes: bool = False
    max_tasks_in_flight: int = Field(4, ge=1, description="batches submitted but not yet written")
    retries: int = Field(2, ge=0)
    profile: bool = False
    """Dask's statistical profiler in the local cluster's workers (the dashboard's Profile tab):
    it samples every thread's stack 100 times a second, which cost end to end 3-8% on CPU; an
    existing cluster keeps its own setting (``distributed.worker.profile.enabled``)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Worker resources one inference task holds, e.g. ``{GPU: 1}``: on a cluster such tasks run
    only on workers started with ``--resources GPU=1``; a local cluster's workers are given
    ``threads`` of each, so a local run keeps its parallelism."""

    @field_validator("resources")
    @classmethod
    def _positive_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        if any(amount <= 0 for amount in resources.values()):
            raise ValueError("resource amounts must be > 0")
        return resources


class RuntimeSection(Section):
    compilation_cache: Path | None = Path("~/.cache/tilepipe/jax")
    """Persistent JAX compilation cache; null turns it off."""
    precision: Literal["float32", "bfloat16", "auto"] = "auto"
    """Compute dtype of the model: auto is bfloat16 on GPU/TPU and float32 on CPU, where
    bfloat16 is the wide convolutions' matrix multiplies only (faster on cores with AMX)."""
    readers: NonNegativeInt | Literal["auto"] = Field("auto", description="processes each worker reads batches in, "
                                                      "or auto (the default): none on CPU, one per core up to 8 "
                                                      "per worker thread on GPU/TPU (a batch is read in up to "
                                                      "8 parts side by side); "
                                                      "0 reads in the worker's threads")
    finishers: NonNegativeInt | Literal["auto"] = Field("auto", description="processes the driver publishes "
                                                        "finished files in, or auto (the default): none when the "
                                                        "workers run on CPU, a third of the cores (at least 2) on "
                                                        "GPU/TPU; 0 publishes in the driver's threads")


class StateSection(Section):
    dir: Path | None = None
    """Run ledger (SQLite) and lock file; none means ``<output.dir>/.tilepipe``."""


class Workflow(Section):
    """One validated workflow."""

    name: str = "workflow"
    input: InputSection
    output: OutputSection
    model: ModelSection
    bands: list[int] = Field(min_length=1, description="1-based input band indexes, in the model's order")
    normalise: NormaliseSection = NormaliseSection()
    tiling: TilingSection = TilingSection()
    dask: DaskSection = DaskSection()
    runtime: RuntimeSection = RuntimeSection()
    state: StateSection = StateSection()
    report: Path | None = None

    @field_validator("bands")
    @classmethod
    def _positive_bands(cls, bands: list[int]) -> list[int]:
        if any(b < 1 for b in bands):
            raise ValueError("band indexes are 1-based and must be >= 1")
        return bands

    @model_validator(mode="after")
    def _normalise_matches_bands(self) -> Workflow:
        self.normalise.per_band(len(self.bands))
        return self

    @property
    def state_dir(self) -> Path:
        """Where the run ledger and the lock live."""
        return self.state.dir or self.output.dir / ".tilepipe"

    def digest(self) -> str:
        """Stable hash of the validated content (paths included), for provenance and reruns."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


S = TypeVar("S", bound=BaseModel)

PATH_FIELDS = ("input.dir", "output.dir", "model.checkpoint", "report", "runtime.compilation_cache", "state.dir")


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``section.key=value`` strings as (key path, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise WorkflowError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise WorkflowError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """A copy of ``data`` with each override set; intermediate sections are created."""
    data = json.loads(json.dumps(data, default=str))
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise WorkflowError(f"--set {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read workflow ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise WorkflowError(f"{path}: a workflow must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_paths(data: dict[str, Any], base: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """Make relative path fields absolute against ``base`` (the workflow file's folder).

    ``~`` is expanded; GDAL virtual paths and ``scheme://`` references are left alone. A
    ``*`` in a field walks every item of a list (``data.pairs.*.image``), and a field whose
    value is a list has each item resolved.
    """

    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, str) or is_gdal_path(value) or "://" in value:
            return value
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    def walk(node: Any, parts: list[str]) -> None:
        head, *rest = parts
        if head == "*":
            for item in node if isinstance(node, list) else []:
                walk(item, rest)
        elif isinstance(node, dict) and head in node:
            if rest:
                walk(node[head], rest)
            else:
                node[head] = resolve(node[head])

    for dotted in fields:
        walk(data, dotted.split("."))
    return data


def validate(model: type[S], data: dict[str, Any], source: str) -> S:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WorkflowError(format_validation_error(exc, source)) from None


def load_config(model: type[S], path: str | Path, overrides: list[str] = (), path_fields: tuple[str, ...] = ()) -> S:
    """Read a YAML file into ``model``: safe load, overrides, paths resolved, validated once.

    Paths given in the file are relative to the file; paths given with ``--set`` are
    relative to the current directory, as a user typing them expects.
    """
    path = Path(path)
    data = resolve_paths(read_yaml(path), path.resolve().parent, path_fields)
    parsed = parse_overrides(list(overrides))
    data = apply_overrides(data, parsed)
    override_data = apply_overrides({}, parsed)
    data = apply_overrides(data, [(k, v) for k, v in _flatten(resolve_paths(override_data, Path.cwd(), path_fields))])
    return validate(model, data, str(path))


def _flatten(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, prefix + (key,)))
        else:
            items.append((list(prefix + (key,)), value))
    return items


def load_workflow(path: str | Path, overrides: list[str] = ()) -> Workflow:
    """The validated workflow at ``path`` with ``--set`` overrides applied."""
    return load_config(Workflow, path, overrides, PATH_FIELDS)
