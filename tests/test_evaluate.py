"""Metrics count labelled pixels only and follow their textbook definitions."""

import numpy as np
import pytest

from unet_flax.evaluate import confusion_matrix, pad_to_multiple, predict_scene, scores
from unet_flax.losses import IGNORE


def test_unlabelled_pixels_never_reach_the_metrics():
    targets = np.array([[0, 1, IGNORE], [1, IGNORE, 2]])
    predicted = np.array([[0, 1, 2], [0, 0, 2]])
    cm = confusion_matrix(predicted, targets, 3)
    assert cm.sum() == 4
    other = np.where(targets == IGNORE, (predicted + 1) % 3, predicted)
    np.testing.assert_array_equal(confusion_matrix(other, targets, 3), cm)
    masked = confusion_matrix(predicted, targets, 3, mask=np.array([[True] * 3, [False] * 3]))
    assert masked.sum() == 2


def test_scores_follow_their_definitions():
    cm = np.array([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    s = scores(cm, ["a", "b", "c"])
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["per_class"]["a"]["iou"] == pytest.approx(5 / 8)
    assert s["per_class"]["b"]["iou"] == pytest.approx(2 / 5)
    assert s["per_class"]["c"]["iou"] is None  # absent from truth and prediction: left out
    assert s["mean_iou"] == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert s["macro_f1"] == pytest.approx((10 / 13 + 4 / 7) / 2)
    assert s["confusion"] == cm.tolist() and s["pixels"] == 10


def test_whole_scene_prediction_crops_the_padding():
    image = np.arange(5 * 7, dtype=np.float32).reshape(5, 7, 1)
    assert pad_to_multiple(image, 4).shape == (8, 8, 1)
    out = predict_scene(lambda batch: (batch[..., 0] > 10).astype(np.int32), image, 4)
    np.testing.assert_array_equal(out, (image[..., 0] > 10).astype(np.int32))
