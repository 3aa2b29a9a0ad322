"""Losses: ignored pixels contribute nothing; cross-entropy and Dice behave as defined."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unet_flax.losses import IGNORE, LOSSES, cross_entropy, get_loss, soft_dice

C = 4


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8, C)), dtype=jnp.float32)
    targets = rng.integers(0, C, size=(2, 8, 8)).astype(np.int32)
    ignored = rng.random((2, 8, 8)) < 0.4
    targets[ignored] = IGNORE
    return logits, jnp.asarray(targets), jnp.asarray(ignored)


WEIGHTS = [None, jnp.asarray([1.0, 2.0, 0.5, 3.0])]


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("weights", WEIGHTS, ids=["unweighted", "weighted"])
def test_ignored_pixels_do_not_change_the_loss(batch, kind, weights):
    logits, targets, ignored = batch
    noise = jax.random.normal(jax.random.key(1), logits.shape) * 50.0
    changed = jnp.where(ignored[..., None], logits + noise, logits)
    loss = get_loss(kind)
    assert loss(changed, targets, weights) == pytest.approx(float(loss(logits, targets, weights)), abs=1e-6)


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("weights", WEIGHTS, ids=["unweighted", "weighted"])
def test_ignored_pixels_get_exactly_zero_gradient(batch, kind, weights):
    logits, targets, ignored = batch
    grad = jax.grad(lambda z: get_loss(kind)(z, targets, weights))(logits)
    assert np.all(np.asarray(grad)[np.asarray(ignored)] == 0.0)
    assert np.abs(np.asarray(grad)[~np.asarray(ignored)]).sum() > 0


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_all_ignored_gives_finite_loss_and_zero_gradient(batch, kind):
    logits, targets, _ = batch
    targets = jnp.full_like(targets, IGNORE)
    value, grad = jax.value_and_grad(lambda z: get_loss(kind)(z, targets, None))(logits)
    assert np.isfinite(float(value))
    assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_is_the_mean_over_labelled_pixels(batch):
    logits, targets, ignored = batch
    keep = ~np.asarray(ignored)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[keep], targets[keep]).mean()
    assert float(cross_entropy(logits, targets)) == pytest.approx(float(expected), rel=1e-5)


def test_class_weights_weight_each_pixel_by_its_true_class(batch):
    logits, targets, _ = batch
    only_class_2 = jnp.asarray([0.0, 0.0, 1.0, 0.0])
    keep = np.asarray(targets) == 2
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[keep], targets[keep]).mean()
    assert float(cross_entropy(logits, targets, only_class_2)) == pytest.approx(float(expected), rel=1e-5)


def test_dice_is_near_zero_for_a_confident_correct_prediction(batch):
    _, targets, _ = batch
    perfect = jax.nn.one_hot(jnp.maximum(targets, 0), C) * 40.0
    assert float(soft_dice(perfect, targets)) < 1e-3
    assert float(soft_dice(-perfect, targets)) > 0.9


def test_combined_loss_is_the_sum(batch):
    logits, targets, _ = batch
    total = get_loss("ce+dice")(logits, targets, None)
    assert float(total) == pytest.approx(float(cross_entropy(logits, targets) + soft_dice(logits, targets)), rel=1e-6)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="ce, dice, ce\\+dice"):
        get_loss("focal")
