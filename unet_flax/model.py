"""The U-Net: conv+pool encoder, up-sampling decoder joined by skip connections, 1x1 head.

Batch normalisation is used in eval mode at inference, where it is a per-pixel affine map:
a pixel's logits then depend only on the inputs inside its receptive field, which is what
makes tiled inference with a wide enough halo equal whole-image inference.

The forward pass is written for memory traffic, which is what XLA's CPU backend is short of
(every op between two convolutions is a full pass over a large activation): the decoder's
first convolution over ``concat([up, skip])`` is computed as the sum of two convolutions
over its kernel's halves, so the concatenation is never written; the 2x2 stride-2
transposed convolution is one matrix multiply followed by depth-to-space (XLA's
``conv_transpose`` computes on a zero-dilated input); max-pooling is a reshape and max.
Where XLA hands convolutions to YNNPACK, the wide ones (``eigen_width`` channels and more)
go to Eigen's instead, which is faster there (see :mod:`unet_flax.xla_flags`).
The parameter tree is that of the plain layers, so checkpoints do not depend on this, and
tests check the forward against the plain layers. ``dtype`` is the compute dtype
(parameters stay float32 and are cast in the forward; batch-norm statistics and the logits
stay float32). For inference, :func:`fold_batch_norm` folds each batch norm's scale into
the convolution before it, leaving a per-channel shift: fewer operations to trace and
compile, the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unet_flax.card import UNetConfig


def flops_per_pixel(config: UNetConfig) -> int:
    """Multiply-adds x 2 of one forward pass, per input pixel (convolutions only).

    A 3x3 conv from ``a`` to ``b`` channels costs ``2 * 9 * a * b`` per pixel of its scale;
    a 2x2 stride-2 transposed conv ``2 * a * b`` per output pixel; the 1x1 head
    ``2 * w0 * classes``. Level ``l`` holds ``1 / 4**l`` of the pixels. Batch norm, ReLU,
    pooling and the softmax are left out (elementwise, a few FLOPs per value). For the
    classic U-Net (depth 4, width 32, 6 bands, 8 classes) this is 370,560.
    """
    w = config.widths
    total = 0.0
    for level in range(config.depth):
        cin = config.in_bands if level == 0 else w[level - 1]
        encoder = 18 * (cin * w[level] + w[level] * w[level])
        decoder = 18 * (2 * w[level] * w[level] + w[level] * w[level]) + 2 * w[level + 1] * w[level]
        total += (encoder + decoder) / 4**level
    total += 18 * (w[-2] * w[-1] + w[-1] * w[-1]) / 4**config.depth
    total += 2 * w[0] * config.num_classes
    return int(round(total))


def _conv3x3(x: jax.Array, kernel: jax.Array, dtype, eigen: bool = False) -> jax.Array:
    """A 3x3 'SAME' convolution without bias, computed in ``dtype``; with ``eigen``, by XLA's
    Eigen convolution even where YNNPACK takes convolutions."""
    # XLA gives YNNPACK no convolution whose output is taller than its input: one row more, dropped.
    padding = ((1, 2), (1, 1)) if eigen else "SAME"
    y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[:, :-1] if eigen else y


def _upsample(conv: nnx.ConvTranspose, x: jax.Array, dtype) -> jax.Array:
    """The 2x2 stride-2 transposed convolution (with bias) that doubles the resolution."""
    kernel = conv.kernel[...].astype(dtype)  # (2, 2, c, o)
    n, h, w, c = x.shape
    o = kernel.shape[-1]
    # lax.conv_transpose (transpose_kernel=False) puts x[i, j] @ kernel[1 - a, 1 - b] at (2i + a, 2j + b).
    y = jnp.dot(x.astype(dtype), kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, 4 * o))  # (n, h, w, 2*2*o)
    y = y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)
    return y + conv.bias[...].astype(dtype)


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (sizes are multiples of 2 at every level)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _norm_relu(norm: nnx.BatchNorm | Shift, x: jax.Array, dtype) -> jax.Array:
    """Batch norm (or its folded shift) in float32, ReLU, back to ``dtype``.

    A folded model only runs forward, so its ReLU is a plain maximum: one operation to trace
    and lower, where ``nnx.relu`` is a function with a custom gradient (for its value at 0).
    """
    y = norm(x.astype(jnp.float32))
    return (jnp.maximum(y, 0.0) if isinstance(norm, Shift) else nnx.relu(y)).astype(dtype)


class Shift(nnx.Module):
    """What remains of an eval-mode batch norm once its scale is folded into the convolution
    before it: a per-channel shift."""

    def __init__(self, shift: jax.Array):
        self.shift = nnx.Param(shift)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.shift[...]


class ConvBlock(nnx.Module):
    """Two 3x3 conv -> batch norm -> ReLU layers."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None, *, dtype=jnp.float32,
                 eigen: bool = False) -> jax.Array:
        """The block on ``x``, or on ``concat([x, skip])`` along channels when ``skip`` is given.

        The concatenation is not formed: ``conv1`` is applied to each part with its share of
        the kernel's input channels and the two results are added (the same sum). ``eigen``:
        see :func:`_conv3x3`.
        """
        kernel = self.conv1.kernel[...]
        c = x.shape[-1]
        y = _conv3x3(x, kernel[:, :, :c], dtype, eigen)
        if skip is not None:
            y = y + _conv3x3(skip, kernel[:, :, c:], dtype, eigen)
        x = _norm_relu(self.norm1, y, dtype)
        return _norm_relu(self.norm2, _conv3x3(x, self.conv2.kernel[...], dtype, eigen), dtype)

    @property
    def width(self) -> int:
        """Channels out."""
        return self.conv2.out_features


class UNet(nnx.Module):
    """Maps NHWC inputs with ``in_bands`` channels to NHWC class logits."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = config.widths
        self.down = nnx.List(
            [ConvBlock(config.in_bands if i == 0 else widths[i - 1], widths[i], rngs=rngs) for i in range(config.depth)]
        )
        self.bottleneck = ConvBlock(widths[-2], widths[-1], rngs=rngs)
        self.upsample = nnx.List(
            [nnx.ConvTranspose(widths[i + 1], widths[i], (2, 2), strides=(2, 2), rngs=rngs) for i in reversed(range(config.depth))]
        )
        self.up = nnx.List([ConvBlock(2 * widths[i], widths[i], rngs=rngs) for i in reversed(range(config.depth))])
        self.head = nnx.Conv(widths[0], config.num_classes, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array, *, dtype=jnp.float32, eigen_width: int | None = None) -> jax.Array:
        """Logits (float32) of NHWC ``x``, computed in ``dtype``; the convolutions of blocks
        ``eigen_width`` channels wide or wider by Eigen (see the module doc)."""
        dtype = jnp.dtype(dtype)
        x = x.astype(dtype)

        def eigen(block: ConvBlock) -> bool:
            return eigen_width is not None and block.width >= eigen_width

        skips = []
        for block in self.down:
            x = block(x, dtype=dtype, eigen=eigen(block))
            skips.append(x)
            x = _max_pool(x)
        x = self.bottleneck(x, dtype=dtype, eigen=eigen(self.bottleneck))
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            x = block(_upsample(upsample, x, dtype), skip, dtype=dtype, eigen=eigen(block))
        head = self.head.kernel[...][0, 0].astype(dtype)
        return jnp.dot(x, head, preferred_element_type=jnp.float32) + self.head.bias[...]


def create_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A freshly initialised U-Net."""
    return UNet(config, rngs=nnx.Rngs(seed))


def fold_batch_norm(model: UNet) -> UNet:
    """An inference copy of ``model``: every batch norm, in eval mode (running statistics),
    folded into the bias-free convolution before it.

    ``norm(conv(x, k)) = conv(x, k * a) + (beta - mean * a)`` with
    ``a = gamma / sqrt(var + eps)`` per output channel, so the kernel is rescaled once and the
    norm becomes a :class:`Shift`. ``model`` itself is left as it is.
    """
    folded = nnx.clone(model)
    for block in (*folded.down, folded.bottleneck, *folded.up):
        for conv, name in ((block.conv1, "norm1"), (block.conv2, "norm2")):
            norm = getattr(block, name)
            a = norm.scale[...] * jax.lax.rsqrt(norm.var[...] + norm.epsilon)
            conv.kernel[...] = conv.kernel[...] * a
            setattr(block, name, Shift(norm.bias[...] - norm.mean[...] * a))
    return folded
