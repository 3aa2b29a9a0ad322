"""XLA flags tilepipe sets before JAX starts its backend; a user's own flags win.

Two defaults, each measured on the 2-core AVX2 development machine (``tilepipe bench``):

* **Eigen convolutions.** XLA's CPU backend hands convolutions to YNNPACK by default. Its
  Eigen convolutions measured faster for this U-Net (whole forward pass 1.2x, per layer up
  to 1.6x), so YNNPACK keeps the matrix multiplies and Eigen takes the convolutions.
* **One CPU device per usable core.** The predictor shards a batch across devices and each
  device runs its tiles one after another, so every core works on its own tile instead of
  all of them splitting every operation of one tile; model-only throughput measured 5-17%
  higher with two devices than with one on two cores (5 of 5 paired runs). A batch smaller
  than the device count uses only as many devices as it has tiles.

Set a flag yourself to choose otherwise (for example
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``,
``--xla_force_host_platform_device_count=1`` or ``JAX_NUM_CPU_DEVICES=1``), or
``TILEPIPE_XLA_DEFAULTS=0`` to add nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_CONVOLUTIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def apply_default_xla_flags(environ: MutableMapping[str, str] = os.environ, cores: int | None = None) -> bool:
    """Add tilepipe's XLA defaults to ``XLA_FLAGS``, each unless the user chose it already.

    Must run before JAX creates its backend (it reads ``XLA_FLAGS`` once, then); the
    packages call it on import. Returns whether any flag was added.
    """
    if environ.get("TILEPIPE_XLA_DEFAULTS", "1") == "0":
        return False
    flags = environ.get("XLA_FLAGS", "")
    added = []
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        added.append(YNN_CONVOLUTIONS_OFF)
    if DEVICE_COUNT_FLAG not in flags and "JAX_NUM_CPU_DEVICES" not in environ:
        added.append(f"{DEVICE_COUNT_FLAG}={cores or usable_cores()}")
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return bool(added)


def ynn_convolutions() -> bool:
    """Whether this process lets YNNPACK run convolutions (as read from ``XLA_FLAGS``)."""
    return YNN_CONVOLUTIONS_OFF not in os.environ.get("XLA_FLAGS", "").split()
