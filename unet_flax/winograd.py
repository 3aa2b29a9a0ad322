"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).

Each 2x2 block of outputs is computed from the 4x4 block of inputs around it: the input block
and the kernel are each transformed into 16 values per channel, the 16 products are
matrix multiplies over channels, and the output transform sums them back into 2x2 outputs.
That is 16 multiplies per 4 outputs where a direct convolution makes 36: 2.25x fewer
FLOPs, the rest being additions on the way in and out. Where channels are wide the matrix
multiplies dominate and run at the rate of a matrix multiply, which XLA's CPU convolutions
do not reach (:data:`WIDTH`). The results equal the direct
convolution's to float32 rounding (the transforms' coefficients are 0, +-1 and +-1/2).

The transforms are plain slices, additions and subtractions, which XLA fuses into a few
loops; the 16 products are 16 separate dots (stacking them into one batched dot costs a copy
of the transformed input). With the 16 matrices in bfloat16 the products take bfloat16
operands and sum in float32, the transforms staying float32: the one place on a CPU where
bfloat16 pays, since XLA gives its bfloat16 units (AMX) such matrix multiplies, never its
convolutions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

WIDTH = 128
"""Channels from which a block's convolutions measured faster by F(2x2, 3x3) than by XLA's
own, float32 on CPU (a 384^2 tile on one core of an AVX-512 Xeon: 1.5x at 96^2 x 128
channels, 1.8x at 48^2 x 256 and 24^2 x 512; 1.6-1.8x slower at 192^2 x 64, where the transforms,
memory-bound, cost more than the multiplies save)."""

_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
"""The input transform B^T: a 4x4 input block d becomes B^T d B."""
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
"""The kernel transform G: a 3x3 kernel g becomes G g G^T."""
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
"""The output transform A^T: 4x4 products m become the 2x2 outputs A^T m A."""


def inference_width(platform: str, environ: Mapping[str, str] = os.environ) -> int | None:
    """The width from which the predictor has blocks compute by Winograd
    (:func:`unet_flax.model.winograd_copy`): :data:`WIDTH` on CPU, in either precision (in
    bfloat16, the products only); None on accelerators, whose libraries choose their own
    algorithms. ``TILEPIPE_WINOGRAD=0`` turns it off, ``TILEPIPE_WINOGRAD=N`` sets the width."""
    chosen = environ.get("TILEPIPE_WINOGRAD", "").strip()
    if chosen and not chosen.isdigit():
        raise ValueError(f"TILEPIPE_WINOGRAD must be a width (0: off), got {chosen!r}")
    if chosen == "0" or platform != "cpu":
        return None
    return int(chosen) if chosen else WIDTH


def _combine(matrix: Sequence[Sequence[int]], parts: Sequence[jax.Array]) -> list[jax.Array]:
    """Each row of ``matrix`` (coefficients 0 and +-1) applied to ``parts``: its signed sum."""
    out = []
    for row in matrix:
        terms = [(c, p) for c, p in zip(row, parts) if c]
        total = terms[0][1] if terms[0][0] > 0 else -terms[0][1]
        for c, p in terms[1:]:
            total = total + p if c > 0 else total - p
        out.append(total)
    return out


def transform_kernel(kernel: jax.Array) -> tuple[jax.Array, ...]:
    """A 3x3 HWIO kernel (3, 3, c, o) as the 16 matrices (c, o) that multiply the transformed
    input blocks, in the order of :func:`conv3x3`'s products. Separate arrays: a slice of one
    stacked array would be a copy in every call."""
    g = jnp.asarray(_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=jax.lax.Precision.HIGHEST)
    return tuple(u[a, b] for a in range(4) for b in range(4))


def _input_blocks(x: jax.Array) -> list[jax.Array]:
    """The 16 transformed values of each 4x4 block (stride 2) of NHWC ``x``, as 16 arrays
    (n, h', w', c), one per value; ``x``'s sides are 2 h' + 2 and 2 w' + 2."""
    h, w = (x.shape[1] - 2) // 2, (x.shape[2] - 2) // 2
    rows = _combine(_BT, [x[:, i:i + 2 * h:2] for i in range(4)])
    return [v for r in rows for v in _combine(_BT, [r[:, :, j:j + 2 * w:2] for j in range(4)])]


def conv3x3(inputs: Sequence[tuple[jax.Array, Sequence[jax.Array]]]) -> jax.Array:
    """The sum over ``(x, u)`` of the 'VALID' 3x3 convolution of NHWC ``x`` by the kernel
    whose :func:`transform_kernel` is ``u``.

    Every ``x`` has the same shape, each side 2 more than an even output side. The sum is
    taken over the products, before the output transform, so a convolution over
    ``concat(xs)`` along channels is computed without forming the concatenation. Each
    product's operands are in the dtype of its matrix in ``u``, its sum in float32, as is
    the result.
    """
    products = None
    for x, u in inputs:
        if (x.shape[1] - 2) % 2 or (x.shape[2] - 2) % 2 or x.shape[1] < 4 or x.shape[2] < 4:
            raise ValueError(f"Winograd F(2x2, 3x3) needs even output sides, got input {x.shape}")
        terms = [jnp.dot(v.astype(u[i].dtype), u[i], preferred_element_type=jnp.float32)
                 for i, v in enumerate(_input_blocks(x))]
        products = terms if products is None else [p + t for p, t in zip(products, terms)]
    m = [products[4 * a:4 * a + 4] for a in range(4)]  # m[a][b]: the product for value (a, b) of a block
    columns = [_combine(_AT, [m[a][b] for a in range(4)]) for b in range(4)]  # columns[b][p] = (A^T m)[p, b]
    y = [_combine(_AT, [columns[b][p] for b in range(4)]) for p in range(2)]  # y[p][q] = (A^T m A)[p, q]
    n, h, w, o = y[0][0].shape
    return jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2).reshape(n, 2 * h, 2 * w, o)
