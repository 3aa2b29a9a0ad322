"""What describes a model besides its weights: its architecture and its card (bands, classes
with names and colours, normalisation). Plain dataclasses without JAX, so that processes
which only write outputs (:mod:`pipeline.sink`'s finishers) can read a card cheaply."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """One output class: the code written to masks, a name and a colour (#rrggbb)."""

    code: int
    name: str
    color: str

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 254:
            raise ValueError(f"class code {self.code} of {self.name!r} must be in 0..254 (255 is nodata)")
        if len(self.color) != 7 or not self.color.startswith("#"):
            raise ValueError(f"class colour {self.color!r} of {self.name!r} must look like #rrggbb")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything needed to use a checkpoint besides its weights.

    ``mean``/``std`` are per-band statistics of the training inputs, in the units the
    model was trained on; inference computes ``(raw * scale + offset - mean) / std``.
    """

    name: str
    unet: UNetConfig
    band_names: tuple[str, ...]
    classes: tuple[ClassInfo, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.unet.in_bands
        for field in ("band_names", "mean", "std"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"ModelCard.{field} has {len(getattr(self, field))} entries, the U-Net takes {n} bands")
        if len(self.classes) != self.unet.num_classes:
            raise ValueError(f"ModelCard.classes has {len(self.classes)} entries, the U-Net predicts {self.unet.num_classes}")
        if len({c.code for c in self.classes}) != len(self.classes):
            raise ValueError("ModelCard.classes has duplicate codes")
        if any(s <= 0 for s in self.std):
            raise ValueError("ModelCard.std must be positive")

    @property
    def codes(self) -> np.ndarray:
        """Class code of each model output index, as uint8."""
        return np.array([c.code for c in self.classes], dtype=np.uint8)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        data = dict(data)
        data["unet"] = UNetConfig(**data["unet"])
        data["classes"] = tuple(ClassInfo(**c) for c in data["classes"])
        for key in ("band_names", "mean", "std"):
            data[key] = tuple(data[key])
        return cls(**data)
