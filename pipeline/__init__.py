"""tilepipe: windowed, batched U-Net inference over directories of GeoTIFFs."""

__version__ = "0.1.0"
