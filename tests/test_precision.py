"""Compute dtype, convolution lowering and the automatic batch size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from pipeline import infer
from pipeline.config import RuntimeSection, TilingSection
from pipeline.infer import (AUTO_BATCH_FILE, BatchProbe, Predictor, auto_batch, choose_batch, resolve_conv,
                            resolve_precision)
from pipeline.windows import tile_spec
from unet_flax.checkpoint import load_checkpoint
from unet_flax.model import UNetConfig, create_unet, flops_per_pixel


def test_auto_precision_is_bfloat16_on_accelerators_only():
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("auto", "gpu") == "bfloat16"
    assert resolve_precision("auto", "tpu") == "bfloat16"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    assert resolve_conv("auto") == "xla"
    with pytest.raises(ValueError, match="float32, bfloat16, auto"):
        resolve_precision("float16")


def test_config_accepts_auto_batch_and_precision():
    assert TilingSection(batch="auto").batch == "auto"
    assert TilingSection().batch == 8
    assert RuntimeSection().precision == "auto"
    with pytest.raises(ValueError):
        TilingSection(batch=0)
    with pytest.raises(ValueError):
        RuntimeSection(precision="half")


def test_bfloat16_classes_mostly_agree_with_float32(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 28, TINY.factor)
    x = np.random.default_rng(0).standard_normal((4, spec.read_size, spec.read_size, 4)).astype(np.float32)
    fp32 = Predictor(checkpoint, spec, 4, precision="float32")(x)
    bf16 = Predictor(checkpoint, spec, 4, precision="bfloat16")(x)
    agreement = (fp32.classes == bf16.classes).mean()
    assert 0.95 <= agreement <= 1.0, agreement
    assert np.abs(fp32.confidence.astype(int) - bf16.confidence.astype(int)).mean() < 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_convolutions_compute_the_same_function(dtype):
    model = create_unet(UNetConfig(in_bands=3, num_classes=4, depth=3, base_width=4), seed=2)
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
    xla, mm = np.asarray(model(x, conv="xla", dtype=dtype)), np.asarray(model(x, conv="matmul", dtype=dtype))
    assert xla.dtype == mm.dtype == np.float32
    assert (xla.argmax(-1) == mm.argmax(-1)).mean() >= 0.999
    if dtype == jnp.float32:
        np.testing.assert_allclose(xla, mm, rtol=1e-4, atol=1e-4)
    # the default forward is unchanged: float32, XLA convolutions
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x, conv="xla", dtype=jnp.float32)))


def test_flops_per_pixel_of_the_classic_unet():
    assert flops_per_pixel(UNetConfig(in_bands=6, num_classes=8, depth=4, base_width=32)) == 370_560


def test_choose_batch_stops_when_the_gain_is_small():
    probes = [BatchProbe(1, 10.0, None), BatchProbe(2, 15.0, None), BatchProbe(4, 15.3, None)]
    assert choose_batch(probes) == 2
    assert choose_batch(probes[:1]) == 1


def test_auto_batch_is_a_power_of_two_under_the_cap_and_remembered(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 0, TINY.factor)
    batch = auto_batch(checkpoint, spec, cap=4, cache_dir=tmp_path)
    assert batch in (1, 2, 4)
    stored = json.loads((tmp_path / AUTO_BATCH_FILE).read_text())
    (entry,) = stored.values()
    assert entry["batch"] == batch and all(p["batch"] <= 4 for p in entry["probes"])

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again despite a remembered choice")

    monkeypatch.setattr(infer, "probe_batches", no_probe)
    assert auto_batch(checkpoint, spec, cap=4, cache_dir=tmp_path) == batch


def test_auto_batch_respects_the_memory_budget(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    probes = infer.probe_batches(checkpoint, tile_spec(32, 0, TINY.factor), cap=8, budget_bytes=1, min_gain=-1.0)
    assert [p.batch for p in probes] == [1]  # the first probe always runs; larger ones would not fit
