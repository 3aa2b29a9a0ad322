"""The products of a whole run, written after its masks: quicklooks, VRT mosaics, STAC."""

from __future__ import annotations

from pathlib import Path

from pipeline.mosaic import write_mosaics
from pipeline.outputs import MaskFiles, write_quicklook
from pipeline.stac import write_stac
from unet_flax.card import ModelCard


def write_run_products(outdir: Path, masks: list[Path], card: ModelCard, run_id: str) -> list[Path]:
    """After a run: quicklooks that are missing, VRT mosaics, STAC Items and the Collection."""
    written = []
    for mask in masks:
        png = MaskFiles(Path(mask)).quicklook
        if not png.exists():
            written.append(write_quicklook(Path(mask), png))
    mosaics = write_mosaics(Path(outdir), masks, card, run_id)
    return written + mosaics + write_stac(Path(outdir), masks, card, run_id, mosaics)
