"""Checkpoints as one safetensors file: arrays plus a JSON model card, never pickle.

The card makes a checkpoint self-describing (architecture, bands, classes with names and
colours, normalisation, training config, library versions), so ``tilepipe run`` needs no
other file. Loading builds an abstract model with ``nnx.eval_shape`` and fills it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from unet_flax.model import UNet, UNetConfig, create_unet

FORMAT = "tilepipe-unet/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason."""


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """One output class: the code written to masks, a name and a colour (#rrggbb)."""

    code: int
    name: str
    color: str

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 254:
            raise ValueError(f"class code {self.code} of {self.name!r} must be in 0..254 (255 is nodata)")
        if len(self.color) != 7 or not self.color.startswith("#"):
            raise ValueError(f"class colour {self.color!r} of {self.name!r} must look like #rrggbb")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a checkpoint besides its weights.

    ``mean``/``std`` are per-band statistics of the training inputs, in the units the
    model was trained on; inference computes ``(raw * scale + offset - mean) / std``.
    """

    name: str
    unet: UNetConfig
    band_names: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.unet.in_bands
        for field in ("band_names", "mean", "std"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"ModelCard.{field} has {len(getattr(self, field))} entries, the U-Net takes {n} bands")
        if len(self.classes) != self.unet.num_classes:
            raise ValueError(f"ModelCard.classes has {len(self.classes)} entries, the U-Net predicts {self.unet.num_classes}")
        if len({c.code for c in self.classes}) != len(self.classes):
            raise ValueError("ModelCard.classes has duplicate codes")
        if any(s <= 0 for s in self.std):
            raise ValueError("ModelCard.std must be positive")

    @property
    def codes(self) -> np.ndarray:
        """Class code of each model output index, as uint8."""
        return np.array([c.code for c in self.classes], dtype=np.uint8)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        data = dict(data)
        data["unet"] = UNetConfig(**data["unet"])
        data["classes"] = tuple(ClassInfo(**c) for c in data["classes"])
        for key in ("band_names", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model in eval mode, its card and the file's SHA-256."""

    model: UNet
    card: ModelCard
    sha256: str


def library_versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _flat_names(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf) for path, leaf in leaves]


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], model: UNet, card: ModelCard) -> str:
    """Write ``model`` and ``card`` atomically to ``path``; return the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    arrays = {name: np.asarray(leaf) for name, leaf in _flat_names(nnx.to_pure_dict(state))}
    card = dataclasses.replace(card, versions=card.versions or library_versions())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(arrays, str(tmp), metadata={"format": FORMAT, "card": json.dumps(card.to_json())})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(path)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """The model card alone, without building the model."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
    if meta.get("format") != FORMAT or "card" not in meta:
        raise CheckpointError(f"{path}: not a tilepipe checkpoint (format {meta.get('format')!r})")
    try:
        return ModelCard.from_json(json.loads(meta["card"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid model card ({exc})") from exc


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint into a U-Net in eval mode, checking every array's name and shape."""
    card = read_card(path)
    abstract = nnx.eval_shape(lambda: create_unet(card.unet))
    graphdef, abstract_state = nnx.split(abstract)
    pure = nnx.to_pure_dict(abstract_state)
    with safe_open(str(path), framework="numpy") as f:
        stored = set(f.keys())
        expected = _flat_names(pure)
        missing = [name for name, _ in expected if name not in stored]
        if missing:
            raise CheckpointError(f"{path}: missing arrays {missing[:3]} for {card.unet}")
        values = []
        for name, leaf in expected:
            array = f.get_tensor(name)
            if array.shape != leaf.shape:
                raise CheckpointError(f"{path}: array {name} has shape {array.shape}, expected {leaf.shape}")
            values.append(array)
    treedef = jax.tree_util.tree_structure(pure)
    nnx.replace_by_pure_dict(abstract_state, jax.tree_util.tree_unflatten(treedef, values))
    model = nnx.merge(graphdef, abstract_state)
    model.eval()
    return Checkpoint(model=model, card=card, sha256=file_sha256(path))
