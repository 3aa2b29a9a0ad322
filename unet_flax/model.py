"""The U-Net: conv+pool encoder, up-sampling decoder joined by skip connections, 1x1 head.

Batch normalisation is used in eval mode at inference, where it is a per-pixel affine map:
a pixel's logits then depend only on the inputs inside its receptive field, which is what
makes tiled inference with a wide enough halo equal whole-image inference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of one U-Net; stored in every checkpoint."""

    in_bands: int
    num_classes: int
    depth: int = 4
    base_width: int = 32

    def __post_init__(self) -> None:
        for name in ("in_bands", "num_classes", "depth", "base_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Feature widths of the encoder levels and the bottleneck."""
        return tuple(self.base_width * 2**level for level in range(self.depth + 1))

    @property
    def factor(self) -> int:
        """Total down-sampling: tile origins and sizes must be multiples of it."""
        return 2**self.depth

    @property
    def receptive_radius(self) -> int:
        """An upper bound, in pixels, on how far an output pixel looks into the input.

        Each 3x3 conv at scale s adds s; each pool/up-sample pair at scale s adds at most s.
        Tests check this bound against the network's measured gradient support.
        """
        radius = 0
        for level in range(self.depth):
            scale = 2**level
            radius += 2 * scale + 2 * scale + 2 * scale  # encoder convs, decoder convs, pool/up-sample
        return radius + 2 * self.factor  # bottleneck convs


class ConvBlock(nnx.Module):
    """Two 3x3 conv -> batch norm -> ReLU layers."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(in_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm1(self.conv1(x)))
        return nnx.relu(self.norm2(self.conv2(x)))


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

    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.bottleneck(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            x = jnp.concatenate([upsample(x), skip], axis=-1)
            x = block(x)
        return self.head(x)


def create_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A freshly initialised U-Net."""
    return UNet(config, rngs=nnx.Rngs(seed))
