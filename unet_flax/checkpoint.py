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

from unet_flax.card import ModelCard
from unet_flax.model import UNet, create_unet

FORMAT = "tilepipe-unet/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason."""


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
