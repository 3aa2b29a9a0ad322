"""XLA flags tilepipe sets before JAX starts its backend; a user's own flags win.

Three defaults, each measured:

* **Convolutions by the library that is faster on this CPU.** XLA's CPU backend hands
  convolutions to YNNPACK by default. On the 2-core AVX2 development machine its Eigen
  convolutions measured faster for this U-Net (whole forward pass 1.2x, per layer up to
  1.6x), so there YNNPACK keeps the matrix multiplies and Eigen takes the convolutions. On a
  2-core AVX-512 machine (a Xeon with AMX) it was the other way round: YNNPACK's
  convolutions 1.03-1.08x faster over the whole pass (three pairs of model-only runs, two
  pairs of bench runs), so a CPU with AVX-512 keeps them (:func:`convolutions_flag`).
  (Convolutions 128 channels wide and wider are not XLA's at all where the predictor runs
  float32 on CPU: see :mod:`unet_flax.winograd`.)
* **One CPU device per usable core.** The predictor shards a batch across devices and each
  device runs its tiles one after another, so every core works on its own tile instead of
  all of them splitting every operation of one tile; model-only throughput measured 5-17%
  higher with two devices than with one on two cores (5 of 5 paired runs). A batch smaller
  than the device count uses only as many devices as it has tiles.
* **XLA's older loop emitters.** The forward pass with Winograd's blocks is about 440 fused
  operations, and compiling their loops is most of a cold compile: 3.9 s with XLA's newer
  (MLIR) fusion emitters, 2.6 s with the older ones, which ran the pass as fast (a batch of 8
  on the AVX-512 Xeon, six pairs of processes: best 0.82-0.89 s either way); tests that
  compile many small models took 17% less. Pinned JAX (< 0.11) still has them.

The first and third are flags of XLA's CPU backend as jaxlib 0.10 knows them
(:data:`MEASURED_JAXLIB`). XLA ends a process whose ``XLA_FLAGS`` names a flag it does not
know, whatever its device, and such flags come and go between releases (the older emitters are
being retired upstream), so under any other jaxlib (a GPU machine's image, say) only the device
count, a flag XLA has long had, is added.

Set a flag yourself to choose otherwise (for example
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``
for Eigen's convolutions, ``+`` for YNNPACK's,
``--xla_force_host_platform_device_count=1`` or ``JAX_NUM_CPU_DEVICES=1``,
``--xla_cpu_use_fusion_emitters=true``), or
``TILEPIPE_XLA_DEFAULTS=0`` to add nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_CONVOLUTIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
YNN_CONVOLUTIONS_ON = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
OLDER_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
MEASURED_JAXLIB = "0.10"
"""The jaxlib release (major.minor) whose XLA the CPU flags were measured on and are known to."""


def jaxlib_release() -> str | None:
    """This environment's jaxlib as major.minor (None where it has none): its version module
    alone, which starts no backend (2 ms, where ``importlib.metadata`` took 30)."""
    try:
        from jaxlib.version import __version__
    except ImportError:
        return None
    return ".".join(__version__.split(".")[:2])


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``avx2``, ``avx512f``...); none where
    there is no such file (macOS, Windows) or it names none (ARM lists ``Features``)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def convolutions_flag(features: frozenset[str] | None = None) -> str:
    """YNNPACK's convolutions on a CPU with AVX-512, Eigen's on any other (see the module doc)."""
    features = cpu_features() if features is None else features
    return YNN_CONVOLUTIONS_ON if "avx512f" in features else YNN_CONVOLUTIONS_OFF


def apply_default_xla_flags(environ: MutableMapping[str, str] = os.environ, cores: int | None = None,
                            features: frozenset[str] | None = None, jaxlib: str | None = None) -> bool:
    """Add tilepipe's XLA defaults to ``XLA_FLAGS``, each unless the user chose it already, the
    CPU backend's own only under :data:`MEASURED_JAXLIB` (``jaxlib``: major.minor; by default
    the installed one's).

    Must run before JAX creates its backend (it reads ``XLA_FLAGS`` once, then); the
    packages call it on import. Returns whether any flag was added.
    """
    if environ.get("TILEPIPE_XLA_DEFAULTS", "1") == "0":
        return False
    known = (jaxlib or jaxlib_release()) == MEASURED_JAXLIB
    flags = environ.get("XLA_FLAGS", "")
    added = []
    if known and "xla_cpu_experimental_ynn_fusion_type" not in flags:
        added.append(convolutions_flag(features))
    if DEVICE_COUNT_FLAG not in flags and "JAX_NUM_CPU_DEVICES" not in environ:
        added.append(f"{DEVICE_COUNT_FLAG}={cores or usable_cores()}")
    if known and "xla_cpu_use_fusion_emitters" not in flags:
        added.append(OLDER_EMITTERS)
    if added:
        environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return bool(added)


def ynn_convolutions(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether this process lets YNNPACK run convolutions (as read from ``XLA_FLAGS``)."""
    return YNN_CONVOLUTIONS_OFF not in environ.get("XLA_FLAGS", "").split()

