"""Compute dtype, the optimised forward pass, tile-by-tile execution and the automatic batch size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY
from pipeline import infer
from pipeline.config import RuntimeSection, TilingSection
from pipeline.infer import AUTO_BATCH_FILE, BatchProbe, Predictor, auto_batch, choose_batch, resolve_precision
from pipeline.io import Normaliser, pack_valid
from pipeline.windows import tile_spec
from unet_flax.checkpoint import load_checkpoint
from flax import nnx

from unet_flax.model import (
    Shift,
    UNetConfig,
    WinogradConv,
    create_unet,
    flops_per_pixel,
    fold_batch_norm,
    forward_flops,
    winograd_copy,
)
from unet_flax.winograd import WIDTH as WINOGRAD_WIDTH
from unet_flax.winograd import inference_width
from unet_flax.xla_flags import (
    MEASURED_JAXLIB,
    OLDER_EMITTERS,
    YNN_CONVOLUTIONS_OFF,
    YNN_CONVOLUTIONS_ON,
    apply_default_xla_flags,
    cpu_features,
    jaxlib_release,
)


def test_auto_precision_is_bfloat16_on_accelerators_only():
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("auto", "gpu") == "bfloat16"
    assert resolve_precision("auto", "tpu") == "bfloat16"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="float32, bfloat16, auto"):
        resolve_precision("float16")


def test_config_accepts_auto_batch_and_precision():
    assert TilingSection(batch="auto").batch == "auto"
    assert TilingSection().batch == "auto"  # unless the workflow fixes one
    assert TilingSection(batch=8).batch == 8
    assert RuntimeSection().precision == "auto"
    with pytest.raises(ValueError):
        TilingSection(batch=0)
    with pytest.raises(ValueError):
        RuntimeSection(precision="half")


@pytest.mark.parametrize("winograd", ["0", str(TINY.base_width)])  # bfloat16 throughout; the products only
def test_bfloat16_classes_mostly_agree_with_float32(tiny_checkpoint, monkeypatch, winograd):
    monkeypatch.setenv("TILEPIPE_WINOGRAD", winograd)
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 28, TINY.factor)
    x = np.random.default_rng(0).standard_normal((4, 4, spec.read_size, spec.read_size)).astype(np.float32)
    fp32 = Predictor(checkpoint, spec, 4, precision="float32")(x)
    bf16 = Predictor(checkpoint, spec, 4, precision="bfloat16")(x)
    agreement = (fp32.classes == bf16.classes).mean()
    assert 0.95 <= agreement <= 1.0, agreement
    assert np.abs(fp32.confidence.astype(int) - bf16.confidence.astype(int)).mean() < 2


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_batch_as_read_is_normalised_on_the_device(tiny_checkpoint, precision):
    """uint16 values and their validity in, the classes of the batch normalised on the host out:
    the host sends the input's own values and does no arithmetic on them."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 28, TINY.factor)
    predictor = Predictor(checkpoint, spec, 4, precision=precision)
    assert predictor.lower(np.uint16).args_info[0][1].dtype == np.uint16
    raw = np.random.default_rng(1).integers(0, 10000, (3, 4, spec.read_size, spec.read_size)).astype(np.uint16)
    valid = raw[:, 1] > 1000  # a tenth of the pixels are not
    norm = Normaliser((1e-4, 2e-4, 1e-4, 1e-4), (0.0, -0.1, 0.0, 0.05), (0.5, 0.4, 0.5, 0.3), (0.25, 0.2, 0.3, 0.25))
    gain, bias = norm.gain_bias
    host = np.where(valid[:, None], raw.astype(np.float32) * gain[:, None, None] + bias[:, None, None], 0)
    on_device = predictor(raw, pack_valid(valid), norm)
    np.testing.assert_array_equal(on_device.classes, predictor(host.astype(np.float32)).classes)
    np.testing.assert_array_equal(on_device.confidence, predictor(host.astype(np.float32)).confidence)
    assert (on_device.classes != predictor(raw, None, norm).classes).any()  # validity matters
    predictor(raw[:2], pack_valid(valid[:2]), norm)
    assert predictor.compiled_count() == 2  # uint16 and float32 batches; short batches are padded


def plain_forward(model, x):
    """The U-Net written with the plain Flax layers: concatenation, ConvTranspose, max_pool."""
    def block(b, x):
        x = nnx.relu(b.norm1(b.conv1(x)))
        return nnx.relu(b.norm2(b.conv2(x)))

    skips = []
    for b in model.down:
        x = block(b, x)
        skips.append(x)
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = block(model.bottleneck, x)
    for up, b, skip in zip(model.upsample, model.up, reversed(skips)):
        x = block(b, jnp.concatenate([up(x), skip], axis=-1))
    return model.head(x)


def randomise_batch_stats(model, seed):
    """Eval-mode statistics far from the initial 0/1, so batch norm is not the identity."""
    rng = np.random.default_rng(seed)
    for _, norm in nnx.iter_graph(model):
        if isinstance(norm, nnx.BatchNorm):
            n = norm.mean[...].shape[0]
            norm.mean[...] = jnp.asarray(rng.normal(0, 0.5, n), jnp.float32)
            norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
            norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            norm.bias[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)


@pytest.fixture
def exact_float32():
    """Full float32 products: GPUs otherwise use TF32 for float32 convolutions, whose 1e-3
    rounding differs between two orders of the same sums."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("depth,width,bands,size", [(1, 4, 1, 16), (3, 4, 3, 48), (2, 8, 6, 40)])
def test_forward_equals_the_plain_layers(depth, width, bands, size, exact_float32):
    model = create_unet(UNetConfig(in_bands=bands, num_classes=5, depth=depth, base_width=width), seed=depth)
    randomise_batch_stats(model, depth)
    model.eval()
    x = jax.random.normal(jax.random.key(depth), (2, size, size, bands))
    plain = np.asarray(plain_forward(model, x))
    np.testing.assert_allclose(np.asarray(model(x)), plain, rtol=1e-4, atol=1e-4)
    # the wider blocks' convolutions by Winograd, then all of them
    for wide in (2 * width, width):
        np.testing.assert_allclose(np.asarray(winograd_copy(model, wide)(x)), plain, rtol=1e-4, atol=1e-4)
    bf16 = np.asarray(model(x, dtype=jnp.bfloat16))
    assert bf16.dtype == np.float32
    assert (bf16.argmax(-1) == np.asarray(plain_forward(model, x)).argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize("depth,width,size,core", [
    (2, 8, 64, ((16, 48), (16, 48))),  # a tile's core, well inside its halo
    (3, 8, 64, ((0, 32), (16, 64))),  # at the input's edges: zero padding where a level ends
    (2, 8, 48, ((5, 37), (3, 40))),  # any region, aligned with no level
    (1, 4, 16, ((0, 16), (0, 16))),  # all of it
])
def test_logits_on_a_core_are_the_whole_pass_there(depth, width, size, core, exact_float32):
    model = create_unet(UNetConfig(in_bands=3, num_classes=5, depth=depth, base_width=width), seed=depth)
    randomise_batch_stats(model, depth)
    model.eval()
    x = jax.random.normal(jax.random.key(size), (2, size, size, 3))
    (r0, r1), (c0, c1) = core
    whole = np.asarray(model(x))[:, r0:r1, c0:c1]
    folded = fold_batch_norm(model)
    # folded, and the wider blocks' convolutions by Winograd, then all of them
    for m in (model, folded, winograd_copy(folded, 2 * width), winograd_copy(model, width)):
        np.testing.assert_allclose(np.asarray(m(x, core=core)), whole, rtol=1e-4, atol=1e-4)


def test_forward_flops_count_the_whole_pass_or_the_decoder_for_a_core():
    classic = UNetConfig(in_bands=6, num_classes=8, depth=4, base_width=32)
    assert forward_flops(classic, (384, 384)) == flops_per_pixel(classic) * 384**2
    assert forward_flops(classic, (384, 256)) == flops_per_pixel(classic) * 384 * 256
    core = forward_flops(classic, (384, 384), ((64, 320), (64, 320)))
    assert 0.6 * forward_flops(classic, (384, 384)) < core < 0.75 * forward_flops(classic, (384, 384))
    assert flops_per_pixel(classic) * 256**2 < core  # the encoder still reads the halo


@pytest.mark.parametrize("depth,width,bands,size", [(1, 4, 1, 16), (3, 4, 3, 48), (2, 8, 6, 40)])
def test_folding_batch_norm_keeps_the_function_and_the_model(depth, width, bands, size, exact_float32):
    model = create_unet(UNetConfig(in_bands=bands, num_classes=5, depth=depth, base_width=width), seed=depth)
    randomise_batch_stats(model, depth)
    model.eval()
    before = jax.tree.map(np.asarray, nnx.state(model))
    folded = fold_batch_norm(model)
    x = jax.random.normal(jax.random.key(depth), (2, size, size, bands))
    np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-4)
    agree = np.asarray(folded(x, dtype=jnp.bfloat16)).argmax(-1) == np.asarray(model(x)).argmax(-1)
    assert agree.mean() >= 0.98
    modules = [m for _, m in nnx.iter_graph(folded) if isinstance(m, nnx.Module)]
    assert not any(isinstance(m, nnx.BatchNorm) for m in modules)
    assert sum(isinstance(m, Shift) for m in modules) == 2 * (2 * depth + 1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)


def test_gradients_equal_the_plain_layers(exact_float32):
    model = create_unet(UNetConfig(in_bands=3, num_classes=4, depth=2, base_width=4), seed=3)
    model.eval()
    x = jax.random.normal(jax.random.key(3), (1, 16, 16, 3))

    def loss(m, forward):
        return jnp.sum(forward(m, x) ** 2)

    ours = nnx.grad(lambda m: loss(m, lambda m, x: m(x)))(model)
    plain = nnx.grad(lambda m: loss(m, plain_forward))(model)
    for (path, a), (_, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(plain)):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-3, atol=1e-4, err_msg=str(path))


@pytest.mark.parametrize("batch", [1, 3])
def test_tile_by_tile_equals_the_whole_batch(tiny_checkpoint, batch):
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 16, TINY.factor)
    x = np.random.default_rng(batch).standard_normal((batch, 4, spec.read_size, spec.read_size)).astype(np.float32)
    tiles = Predictor(checkpoint, spec, 4, probabilities=True, sequential=True)
    whole = Predictor(checkpoint, spec, 4, probabilities=True, sequential=False)
    assert tiles.sequential and not whole.sequential
    a, b = tiles(x), whole(x)
    assert a.classes.shape == (batch, 32, 32)
    assert (a.classes == b.classes).mean() >= 0.999
    assert np.abs(a.confidence.astype(int) - b.confidence.astype(int)).max() <= 1
    assert np.abs(a.probabilities.astype(int) - b.probabilities.astype(int)).max() <= 1
    assert tiles.compiled_count() == 1


def test_the_predictor_computes_wide_blocks_by_winograd_with_the_same_results(tiny_checkpoint, monkeypatch):
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 16, TINY.factor)
    x = np.random.default_rng(5).standard_normal((3, 4, spec.read_size, spec.read_size)).astype(np.float32)
    monkeypatch.setenv("TILEPIPE_WINOGRAD", "0")
    direct = Predictor(checkpoint, spec, 4, probabilities=True)
    monkeypatch.setenv("TILEPIPE_WINOGRAD", str(TINY.base_width))  # every block of the tiny model
    wide = Predictor(checkpoint, spec, 4, probabilities=True)
    assert (direct.winograd_width, wide.winograd_width) == (None, TINY.base_width)
    a, b = direct(x), wide(x)
    assert (a.classes == b.classes).mean() >= 0.999
    assert np.abs(a.probabilities.astype(int) - b.probabilities.astype(int)).max() <= 1


@pytest.mark.parametrize("winograd,bfloat16_products", [("0", 3), ("8", 16 * 7), ("128", 0)])
def test_bfloat16_on_cpu_is_the_winograd_products_only(tiny_checkpoint, monkeypatch, winograd, bfloat16_products):
    """With Winograd's blocks, bfloat16 on CPU is their matrix multiplies' operands and nothing
    else (XLA's bfloat16 convolutions are no faster there); without them, the whole pass, as on
    accelerators (its 2 up-samplings and the head are matrix multiplies too). The tiny model's
    blocks are 4, 8, 16 and 8, 4 wide: from 8, 6 convolutions, the decoder's first in two
    parts, each of 16 products."""
    monkeypatch.setenv("TILEPIPE_WINOGRAD", winograd)
    predictor = Predictor(load_checkpoint(tiny_checkpoint), tile_spec(32, 16, TINY.factor), 2, precision="bfloat16")
    lines = predictor.lower(np.uint16).as_text().splitlines()
    convolutions = [line for line in lines if "stablehlo.convolution" in line]
    products = [line for line in lines if "stablehlo.dot_general" in line and "bf16>, tensor<" in line]
    assert len(products) == bfloat16_products
    assert all(("bf16" in line) == (winograd == "0") for line in convolutions) and convolutions


def test_cpu_devices_run_tile_by_tile_by_default(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert Predictor(checkpoint, tile_spec(32, 16, TINY.factor), 2, devices=jax.devices("cpu")[:1]).sequential
    assert Predictor(checkpoint, tile_spec(32, 16, TINY.factor), 2).sequential


@pytest.mark.parametrize("given,added,expected", [
    ({}, True, f"{YNN_CONVOLUTIONS_OFF} --xla_force_host_platform_device_count=3 {OLDER_EMITTERS}"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, True,
     f"--xla_force_host_platform_device_count=2 {YNN_CONVOLUTIONS_OFF} {OLDER_EMITTERS}"),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}, True,
     "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION "
     f"--xla_force_host_platform_device_count=3 {OLDER_EMITTERS}"),
    ({"XLA_FLAGS": f"{YNN_CONVOLUTIONS_OFF} --xla_force_host_platform_device_count=1 --xla_cpu_use_fusion_emitters=true"},
     False, f"{YNN_CONVOLUTIONS_OFF} --xla_force_host_platform_device_count=1 --xla_cpu_use_fusion_emitters=true"),
    ({"JAX_NUM_CPU_DEVICES": "1"}, True, f"{YNN_CONVOLUTIONS_OFF} {OLDER_EMITTERS}"),
    ({"TILEPIPE_XLA_DEFAULTS": "0"}, False, None),
])
def test_xla_defaults_leave_the_users_flags_alone(given, added, expected):
    environ = dict(given)
    assert apply_default_xla_flags(environ, cores=3, features=frozenset({"avx2", "fma"}), jaxlib="0.10") is added
    assert environ.get("XLA_FLAGS") == expected


@pytest.mark.parametrize("jaxlib", ["0.11", "0.9"])
def test_cpu_flags_only_under_the_jaxlib_they_were_measured_on(jaxlib):
    # XLA ends a process whose XLA_FLAGS names a flag it does not know
    environ = {}
    assert apply_default_xla_flags(environ, cores=3, features=frozenset({"avx512f"}), jaxlib=jaxlib)
    assert environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
    mine = {"XLA_FLAGS": OLDER_EMITTERS}
    apply_default_xla_flags(mine, cores=3, jaxlib=jaxlib)
    assert mine["XLA_FLAGS"] == f"{OLDER_EMITTERS} --xla_force_host_platform_device_count=3"


@pytest.mark.parametrize("features,chosen", [
    ({"avx2", "fma"}, YNN_CONVOLUTIONS_OFF),
    ({"avx2", "fma", "avx512f", "avx512bw"}, YNN_CONVOLUTIONS_ON),
    (set(), YNN_CONVOLUTIONS_OFF),  # not x86 Linux: as on AVX2
])
def test_convolutions_go_to_the_library_measured_faster_on_the_cpu(features, chosen):
    environ = {}
    assert apply_default_xla_flags(environ, cores=2, features=frozenset(features), jaxlib="0.10")
    assert environ["XLA_FLAGS"] == f"{chosen} --xla_force_host_platform_device_count=2 {OLDER_EMITTERS}"
    mine = {"XLA_FLAGS": YNN_CONVOLUTIONS_OFF}  # the user's choice wins on any CPU
    apply_default_xla_flags(mine, cores=2, features=frozenset(features), jaxlib="0.10")
    assert mine["XLA_FLAGS"] == f"{YNN_CONVOLUTIONS_OFF} --xla_force_host_platform_device_count=2 {OLDER_EMITTERS}"


def test_winograd_blocks_compute_by_matrix_multiplies_only():
    """The copy's wide blocks leave XLA no convolution: 12 in the model (2 per block of 2 down,
    the bottleneck and 2 up, the decoder's first as 2 halves: 2 + 2 + 2 + 3 + 3), 5 of them
    32 wide; the blocks' parameters are the 16 matrices of each part."""
    model = create_unet(UNetConfig(in_bands=3, num_classes=4, depth=2, base_width=32))  # blocks 32, 64, 128 wide
    model.eval()
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def convolutions(m) -> int:
        graphdef, state = nnx.split(m)
        text = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).as_text()
        return text.count("stablehlo.convolution")

    copy = winograd_copy(model, 64)
    assert convolutions(model) == 12 and convolutions(copy) == 5
    assert isinstance(copy.bottleneck.conv1, WinogradConv) and not isinstance(model.bottleneck.conv1, WinogradConv)
    assert [len(part) for part in copy.up[0].conv1.parts] == [16, 16]  # the up-sampled input's, the skip's
    assert copy.up[0].conv1.parts[1][0][...].shape == (64, 64) and isinstance(copy.up[1].conv1, nnx.Conv)


@pytest.mark.parametrize("platform,environ,width", [
    ("cpu", {}, WINOGRAD_WIDTH),  # in either precision (bfloat16: test_bfloat16_on_cpu_is_the_winograd_products_only)
    ("cpu", {"TILEPIPE_WINOGRAD": "64"}, 64),
    ("cpu", {"TILEPIPE_WINOGRAD": "0"}, None),
    ("gpu", {}, None),  # accelerators' libraries choose their own algorithms
    ("tpu", {"TILEPIPE_WINOGRAD": "64"}, None),
])
def test_winograd_is_for_cpus(platform, environ, width):
    assert inference_width(platform, environ) == width


def test_winograd_width_from_the_environment_is_checked():
    with pytest.raises(ValueError, match="TILEPIPE_WINOGRAD must be a width"):
        inference_width("cpu", {"TILEPIPE_WINOGRAD": "yes"})


def test_cpu_features_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_features(str(cpuinfo)) == {"fpu", "sse2", "avx2", "avx512f"}
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu_features(str(tmp_path / "arm")) == frozenset()
    assert cpu_features(str(tmp_path / "missing")) == frozenset()


def test_importing_the_package_applied_the_defaults():
    import os

    assert jaxlib_release() == MEASURED_JAXLIB  # as pinned
    assert "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
    assert "xla_cpu_use_fusion_emitters" in os.environ.get("XLA_FLAGS", "")


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
    assert [p.batch for p in probes] == [len(jax.devices())]  # the first probe (one tile per device) always runs
