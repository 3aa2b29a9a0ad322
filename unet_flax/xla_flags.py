"""XLA flags tilepipe sets before JAX starts its backend; a user's own ``XLA_FLAGS`` win.

XLA's CPU backend hands convolutions to YNNPACK by default. Its Eigen convolutions measured
faster for this U-Net on the AVX2 development machine (whole forward pass 1.2x, per layer
up to 1.6x; ``tilepipe bench`` reports which is in use), so YNNPACK keeps the matrix
multiplies and Eigen takes the convolutions. Set the flag yourself (for example
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``)
to choose otherwise, or ``TILEPIPE_XLA_DEFAULTS=0`` to add nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_CONVOLUTIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def apply_default_xla_flags(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Add tilepipe's XLA defaults to ``XLA_FLAGS`` unless the user set the same flag.

    Must run before JAX creates its backend (it reads ``XLA_FLAGS`` once, then); the
    packages call it on import. Returns whether the flags were added.
    """
    flags = environ.get("XLA_FLAGS", "")
    if environ.get("TILEPIPE_XLA_DEFAULTS", "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_CONVOLUTIONS_OFF}".strip()
    return True


def ynn_convolutions() -> bool:
    """Whether this process lets YNNPACK run convolutions (as read from ``XLA_FLAGS``)."""
    return YNN_CONVOLUTIONS_OFF not in os.environ.get("XLA_FLAGS", "").split()
