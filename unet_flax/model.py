"""The U-Net: conv+pool encoder, up-sampling decoder joined by skip connections, 1x1 head.

Batch normalisation is used in eval mode at inference, where it is a per-pixel affine map:
a pixel's logits then depend only on the inputs inside its receptive field, which is what
makes tiled inference with a wide enough halo equal whole-image inference. The encoder must
see a tile's halo, but the decoder need not compute it: given the tile's ``core``, each
decoder level computes only the region the core's logits depend on (:func:`decoder_regions`),
30% fewer FLOPs for a 256 core in a 384 tile, 1.4x faster on CPU.

The forward pass is written for memory traffic, which is what XLA's CPU backend is short of
(every op between two convolutions is a full pass over a large activation): the decoder's
first convolution over ``concat([up, skip])`` is computed as the sum of two convolutions
over its kernel's halves, so the concatenation is never written; the 2x2 stride-2
transposed convolution is one matrix multiply followed by depth-to-space (XLA's
``conv_transpose`` computes on a zero-dilated input); max-pooling is a reshape and max.
The parameter tree is that of the plain layers, so checkpoints do not depend on this, and
tests check the forward against the plain layers. ``dtype`` is the compute dtype
(parameters stay float32 and are cast in the forward; batch-norm statistics and the logits
stay float32). For inference, :func:`fold_batch_norm` folds each batch norm's scale into
the convolution before it, leaving a per-channel shift: fewer operations to trace and
compile, the same function. :func:`winograd_copy` then has the wide blocks compute their
convolutions by Winograd's F(2x2, 3x3) (:mod:`unet_flax.winograd`), which the predictor
does on CPU: 2.25x fewer multiplies, the same function to float32 rounding (to bfloat16's in
the products, with the matrices in bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unet_flax import winograd
from unet_flax.card import UNetConfig


def flops_per_pixel(config: UNetConfig) -> int:
    """Multiply-adds x 2 of one whole forward pass, per input pixel (convolutions only;
    :func:`forward_flops` of an input ``factor`` pixels square, per pixel).

    A 3x3 conv from ``a`` to ``b`` channels costs ``2 * 9 * a * b`` per pixel of its scale;
    a 2x2 stride-2 transposed conv ``2 * a * b`` per output pixel; the 1x1 head
    ``2 * w0 * classes``. Level ``l`` holds ``1 / 4**l`` of the pixels. Batch norm, ReLU,
    pooling and the softmax are left out (elementwise, a few FLOPs per value). For the
    classic U-Net (depth 4, width 32, 6 bands, 8 classes) this is 370,560.
    """
    side = config.factor  # the whole pass's FLOPs are the same on every pixel of any such multiple
    return forward_flops(config, (side, side)) // side**2


Region = tuple[tuple[int, int], tuple[int, int]]
"""Rows ``[r0, r1)`` and columns ``[c0, c1)`` of one level of the network."""


def _whole(x: jax.Array) -> Region:
    return (0, x.shape[1]), (0, x.shape[2])


def grow(region: Region, by: int, bounds: Region) -> Region:
    """``region`` grown by ``by`` on every side, within ``bounds``."""
    return tuple((max(lo - by, b0), min(hi + by, b1)) for (lo, hi), (b0, b1) in zip(region, bounds))


def within(held: Region, region: Region) -> tuple[slice, slice]:
    """The row and column slices that take the part ``region`` of a level out of an array
    holding its part ``held``."""
    return tuple(slice(lo - start, hi - start) for (lo, hi), (start, _) in zip(region, held))


def doubled(region: Region) -> Region:
    """``region`` of a level as the level above (twice the resolution) has it."""
    return tuple((2 * lo, 2 * hi) for lo, hi in region)


def _crop(x: jax.Array, held: Region, region: Region) -> jax.Array:
    """The part ``region`` of NHWC ``x``, which holds the part ``held`` of its level."""
    return x[:, *within(held, region)]


def _conv3x3(conv: nnx.Conv | WinogradConv, xs: list[jax.Array], dtype, held: Region | None = None,
             out: Region | None = None) -> jax.Array:
    """``conv`` (3x3 'SAME', without bias) of ``concat(xs)`` along channels, computed in
    ``dtype`` on the part ``out`` of the level (default: all that the ``xs`` hold) from the
    ``xs``, which hold the part ``held`` (default: all of it; with a row and column more around
    ``out`` wherever the level has them).

    The concatenation is not formed: each part of the input is convolved with its share of the
    kernel's input channels and the results are added (a :class:`WinogradConv` adds its
    products, before its output transform).
    """
    held = _whole(xs[0]) if held is None else held
    out = held if out is None else out
    window = grow(out, 1, held)
    if isinstance(conv, WinogradConv):
        # Zero rows and columns only where the window meets the level's edge, and one more
        # where a side of ``out`` is odd (F(2x2, 3x3) computes 2x2 blocks), dropped after.
        pads = [(1 - (o0 - w0), 1 - (w1 - o1) + (o1 - o0) % 2) for (o0, o1), (w0, w1) in zip(out, window)]
        y = winograd.conv3x3([(jnp.pad(_crop(x, held, window).astype(dtype), ((0, 0), *pads, (0, 0))),
                               [m[...] for m in part]) for x, part in zip(xs, conv.parts)])
        return y[:, :out[0][1] - out[0][0], :out[1][1] - out[1][0]]
    kernel, y, start = conv.kernel[...], None, 0
    for x in xs:
        # Zero-padded on every side, then cropped to ``out``: YNNPACK ran unpadded convolutions
        # 6x slower.
        term = jax.lax.conv_general_dilated(_crop(x, held, window).astype(dtype),
                                            kernel[:, :, start:start + x.shape[-1]].astype(dtype), (1, 1),
                                            ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y, start = (term if y is None else y + term), start + x.shape[-1]
    return y if out == window else _crop(y, window, out)


def decoder_regions(depth: int, shape: tuple[int, int], core: Region) -> tuple[list[Region], list[Region]]:
    """What the decoder computes for logits on ``core`` of an input of ``shape``: for each
    level, finest first, the region its block's output is needed on (then, last, the
    bottleneck's), and the region its inputs (up-sampled and skip) are needed on. Each 3x3
    convolution needs a pixel more around, each up-sampling half as much below."""
    outs, ins = [core], []
    for level in range(depth):
        ins.append(grow(outs[level], 2, ((0, shape[0] >> level), (0, shape[1] >> level))))
        outs.append(tuple((lo // 2, -(-hi // 2)) for lo, hi in ins[level]))
    return outs, ins


def forward_flops(config: UNetConfig, shape: tuple[int, int], core: Region | None = None) -> int:
    """Multiply-adds x 2 that :meth:`UNet.__call__` computes over an input of ``shape`` for
    logits on ``core`` (default: all of it; then :func:`flops_per_pixel` per pixel): the encoder
    whole, each decoder convolution on its output's region and a pixel around
    (:func:`decoder_regions`), the up-sampling on what the level below computed."""
    h, w = shape
    outs, ins = decoder_regions(config.depth, shape, ((0, h), (0, w)) if core is None else core)
    widths = config.widths

    def area(region: Region) -> int:
        (r0, r1), (c0, c1) = region
        return (r1 - r0) * (c1 - c0)

    def level(n: int) -> Region:
        return (0, h >> n), (0, w >> n)

    total = 2 * widths[0] * config.num_classes * area(outs[0])  # the head
    for n in range(config.depth):
        cin, c = (config.in_bands if n == 0 else widths[n - 1]), widths[n]
        total += 18 * (cin * c + c * c) * area(level(n))  # the encoder block, whole
        total += 18 * c * c * (2 * area(ins[n]) + area(grow(outs[n], 1, level(n))))  # the decoder block
        total += 2 * widths[n + 1] * c * 4 * area(outs[n + 1])  # up-sampled from below
    middle = grow(outs[-1], 1, level(config.depth))  # the bottleneck: conv1 from the pooled level, then conv2
    return total + 18 * widths[-1] * (widths[-2] * area(grow(middle, 1, level(config.depth))) + widths[-1] * area(middle))


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


class WinogradConv(nnx.Module):
    """An inference copy of a bias-free 3x3 convolution: its kernel as Winograd's 16 matrices
    (:func:`unet_flax.winograd.transform_kernel`) in ``dtype``, the products' operands, for
    each part of its input channels."""

    def __init__(self, kernel: jax.Array, splits: tuple[int, ...] = (), dtype=jnp.float32):
        self.out_features = kernel.shape[-1]
        parts = jnp.split(kernel, splits, axis=2) if splits else [kernel]
        self.parts = nnx.List([nnx.List([nnx.Param(m.astype(dtype)) for m in winograd.transform_kernel(p)])
                               for p in parts])


class ConvBlock(nnx.Module):
    """Two 3x3 conv -> batch norm -> ReLU layers."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array | None = None, *, dtype=jnp.float32,
                 held: Region | None = None, out: Region | None = None) -> jax.Array:
        """The block on ``x``, or on ``concat([x, skip])`` along channels when ``skip`` is given
        (never formed: see :func:`_conv3x3`, also for ``held``, the part of the level ``x`` and
        ``skip`` hold, and ``out``, the part computed)."""
        held = _whole(x) if held is None else held
        out = held if out is None else out
        middle = grow(out, 1, held)
        y = _norm_relu(self.norm1, _conv3x3(self.conv1, [x] if skip is None else [x, skip], dtype, held, middle), dtype)
        return _norm_relu(self.norm2, _conv3x3(self.conv2, [y], dtype, middle, out), dtype)

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

    def __call__(self, x: jax.Array, *, dtype=jnp.float32, core: Region | None = None) -> jax.Array:
        """Logits (float32) of NHWC ``x`` on its part ``core`` (default: all of it), computed in
        ``dtype``. The decoder computes only what ``core`` needs (:func:`decoder_regions`): the
        same values there as the whole pass."""
        dtype = jnp.dtype(dtype)
        x = x.astype(dtype)
        outs, ins = decoder_regions(self.config.depth, x.shape[1:3], _whole(x) if core is None else core)

        skips = []
        for block in self.down:
            x = block(x, dtype=dtype)
            skips.append(x)
            x = _max_pool(x)
        x = self.bottleneck(x, dtype=dtype, out=outs[-1])
        for upsample, block, skip, below, held, out in zip(self.upsample, self.up, reversed(skips),
                                                         reversed(outs[1:]), reversed(ins), reversed(outs[:-1])):
            up = _crop(_upsample(upsample, x, dtype), doubled(below), held)
            x = block(up, _crop(skip, _whole(skip), held), dtype=dtype, held=held, out=out)
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


def winograd_copy(model: UNet, width: int, dtype=jnp.float32) -> UNet:
    """An inference copy of ``model`` whose blocks ``width`` channels wide or wider hold their
    convolutions as :class:`WinogradConv`s (a decoder block's first one in two parts: the
    up-sampled input's channels, then the skip's), their matrices in ``dtype``; ``model``
    itself is left as it is."""
    copy = nnx.clone(model)
    for blocks, split in ((copy.down, False), ([copy.bottleneck], False), (copy.up, True)):
        for block in blocks:
            if block.width >= width:
                block.conv1 = WinogradConv(block.conv1.kernel[...], (block.width,) if split else (), dtype)
                block.conv2 = WinogradConv(block.conv2.kernel[...], dtype=dtype)
    return copy
