"""The compiled predictor: one shape per run, and tiling that does not show."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY
from pipeline.infer import Predictor, get_predictor, normalise, unpack_valid
from pipeline.io import Normaliser, pack_valid
from pipeline.windows import plan_tiles, reflect_indices, seamless_halo, tile_spec
from unet_flax.checkpoint import load_checkpoint
from unet_flax.model import UNetConfig, create_unet


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
def test_normalising_maps_raw_values_and_zeroes_invalid_pixels(dtype):
    norm = Normaliser(scale=(2.0, 1.0), offset=(0.0, -1.0), mean=(4.0, 0.0), std=(2.0, 0.5))
    x = np.array([[[[3, 5]], [[1, 2]]]], dtype)  # one tile, bands first
    valid = np.array([[[True, False]]])
    z = np.asarray(normalise(x, valid, *norm.gain_bias))
    assert z.shape == (1, 2, 1, 2) and z.dtype == np.float32  # bands stay first
    np.testing.assert_allclose(z[0, :, 0, 0], [(3 * 2 - 4) / 2, (1 - 1) / 0.5])
    np.testing.assert_array_equal(z[0, :, 0, 1], [0.0, 0.0])  # the mean, where the input has no value


@given(st.integers(1, 3), st.integers(1, 40), st.data())
@settings(max_examples=50, deadline=None)
def test_validity_travels_as_bits_and_arrives_whole(tiles, size, data):
    valid = np.array(data.draw(st.lists(st.booleans(), min_size=tiles * size * size, max_size=tiles * size * size)),
                     bool).reshape(tiles, size, size)
    packed = pack_valid(valid)
    assert packed.dtype == np.uint8 and packed.shape == (tiles, size, -(-size // 8))
    np.testing.assert_array_equal(np.asarray(unpack_valid(packed, size)), valid)


def test_invalid_pixels_may_hold_anything():
    x = np.array([[[[np.nan, np.inf, 1.0]]]], np.float32)
    z = np.asarray(normalise(x, np.array([[[False, False, True]]]), np.ones(1, np.float32), np.zeros(1, np.float32)))
    np.testing.assert_array_equal(z, [[[[0.0, 0.0, 1.0]]]])


@pytest.mark.parametrize("config", [TINY, UNetConfig(in_bands=2, num_classes=2, depth=3, base_width=2)])
def test_receptive_radius_bounds_the_measured_gradient_support(config):
    model = create_unet(config, seed=0)
    model.eval()
    size = 4 * config.receptive_radius
    size += -size % config.factor
    centre = size // 2

    graphdef, state = nnx.split(model)

    def centre_logit(state, x):
        return nnx.merge(graphdef, state)(x)[0, centre, centre].sum()

    x = jax.random.normal(jax.random.key(0), (1, size, size, config.in_bands))
    grad = np.abs(np.asarray(jax.jit(jax.grad(centre_logit, argnums=1))(state, x)))[0].sum(-1)
    rows, cols = np.nonzero(grad)
    reach = max(np.abs(rows - centre).max(), np.abs(cols - centre).max())
    assert 0.5 * config.receptive_radius < reach <= config.receptive_radius


def test_the_device_counts_each_class_in_the_written_part_of_the_cores(tiny_checkpoint):
    spec = tile_spec(32, 28, TINY.factor)
    checkpoint = load_checkpoint(tiny_checkpoint)
    predictor = Predictor(checkpoint, spec, batch=4)  # three tiles and a padding one
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, spec.read_size, spec.read_size)).astype(np.float32)
    valid = rng.random((3, spec.read_size, spec.read_size)) > 0.3
    extents = np.array([(32, 32), (32, 5), (17, 32)], np.int32)  # a whole core, then two at the raster's edge
    out = predictor(x, pack_valid(valid), None, extents)
    index = np.zeros(256, int)
    index[checkpoint.card.codes] = np.arange(len(checkpoint.card.codes))
    want = sum(np.bincount(index[out.classes[i, :h, :w]][valid[i, 28 : 28 + h, 28 : 28 + w]], minlength=3)
               for i, (h, w) in enumerate(extents))
    np.testing.assert_array_equal(out.class_pixels, want)
    assert out.class_pixels.dtype == np.int64 and out.class_pixels.sum() < 0.7 * (32 * 32 + 32 * 5 + 17 * 32)
    assert predictor(x).class_pixels.sum() == 3 * 32 * 32  # whole cores, every pixel valid


def test_short_batches_are_padded_and_compiled_once(tiny_checkpoint):
    spec = tile_spec(32, 28, TINY.factor)
    predictor = Predictor(load_checkpoint(tiny_checkpoint), spec, batch=4)
    rng = np.random.default_rng(0)
    spans = []
    for n in (4, 1, 3):
        out = predictor(rng.standard_normal((n, 4, spec.read_size, spec.read_size)).astype(np.float32))
        assert out.classes.shape == (n, 32, 32) and out.classes.dtype == np.uint8
        assert out.confidence.shape == (n, 32, 32) and out.confidence.max() <= 100
        spans.append(out.span)
    assert predictor.compiled_count() == 1
    assert all(start < end for start, end in spans)  # each batch's time on the device, in call order
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


def test_predictor_is_cached_per_process(tiny_checkpoint):
    spec = tile_spec(32, 28, TINY.factor)
    sha = load_checkpoint(tiny_checkpoint).sha256
    assert get_predictor(tiny_checkpoint, sha, spec, 2) is get_predictor(tiny_checkpoint, sha, spec, 2)


def tiled_logits_classes(predictor, image, spec):
    """Classes of ``image`` (rows, cols, bands) predicted tile by tile, stitched."""
    height, width = image.shape[:2]
    out = np.zeros((height, width), np.uint8)
    for tile in plan_tiles(width, height, spec):
        rows = reflect_indices(tile.read.row_off, tile.read.row_off + spec.read_size, height)
        cols = reflect_indices(tile.read.col_off, tile.read.col_off + spec.read_size, width)
        pred = predictor(np.moveaxis(image[np.ix_(rows, cols)], -1, 0)[None]).classes[0]
        c = tile.core
        out[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] = pred[: c.height, : c.width]
    return out


@pytest.mark.parametrize("tile", [32, 48, 96])
def test_tiled_inference_equals_whole_image_inference_when_halo_covers_the_receptive_field(tiny_checkpoint, tile):
    checkpoint = load_checkpoint(tiny_checkpoint)
    halo = seamless_halo(TINY.receptive_radius, TINY.factor)
    image = np.random.default_rng(1).standard_normal((90, 110, 4)).astype(np.float32)
    tiled = tiled_logits_classes(Predictor(checkpoint, tile_spec(tile, halo, TINY.factor), 1), image,
                                 tile_spec(tile, halo, TINY.factor))
    # The whole image, reflected by the halo and up to a multiple of the factor, in one pass.
    height, width = image.shape[:2]
    big_h = height + 2 * halo + (-height % TINY.factor)
    big_w = width + 2 * halo + (-width % TINY.factor)
    padded = image[np.ix_(reflect_indices(-halo, big_h - halo, height), reflect_indices(-halo, big_w - halo, width))]
    logits = checkpoint.model(jnp.asarray(padded[None]))[0, halo : halo + height, halo : halo + width]
    whole = np.asarray(jnp.argmax(logits, -1)).astype(np.uint8)
    agreement = (tiled == whole).mean()
    assert agreement >= 0.9999, agreement  # exact up to float ties between near-equal logits


def test_a_narrow_halo_does_show_at_tile_edges(tiny_checkpoint):
    """The equality above is not vacuous: without context the seams differ."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    image = np.random.default_rng(1).standard_normal((64, 64, 4)).astype(np.float32)
    a = tiled_logits_classes(Predictor(checkpoint, tile_spec(16, 0, 4), 1), image, tile_spec(16, 0, 4))
    b = tiled_logits_classes(Predictor(checkpoint, tile_spec(64, 0, 4), 1), image, tile_spec(64, 0, 4))
    assert (a != b).any()


def test_confidence_is_computed_only_when_asked_for(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    spec = tile_spec(32, 16, TINY.factor)
    x = np.random.default_rng(3).standard_normal((2, 4, spec.read_size, spec.read_size)).astype(np.float32)
    plain = Predictor(checkpoint, spec, 2, confidence=False)(x)
    full = Predictor(checkpoint, spec, 2, probabilities=True)(x)
    assert plain.confidence is None and plain.probabilities is None
    np.testing.assert_array_equal(plain.classes, full.classes)
    assert full.confidence.shape == full.classes.shape and full.probabilities.shape == (*full.classes.shape, 3)
