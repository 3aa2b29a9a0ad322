"""Winograd's F(2x2, 3x3): the same convolution as XLA's, to float32 rounding."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_flax import winograd


def direct(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The 'VALID' 3x3 convolution, by XLA, in full float32."""
    return np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                   precision=jax.lax.Precision.HIGHEST))


def random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("n,h,w,c,o", [(1, 4, 4, 1, 1), (2, 10, 8, 5, 7), (1, 6, 12, 3, 16), (1, 34, 18, 32, 8)])
def test_equals_the_direct_convolution(n, h, w, c, o):
    rng = np.random.default_rng(h * w + c)
    x, kernel = random(rng, n, h, w, c), random(rng, 3, 3, c, o)
    got = np.asarray(winograd.conv3x3([(x, winograd.transform_kernel(kernel))]))
    np.testing.assert_allclose(got, direct(x, kernel), rtol=1e-5, atol=1e-5 * np.sqrt(9 * c))


def test_parts_sum_to_the_convolution_of_their_concatenation():
    rng = np.random.default_rng(0)
    a, b, kernel = random(rng, 2, 8, 10, 3), random(rng, 2, 8, 10, 5), random(rng, 3, 3, 8, 4)
    got = winograd.conv3x3([(a, winograd.transform_kernel(kernel[:, :, :3])),
                            (b, winograd.transform_kernel(kernel[:, :, 3:]))])
    np.testing.assert_allclose(np.asarray(got), direct(np.concatenate([a, b], axis=-1), kernel), rtol=1e-5, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(half_h=st.integers(1, 9), half_w=st.integers(1, 9), c=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_any_even_output_is_the_direct_convolution(half_h, half_w, c, seed):
    rng = np.random.default_rng(seed)
    x, kernel = random(rng, 1, 2 * half_h + 2, 2 * half_w + 2, c), random(rng, 3, 3, c, 2)
    got = np.asarray(winograd.conv3x3([(x, winograd.transform_kernel(kernel))]))
    np.testing.assert_allclose(got, direct(x, kernel), rtol=1e-5, atol=1e-5 * np.sqrt(9 * c))


def test_the_kernel_becomes_sixteen_matrices_over_channels():
    rng = np.random.default_rng(1)
    kernel = random(rng, 3, 3, 4, 6)
    matrices = winograd.transform_kernel(kernel)
    assert len(matrices) == 16 and all(m.shape == (4, 6) for m in matrices)
    np.testing.assert_allclose(np.asarray(matrices[0]), kernel[0, 0])  # (G g G^T)[0, 0] = g[0, 0]
    np.testing.assert_allclose(np.asarray(matrices[15]), kernel[2, 2])  # and [3, 3] = g[2, 2]


@pytest.mark.parametrize("shape", [(1, 5, 6, 2), (1, 6, 5, 2), (1, 2, 2, 2)])
def test_odd_or_empty_outputs_are_refused(shape):
    kernel = np.zeros((3, 3, 2, 1), np.float32)
    with pytest.raises(ValueError, match="even output sides"):
        winograd.conv3x3([(np.zeros(shape, np.float32), winograd.transform_kernel(kernel))])


def test_bfloat16_matrices_multiply_in_bfloat16_and_sum_in_float32():
    """The products' operands take the matrices' dtype, their sums float32: the convolution to
    bfloat16's rounding, and the result float32 whatever the matrices."""
    rng = np.random.default_rng(2)
    x, kernel = random(rng, 1, 18, 14, 64), random(rng, 3, 3, 64, 32)
    matrices = [m.astype(jax.numpy.bfloat16) for m in winograd.transform_kernel(kernel)]
    got = winograd.conv3x3([(x, matrices)])
    want = direct(x, kernel)
    assert got.dtype == np.float32
    error = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert 1e-4 < error < 2e-2, error  # rounded (not float32's 1e-6), but no more than bfloat16's
    text = jax.jit(lambda x: winograd.conv3x3([(x, matrices)])).lower(x).as_text()
    products = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(products) == 16 and all("bf16>, tensor<64x32xbf16>) -> tensor<" in p and "xf32>" in p for p in products)
