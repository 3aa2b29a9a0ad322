"""A classic U-Net (Ronneberger et al., 2015) in Flax NNX, its training loop and checkpoints."""
