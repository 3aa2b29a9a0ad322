"""Segmentation losses with an ignore mask: cross-entropy, soft Dice and their sum.

Targets are class indexes ``0..C-1`` with ``IGNORE`` (-1) for unlabelled pixels. Ignored
pixels are multiplied out before any reduction, so they contribute exactly nothing to the
loss or its gradient, whatever the logits there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

IGNORE = -1
LossKind = Literal["ce", "dice", "ce+dice"]
LossFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def _one_hot(targets: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """One-hot targets (zero rows where ignored) and the float validity mask."""
    valid = targets >= 0
    one_hot = jax.nn.one_hot(jnp.where(valid, targets, 0), num_classes) * valid[..., None]
    return one_hot, valid.astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """Mean (class-weighted) cross-entropy over labelled pixels; 0 when none is labelled."""
    one_hot, valid = _one_hot(targets, logits.shape[-1])
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    weights = valid if class_weights is None else one_hot @ class_weights
    nll = -jnp.sum(one_hot * log_p, axis=-1)
    return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1e-6)


def soft_dice(
    logits: jax.Array, targets: jax.Array, class_weights: jax.Array | None = None, smooth: float = 1.0
) -> jax.Array:
    """One minus the (class-weighted) mean soft Dice coefficient over labelled pixels."""
    one_hot, valid = _one_hot(targets, logits.shape[-1])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid[..., None]
    axes = tuple(range(logits.ndim - 1))
    overlap = jnp.sum(probs * one_hot, axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(one_hot, axis=axes)
    dice = (2.0 * overlap + smooth) / (total + smooth)
    if class_weights is None:
        return 1.0 - jnp.mean(dice)
    return 1.0 - jnp.sum(class_weights * dice) / jnp.sum(class_weights)


def ce_plus_dice(logits: jax.Array, targets: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """Cross-entropy plus soft Dice, equally weighted."""
    return cross_entropy(logits, targets, class_weights) + soft_dice(logits, targets, class_weights)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "dice": soft_dice, "ce+dice": ce_plus_dice}


def get_loss(kind: str) -> LossFn:
    """The loss function named ``kind`` (one of ``ce``, ``dice``, ``ce+dice``)."""
    try:
        return LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}") from None
