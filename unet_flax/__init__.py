"""A classic U-Net (Ronneberger et al., 2015) in Flax NNX, its training loop and checkpoints."""

from unet_flax.xla_flags import apply_default_xla_flags

apply_default_xla_flags()
