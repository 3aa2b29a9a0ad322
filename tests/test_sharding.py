"""Batches sharded across devices predict exactly what one device predicts."""

import os
import subprocess
import sys
import textwrap

import numpy as np

from conftest import TINY
from pipeline.infer import Predictor
from pipeline.windows import tile_spec
from unet_flax.checkpoint import load_checkpoint

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from pipeline.infer import Predictor
    from pipeline.io import Normaliser, pack_valid
    from pipeline.windows import tile_spec
    from unet_flax.checkpoint import load_checkpoint

    assert len(jax.devices()) == 2, jax.devices()
    checkpoint = load_checkpoint(sys.argv[1])
    spec = tile_spec(32, 28, checkpoint.card.unet.factor)
    x = np.random.default_rng(0).standard_normal((3, 4, spec.read_size, spec.read_size)).astype(np.float32)
    sharded = Predictor(checkpoint, spec, batch=3)
    single = Predictor(checkpoint, spec, batch=3, devices=jax.devices()[:1])
    assert sharded.batch == 4 and single.batch == 3, (sharded.batch, single.batch)
    out = sharded.forward(sharded.put(x))[0]
    assert len(out.sharding.device_set) == 2, out.sharding
    a, b = sharded(x), single(x)
    assert a.classes.shape == (3, 32, 32)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.confidence, b.confidence)
    assert sharded.compiled_count() == 1
    raw = np.random.default_rng(1).integers(0, 10000, (3, 4, spec.read_size, spec.read_size)).astype(np.uint16)
    valid = pack_valid(raw[:, 0] > 1000)  # a tenth of the pixels are not
    norm = Normaliser((1e-4,) * 4, (0.0,) * 4, (0.5,) * 4, (0.25,) * 4)
    extents = np.array([(32, 32), (9, 32), (32, 20)], np.int32)
    c, d = sharded(raw, valid, norm, extents), single(raw, valid, norm, extents)
    np.testing.assert_array_equal(c.classes, d.classes)
    np.testing.assert_array_equal(c.class_pixels, d.class_pixels)
    assert 0 < c.class_pixels.sum() < 32 * 32 + 9 * 32 + 32 * 20
    assert sharded.sequential  # each CPU device runs its share tile by tile
    batched = Predictor(checkpoint, spec, batch=3, sequential=False)
    assert (batched(x).classes == a.classes).mean() >= 0.999
    one = Predictor(checkpoint, spec, batch=1)  # fewer tiles than devices: only as many devices
    assert len(one.devices) == 1 and one.batch == 1, (one.devices, one.batch)
    np.testing.assert_array_equal(one(x[:1]).classes, a.classes[:1])
    print("OK")
""")


def test_two_devices_shard_the_batch_and_match_one_device(tiny_checkpoint):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_checkpoint)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_one_device_keeps_the_batch(tiny_checkpoint):
    predictor = Predictor(load_checkpoint(tiny_checkpoint), tile_spec(32, 28, TINY.factor), batch=3)
    n = len(predictor.devices)
    assert predictor.batch == -(-3 // n) * n  # 3 on one device
    x, valid = predictor.pad(np.zeros((1, 4, 88, 88), np.uint16))
    assert x.shape == predictor.input_shape and x.dtype == np.uint16
    assert valid.shape == (predictor.batch, 88, 11) and (valid[0] == 255).all() and not valid[1:].any()  # padding is not valid
