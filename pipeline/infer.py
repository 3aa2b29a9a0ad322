"""Fixed-shape batches to the compiled U-Net and back.

One :class:`Predictor` per process and checkpoint: parameters are put on the device once,
the forward pass is compiled once for ``(batch, S, S, bands)``, and a short batch is padded
to that shape rather than compiled again. The output is only the core of each tile, as
uint8 class codes and confidences, so little crosses back from the device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.windows import TileSpec
from unet_flax.checkpoint import Checkpoint, load_checkpoint

_configured: set[str] = set()
_lock = threading.Lock()


def configure_jax(cache_dir: str | None) -> None:
    """Turn on the persistent compilation cache (once per process)."""
    with _lock:
        if cache_dir is None or cache_dir in _configured:
            return
        path = Path(cache_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        _configured.add(cache_dir)


def device_description() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()} ({len(devices)} x {', '.join(kinds)})"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Class codes and confidence (0-100) of the core of each tile in a batch."""

    classes: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray | None = None


class Predictor:
    """The compiled forward pass of one checkpoint at one batch shape."""

    def __init__(self, checkpoint: Checkpoint, spec: TileSpec, batch: int, probabilities: bool = False):
        self.card = checkpoint.card
        self.spec = spec
        self.batch = batch
        self.input_shape = (batch, spec.read_size, spec.read_size, checkpoint.card.unet.in_bands)
        graphdef, state = nnx.split(checkpoint.model)
        self._state = jax.device_put(state)
        codes = jnp.asarray(checkpoint.card.codes)
        lo, hi = spec.halo, spec.halo + spec.tile

        @jax.jit
        def forward(state: nnx.State, x: jax.Array) -> tuple[jax.Array, ...]:
            model = nnx.merge(graphdef, state)
            logits = model(x)[:, lo:hi, lo:hi, :]
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            confidence = jnp.round(100 * jnp.max(probs, axis=-1)).astype(jnp.uint8)
            outputs = (codes[jnp.argmax(logits, axis=-1)], confidence)
            return outputs + ((jnp.round(100 * probs).astype(jnp.uint8),) if probabilities else ())

        self._forward = forward

    def __call__(self, x: np.ndarray) -> Prediction:
        """Predict ``n <= batch`` tiles of shape (n, S, S, bands); the batch is padded."""
        n = x.shape[0]
        if n > self.batch or x.shape[1:] != self.input_shape[1:]:
            raise ValueError(f"expected at most {self.input_shape} tiles, got {x.shape}")
        if n < self.batch:
            x = np.concatenate([x, np.zeros((self.batch - n, *x.shape[1:]), x.dtype)])
        outputs = [np.asarray(out)[:n] for out in self._forward(self._state, x)]
        return Prediction(*outputs)

    def compiled_count(self) -> int:
        """How many shapes the forward pass has been compiled for (1 after any use)."""
        return self._forward._cache_size()


@functools.lru_cache(maxsize=4)
def _cached_predictor(path: str, sha256: str, spec: TileSpec, batch: int, probabilities: bool) -> Predictor:
    checkpoint = load_checkpoint(path)
    if checkpoint.sha256 != sha256:
        raise ValueError(f"{Path(path).name}: checkpoint changed during the run (hash {checkpoint.sha256[:12]})")
    return Predictor(checkpoint, spec, batch, probabilities)


def get_predictor(path: str | os.PathLike[str], sha256: str, spec: TileSpec, batch: int,
                  probabilities: bool = False) -> Predictor:
    """This process's predictor for a checkpoint, loaded and compiled on first use only.

    Keyed by the checkpoint's hash, so Dask workers load weights once per process, not
    once per task, and tasks carry only the path.
    """
    with _lock:
        return _cached_predictor(str(path), sha256, spec, batch, probabilities)
