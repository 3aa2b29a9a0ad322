"""Training: one jitted step over a split NNX model, spatial hold-out validation, the best
checkpoint by validation mIoU, and a resumable last state beside it.

Follows the Flax NNX performance guide: the model is split once into a graph definition and
state (parameters, batch statistics); the jitted step is a plain function that merges them
inside and returns the new state. On CPU a fixed seed gives identical weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from pipeline.errors import WorkflowError
from unet_flax.card import ClassInfo, ModelCard
from unet_flax.checkpoint import library_versions, save_checkpoint
from unet_flax.data import (
    PatchSampler,
    Scene,
    Stats,
    balanced_weights,
    band_stats,
    class_counts,
    dilate,
    holdout_blocks,
    holdout_strip,
    read_scenes,
    without,
)
from unet_flax.evaluate import confusion_matrix, predict_scene, scores
from unet_flax.losses import get_loss
from unet_flax.model import UNetConfig, create_unet
from unet_flax.train_config import (
    OptimizerSection,
    TrainWorkflow,
    ValidationSection,
    load_train_workflow,
)

__all__ = ["TrainResult", "TrainWorkflow", "load_train_workflow", "train"]

STATE_FORMAT = "tilepipe-train-state/1"


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Where training wrote its files and the best validation metrics."""

    checkpoint: Path
    metrics: Path
    last_state: Path
    best: dict[str, Any]
    steps: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Scenes read and split: training scenes (hold-out ignored), hold-out masks, statistics."""

    scenes: tuple[Scene, ...]
    train: tuple[Scene, ...]
    holdout: tuple[np.ndarray, ...]
    stats: Stats
    band_names: tuple[str, ...]
    class_weights: np.ndarray | None
    counts: np.ndarray


def holdout_masks(scenes: tuple[Scene, ...], validation: ValidationSection, seed: int) -> tuple[np.ndarray, ...]:
    """The validation pixels of every scene: random blocks or one vertical strip."""
    rng = np.random.default_rng([seed, 1])
    if validation.mode == "strips":
        return tuple(holdout_strip(s.shape, validation.strips, validation.fold) for s in scenes)
    return tuple(holdout_blocks(s.shape, validation.block, validation.fraction, rng) for s in scenes)


def prepare(cfg: TrainWorkflow) -> Prepared:
    """Read every scene, hold out the validation pixels and compute statistics on the rest."""
    scenes, names = read_scenes(cfg.data, [c.code for c in cfg.classes], [c.name for c in cfg.classes])
    masks = holdout_masks(scenes, cfg.validation, cfg.seed)
    train_scenes = tuple(without(s, dilate(m, cfg.validation.gap)) for s, m in zip(scenes, masks))
    stats = band_stats(train_scenes, [~m for m in masks])
    counts = class_counts(train_scenes, len(cfg.classes))
    if counts.sum() == 0:
        raise WorkflowError(f"{cfg.name}: no labelled training pixels outside the validation hold-out")
    weights = cfg.loss.class_weights
    if weights == "balanced":
        class_weights: np.ndarray | None = balanced_weights(counts)
    else:
        class_weights = None if weights is None else np.asarray(weights, dtype=np.float32)
    band_names = tuple(cfg.data.band_names) if cfg.data.band_names else names
    return Prepared(scenes, train_scenes, masks, stats, band_names, class_weights, counts)


def _decay_mask(params: Any) -> Any:
    """Weight decay on kernels only, not on biases or batch-norm scales and offsets."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@functools.lru_cache(maxsize=8)
def make_optimizer(opt: OptimizerSection) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a warm-up + cosine-decay schedule; no decay on
    biases and batch-norm parameters. Cached: equal sections give the same (hashable) object."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.lr, min(opt.warmup, opt.steps - 1) if opt.steps > 1 else 0, opt.steps, opt.lr * opt.final_fraction
    )
    return optax.chain(
        optax.clip_by_global_norm(opt.clip),
        optax.adamw(schedule, weight_decay=opt.weight_decay, mask=_decay_mask),
    )


@functools.lru_cache(maxsize=8)
def make_train_step(graphdef: nnx.GraphDef, loss_kind: str) -> Callable:
    """The jitted step ``(state, x, y, class_weights) -> (state, loss)`` over the split
    (model, optimiser); cached, so runs with the same architecture compile once."""
    loss_fn = get_loss(loss_kind)

    def step(state: nnx.State, x: jax.Array, y: jax.Array, weights: jax.Array) -> tuple[nnx.State, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y, weights))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=8)
def make_predict(graphdef: nnx.GraphDef) -> Callable:
    """The jitted ``(state, x) -> class indexes`` with batch norm in eval mode."""

    def predict(state: nnx.State, x: jax.Array) -> jax.Array:
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return jnp.argmax(model(x), axis=-1).astype(jnp.int32)

    return jax.jit(predict)


def validate(predict: Callable, prepared: Prepared, normalised: tuple[np.ndarray, ...], factor: int, names: list[str]) -> dict[str, Any]:
    """Scores over the hold-out pixels of every scene."""
    n = len(names)
    total = np.zeros((n, n), dtype=np.int64)
    for scene, mask, image in zip(prepared.scenes, prepared.holdout, normalised):
        if not (mask & (scene.targets >= 0)).any():
            continue
        total += confusion_matrix(predict_scene(predict, image, factor), scene.targets, n, mask)
    return scores(total, names)


def model_card(cfg: TrainWorkflow, prepared: Prepared, unet: UNetConfig, step: int, metrics: dict[str, Any]) -> ModelCard:
    """The self-describing card written with every checkpoint."""
    training = {
        "workflow": cfg.model_dump(mode="json"),
        "step": step,
        "inputs": "raw pixel values (normalise with scale 1, offset 0)",
        "class_pixels": prepared.counts.tolist(),
        "class_weights": None if prepared.class_weights is None else prepared.class_weights.tolist(),
        "validation": {k: metrics.get(k) for k in ("pixel_accuracy", "mean_iou", "macro_f1", "pixels")},
    }
    return ModelCard(
        name=cfg.name, unet=unet, band_names=prepared.band_names,
        classes=tuple(ClassInfo(c.code, c.name, c.color) for c in cfg.classes),
        mean=tuple(float(v) for v in prepared.stats.mean), std=tuple(float(v) for v in prepared.stats.std),
        training=training, versions=library_versions(),
    )


# --- resumable state ------------------------------------------------------------------------


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def save_state(path: Path, state: nnx.State, step: int, rng: np.random.Generator, log: dict[str, Any]) -> None:
    """Weights, optimiser state, step, sampler RNG and log, atomically, as safetensors."""
    arrays = {f"{i:05d}": leaf for i, leaf in enumerate(_leaves(state))}
    meta = {"format": STATE_FORMAT, "step": str(step), "rng": json.dumps(rng.bit_generator.state), "log": json.dumps(log)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(arrays, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: Path, like: nnx.State) -> tuple[nnx.State, int, np.random.Generator, dict[str, Any]]:
    """The state saved by :func:`save_state`, shaped like ``like``."""
    candidates = [path] if path.name.endswith(".last.safetensors") else [path.with_name(f"{path.stem}.last.safetensors"), path]
    for candidate in candidates:
        if candidate.exists():
            with safe_open(str(candidate), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") == STATE_FORMAT:
                    values = [f.get_tensor(k) for k in sorted(f.keys())]
                    break
    else:
        raise WorkflowError(f"{path}: no training state to resume from (expected {candidates[0].name} beside it)")
    leaves, treedef = jax.tree.flatten(like)
    if len(values) != len(leaves) or any(v.shape != np.shape(l) for v, l in zip(values, leaves)):
        raise WorkflowError(f"{candidate}: training state does not match this workflow's model and optimiser")
    state = jax.tree.unflatten(treedef, [jnp.asarray(v, dtype=np.asarray(l).dtype) for v, l in zip(values, leaves)])
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(meta["rng"])
    return state, int(meta["step"]), rng, json.loads(meta["log"])


# --- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainWorkflow, *, progress: bool = True, resume: Path | None = None, until: int | None = None) -> TrainResult:
    """Train the workflow's U-Net; keep the best checkpoint by validation mIoU.

    ``resume`` is a checkpoint written by an earlier run (its ``.last.safetensors`` state is
    used) or that state file itself. ``until`` stops after that step, the schedule still
    spanning ``optimizer.steps``, so a run can be split in two.
    """
    prepared = prepare(cfg)
    names = [c.name for c in cfg.classes]
    unet = UNetConfig(len(prepared.band_names), len(cfg.classes), cfg.architecture.depth, cfg.architecture.base_width)
    model = create_unet(unet, cfg.seed)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, make_optimizer(cfg.optimizer), wrt=nnx.Param)))
    rng = np.random.default_rng([cfg.seed, 2])
    log: dict[str, Any] = {"history": [], "best": None}
    start = 0
    if resume is not None:
        state, start, rng, log = load_state(Path(resume), state)

    n = len(cfg.classes)
    weights = jnp.ones(n) if prepared.class_weights is None else jnp.asarray(prepared.class_weights)
    step_fn = make_train_step(graphdef, cfg.loss.kind)
    predict_fn = make_predict(graphdef)
    sampler = PatchSampler(prepared.train, prepared.stats, cfg.sampling.patch, cfg.sampling.labelled_fraction,
                           cfg.sampling.balance_classes, cfg.sampling.augment, cfg.sampling.jitter)
    normalised = tuple(prepared.stats.normalise(s.image, s.valid) for s in prepared.scenes)
    out = cfg.output
    out.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    stop = min(cfg.optimizer.steps, until or cfg.optimizer.steps)
    losses: list[Any] = log.pop("pending_losses", [])  # device scalars: read once per validation, not per step
    bar = tqdm(total=cfg.optimizer.steps, initial=start, disable=not progress, desc=cfg.name, unit="step")
    for step in range(start + 1, stop + 1):
        x, y = sampler.batch(cfg.sampling.batch, rng)
        state, loss = step_fn(state, x, y, weights)
        losses.append(loss)
        bar.update(1)
        if step % cfg.validation.every and step != cfg.optimizer.steps:
            continue
        metrics = validate(functools.partial(predict_fn, state), prepared, normalised, unet.factor, names)
        entry = {"step": step, "train_loss": round(float(np.mean(jax.device_get(losses))), 6), **_summary(metrics)}
        losses = []
        log["history"].append(entry)
        best = log["best"]
        if best is None or (metrics["mean_iou"] or 0.0) > (best["mean_iou"] or 0.0):
            log["best"] = {"step": step, **metrics}
            save_checkpoint(out.checkpoint, nnx.merge(graphdef, state)[0], model_card(cfg, prepared, unet, step, metrics))
        bar.set_postfix(loss=entry["train_loss"], val_miou=entry["mean_iou"], best=log["best"]["mean_iou"])
        save_state(out.last_state, state, step, rng, log)
        _write_metrics(out.metrics, cfg, prepared, log)
    bar.close()
    if stop > start and (stop % cfg.validation.every and stop != cfg.optimizer.steps):
        pending = [float(v) for v in jax.device_get(losses)]
        save_state(out.last_state, state, stop, rng, {**log, "pending_losses": pending})
    return TrainResult(out.checkpoint, out.metrics, out.last_state, log["best"] or {}, stop)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"pixel_accuracy": metrics["pixel_accuracy"], "mean_iou": metrics["mean_iou"], "macro_f1": metrics["macro_f1"]}


def _write_metrics(path: Path, cfg: TrainWorkflow, prepared: Prepared, log: dict[str, Any]) -> None:
    data = {
        "name": cfg.name,
        "checkpoint": cfg.output.checkpoint.name,
        "classes": [c.name for c in cfg.classes],
        "validation": cfg.validation.model_dump(mode="json"),
        "holdout_pixels": int(sum((m & (s.targets >= 0)).sum() for s, m in zip(prepared.scenes, prepared.holdout))),
        "train_pixels": int(prepared.counts.sum()),
        "best": log["best"],
        "history": log["history"],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
