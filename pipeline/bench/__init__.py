"""``tilepipe bench``: how fast the model runs here, and how close a whole run comes to it.

One run measures, on one model and one tile setting:

* **model only**: the jitted forward pass on batches already on the device, in megapixels
  of output (tile cores) per second at the best timed batch (and at the median one), and
  GFLOP/s against the faster of two float32 matrix multiplies timed in the same process,
  XLA's and NumPy's BLAS, before and after the model (the better sample counts; FLOPs
  counted analytically as the pass computes them, its decoder for the tiles' cores only,
  :func:`unet_flax.model.forward_flops`); on CPU also the batch
  taken at once instead of tile by tile, and which library XLA gave the convolutions;
* **end to end**: ``run_workflow`` over a generated GeoTIFF (uint16 bands, in blocks of 256,
  deflate: ``--block``, ``--compress`` store it as an archive's files are; ``--scenes N``: a
  folder of N copies) in a child process, so the peak resident memory of its whole process
  tree is measured alone; the ratio end-to-end / model-only; how many times each chunk of the
  scene was decoded (:func:`pipeline.reading.chunks_decoded`); and the host's
  ceiling, the same run with the compiled forward pass swapped for one that thresholds band 1
  (every batch still goes to the device and back; reading, stitching and writing are all that
  is left), with the CPU it cost per megapixel written in the run's process, its readers and
  its finishers, and the rate at which all the host's cores could do that work;
* **memory scaling**: peak RSS of the same run on a small and a 4x-wider scene;
* **compilation**: a cold compile in a fresh process with an empty persistent cache, then a
  second process with the cache the first one filled, in three rounds (the median counts);
* **precision**: bfloat16 against float32 class agreement (and bfloat16 speed);
* **halo overhead**: pixels read per pixel written, and FLOPs computed per FLOP of the cores alone;
* **PyTorch** (``--torch``, when installed): the same U-Net, eager, channels-last,
  inference mode, timed in the same process on the same batch, both as one batch and tile
  by tile; the faster of the two is what Flax is compared with, once as each one's best
  time, and once paired: rounds in which the two take turns (:func:`~pipeline.bench.timing.paired_times`), so that
  a shared machine's changing load does not decide the ratio.

Its modules: :mod:`~pipeline.bench.options` (what a run measures), :mod:`~pipeline.bench.scene`
(the model and scenes it runs on), :mod:`~pipeline.bench.timing` and :mod:`~pipeline.bench.rss`
(time and memory), :mod:`~pipeline.bench.runs` (the measurements in child processes),
:mod:`~pipeline.bench.measure` (:func:`run_bench`, :func:`run_host_only`),
:mod:`~pipeline.bench.report` (the table and the targets) and :mod:`~pipeline.bench.cli`.
"""

from pipeline.bench.cli import (
    add_parser,
    batch_size,
    block_side,
    count_or_auto,
    main,
    main_bench,
    options_from_args,
    positive,
)
from pipeline.bench.measure import run_bench, run_host_only
from pipeline.bench.options import SCHEMA_KEYS, BenchOptions, quick_options
from pipeline.bench.report import format_host_table, format_table, targets
from pipeline.bench.rss import RssSampler, own_peak_rss
from pipeline.bench.runs import bench_workflow
from pipeline.bench.scene import SCENE_COMPRESSIONS, SCENE_DTYPE, make_checkpoint, write_scene
from pipeline.bench.timing import best_sample, matmul_rates, median_round, paired_times, square

__all__ = [
    "SCENE_COMPRESSIONS", "SCENE_DTYPE", "SCHEMA_KEYS", "BenchOptions", "RssSampler", "add_parser", "batch_size",
    "bench_workflow", "best_sample", "block_side", "count_or_auto", "format_host_table", "format_table", "main",
    "main_bench", "make_checkpoint", "matmul_rates", "median_round", "options_from_args", "own_peak_rss",
    "paired_times", "positive", "quick_options", "run_bench", "run_host_only", "square", "targets", "write_scene",
]
