"""``tilepipe bench --quick``: every field of the report, with sane values (no timings asserted)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio

from pipeline import bench
from pipeline.chunks import ChunkGrid
from pipeline.cli import main as cli_main
from pipeline.windows import source_window, tile_batches, tile_spec
from unet_flax.winograd import WIDTH as WINOGRAD_WIDTH
from unet_flax.xla_flags import YNN_CONVOLUTIONS_ON, convolutions_flag


def test_quick_bench_reports_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--quick", "--scenes", "2", "--threads", "2", "--readers", "2", "--finishers", "1", "--block", "128",
            "--json", str(out),
            "--output-compression", "zstd", "--workdir", str(tmp_path / "work")]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    for key in bench.SCHEMA_KEYS:
        assert key in report, key
    table = capsys.readouterr().out
    assert "model only" in table and "end to end" in table and "compile" in table

    model, e2e, mem, comp = report["model_only"], report["end_to_end"], report["memory"], report["compile"]
    assert model["mpx_per_s"] > 0 and model["gflops"] > 0 and report["matmul"]["gflops"] > 0
    assert 0 < model["fraction_of_matmul"] < 10
    assert model["computed_mpx_per_s"] > model["mpx_per_s"]  # the halo is computed, not written
    mm = report["matmul"]
    assert mm["dtype"] == report["model"]["precision"] == "float32" and mm["n"] == 2048  # auto is float32 on CPU
    assert mm["xla_gflops"] > 0 and mm["numpy_gflops"] > 0 and mm["gflops"] == max(mm["xla_gflops"], mm["numpy_gflops"])
    assert len(mm["samples_gflops"]) == 2 and mm["gflops"] == max(mm["samples_gflops"])  # before and after the model
    assert model["tile_by_tile"] is True and model["batched_mpx_per_s"] > 0  # on CPU
    assert model["batched_class_agreement"] >= 0.999
    chosen = convolutions_flag(frozenset(report["cpu_features"]))  # by the features the bench names
    assert report["model"]["cpu_convolutions"] == ("ynnpack" if chosen == YNN_CONVOLUTIONS_ON else "eigen")
    assert report["model"]["winograd_width"] == WINOGRAD_WIDTH  # float32 on CPU
    assert e2e["scenes"] == 2 and e2e["pixels"] == 2 * 512**2  # two copies of the scene, both written
    assert e2e["readers"] == 2  # read in reader processes, as on an accelerator
    assert e2e["dask_threads"] == 2 and set(e2e["threads"]) >= {"ms_per_mpx", "busiest"}  # the setting, and the CPU
    assert "peak RSS" in table and ", 2 Dask threads, 2 reader processes" in table
    assert e2e["size"] == 512 and e2e["bands"] == 4 and e2e["mpx_per_s"] > 0 and e2e["ratio_to_model_only"] > 0
    assert e2e["peak_rss_mb"] > 50 and 0 < e2e["peak_pss_mb"] <= e2e["peak_rss_mb"] * 1.05
    assert model["timed_batches"] >= 3 and 0 < model["median_mpx_per_s"] <= model["mpx_per_s"]
    assert e2e["ratio_to_median_model_only"] >= e2e["ratio_to_model_only"]
    paired = e2e["paired"]  # model-only batches timed in the run's own process, before and after it
    assert len(paired["before_s"]) == len(paired["after_s"]) == 3 and min(paired["before_s"] + paired["after_s"]) > 0
    assert paired["ratio"] == pytest.approx(e2e["mpx_per_s"] / paired["model_only_mpx_per_s"])
    assert 0 < paired["model_only_mean_mpx_per_s"] <= paired["model_only_mpx_per_s"]
    assert paired["ratio_to_mean"] >= paired["ratio"] > 0
    assert paired["run_batch_median_s"] > 0  # the run's own batches, against those timed beside it
    assert 0 < e2e["model_busy_share"] <= 1
    assert e2e["host_mpx_per_s"] > 0 and e2e["host_over_model_only"] == e2e["host_mpx_per_s"] / model["mpx_per_s"]
    assert e2e["finishers"] == 1  # as asked: on CPU, auto would be none
    for wait, tail in ((e2e["publish_wait_s"], e2e["publish_tail_s"]),
                       (e2e["host_publish_wait_s"], e2e["host_publish_tail_s"])):
        assert wait >= 0 and tail > 0  # the last file is published after the last batch
    assert e2e["compression"] == {"codec": "zstd", "level": 9}  # as asked, at level auto: GDAL's own on CPU
    assert "batches held back for it" in table and "s (1 finisher, zstd 9)" in table
    published = sorted((tmp_path / "work" / "out-e2e").glob("*.tif"))
    assert len(published) == 2
    for mask in published:
        with rasterio.open(mask) as src:
            assert src.compression.name == "zstd"
    assert e2e["checksum_wait_s"] >= 0 and e2e["host_checksum_wait_s"] >= 0
    assert "finished files waited for their checksums" in table
    for cpu in (e2e["cpu_ms_per_mpx"], e2e["host_cpu_ms_per_mpx"]):  # the run's process, its readers and finishers
        assert cpu["process"] > 0 and cpu["readers"] > 0 and cpu["finishers"] > 0
    cores = len(os.sched_getaffinity(0))
    assert e2e["cores"] == cores
    assert e2e["host_cpu_bound_mpx_per_s"] == pytest.approx(1000 * cores / sum(e2e["host_cpu_ms_per_mpx"].values()))
    assert "CPU per Mpx written" in table and "ms in 2 readers" in table and "ms in 1 finisher;" in table
    for threads, run in ((e2e["threads"], e2e["cpu_ms_per_mpx"]), (e2e["host_threads"], e2e["host_cpu_ms_per_mpx"])):
        ms = threads["ms_per_mpx"]  # the run's process by thread role, no more than the process
        assert ms["driver"] > 0 and ms["tasks"] > 0 and threads["threads"]["driver"] == 1
        assert sum(ms.values()) <= run["process"] * 1.05 and list(ms.values()) == sorted(ms.values(), reverse=True)
        assert 0 < threads["busiest_share"] <= 1.05 and threads["busiest"].endswith(")")
    for shares in (e2e["busy_share"], e2e["host_busy_share"]):  # each reader's and finisher's share of the run
        assert set(shares) == {"readers", "finishers"} and all(0 < v <= 1.05 for v in shares.values())
    assert "the run's process by thread" in table and f"busiest {e2e['threads']['busiest']}" in table
    assert mem["small"]["size"] < mem["large"]["size"] and mem["large_over_small"] > 0
    assert mem["large_over_small_pss"] > 0 and "counted once (PSS)" in table
    assert comp["cold_s"] > 0 and comp["warm_s"] > 0 and comp["cache_files"] > 0
    assert comp["cold_lower_s"] > 0 and comp["warm_xla_s"] > 0
    assert comp["cold_lower_s"] + comp["cold_xla_s"] == pytest.approx(comp["cold_s"])
    ratios = [r["warm_s"] / r["cold_s"] for r in comp["rounds"]]  # two rounds: the higher ratio counts
    assert len(ratios) == 2 and comp["warm_over_cold"] == max(ratios)
    assert f"the median of 2 rounds: x{ratios[0]:.2f}, x{ratios[1]:.2f}" in table
    assert report["halo"]["nominal"] == (64 + 2 * 16) ** 2 / 64**2
    assert report["halo"]["measured"] >= report["halo"]["nominal"]
    assert 1 < report["halo"]["flops"] < report["halo"]["nominal"]  # the decoder skips most of the halo
    assert 0.9 <= report["precision"]["class_agreement"] <= 1.0
    assert report["model"]["flops_per_pixel"] > 0
    assert report["batch"] == {"value": 4, "auto": False}
    assert set(report["targets"]) >= {"e2e_ratio_ge_0.9", "e2e_ratio_ge_0.9_paired", "rss_large_over_small_le_1.25", "model_ge_0.7_matmul",
                                      "warm_compile_le_0.2_cold"}
    assert not list((tmp_path / "work").glob("memory-*/*.tif"))  # large scenes are removed after use
    sc = report["scene"]  # as asked for, decoded in chunks of 256 (two blocks a side)
    assert (sc["size"], sc["block"], sc["compress"], sc["chunk"], sc["chunks"]) == (512, 128, "deflate", [256, 256], 4)
    with rasterio.open(tmp_path / "work" / "scene" / "scene.tif") as src:
        assert src.block_shapes == [(128, 128)] * 4
    grid = ChunkGrid.of(512, 512, 128, 128)  # each batch read alone would decode every chunk it touches;
    touched = sum(len({c for t in tiles for c in grid.covering(source_window(t.read, 512, 512))})
                  for tiles in tile_batches(512, 512, tile_spec(64, 16, 4), 4))
    assert e2e["decodes_per_chunk"] == e2e["host_decodes_per_chunk"] == 1 < touched / 4  # the readers share them
    assert "blocks 128^2, deflate" in table
    scene_bytes = (tmp_path / "work" / "scene" / "scene.tif").stat().st_size  # one timing, in bytes and pixels
    assert sc["checksum"] == "blake3" and sc["checksum_mpx_per_s"] > 0
    assert sc["checksum_gb_per_s"] * 1e9 / scene_bytes == pytest.approx(sc["checksum_mpx_per_s"] * 1e6 / 512**2)
    assert f"checksummed (blake3) at {sc['checksum_gb_per_s']:.2f} GB/s" in table


def test_host_only_runs_the_host_ceiling_alone_as_often_as_asked(tmp_path, capsys):
    """``--host-only``: the end-to-end run without the model, at an accelerator host's settings
    (readers, finishers, the publishing level), on this machine's cores; nothing else."""
    out = tmp_path / "host.json"
    args = ["--quick", "--host-only", "--runs", "2", "--scenes", "2", "--readers", "2", "--finishers", "1",
            "--output-compression", "zstd", "--output-level", "1", "--json", str(out), "--workdir", str(tmp_path / "w")]
    assert bench.main(args) == 0
    report, table = json.loads(out.read_text()), capsys.readouterr().out
    assert report["host_only"] and not set(report) & {"model_only", "compile", "memory", "end_to_end"}
    assert (report["readers"], report["finishers"]) == (2, 1) and report["compression"] == {"codec": "zstd", "level": 1}
    assert report["threads"] == 2 and "2 Dask threads, 2 readers" in table  # the workflow's default, as run
    assert len(report["runs"]) == 2 and report["scene"]["size"] == 512
    for run in report["runs"]:
        cpu = run["cpu_ms_per_mpx"]
        assert run["mpx_per_s"] > 0 and cpu["process"] > 0 and cpu["readers"] > 0 and cpu["finishers"] > 0
        assert run["cpu_bound_mpx_per_s"] == pytest.approx(1000 * run["cores"] / sum(cpu.values()))
        assert run["decodes_per_chunk"] == 1 and run["threads"]["ms_per_mpx"]["driver"] > 0
    for i in (1, 2):  # each run published the scenes afresh, as asked
        masks = sorted((tmp_path / "w" / f"out-host-{i - 1}").glob("*.tif"))
        assert len(masks) == 2
        with rasterio.open(masks[0]) as src:
            assert src.compression.name == "zstd"
        assert f"run {i} " in table
    rates = [run["mpx_per_s"] for run in report["runs"]]
    assert f"{min(rates):.1f}-{max(rates):.1f} Mpx/s" in table and "publishing: 1 finisher, zstd 1" in table
    assert bench.main(args[:2] + ["--runs", "1"] + args[4:]) == 0  # the same workdir: its outputs are made again
    assert len(json.loads(out.read_text())["runs"]) == 1


def test_host_only_with_memory_compares_two_sizes_at_the_same_settings(tmp_path, capsys):
    out = tmp_path / "host.json"
    args = ["--quick", "--host-only", "--memory", "--runs", "1", "--readers", "2", "--threads", "1",
            "--json", str(out)]
    assert bench.main(args) == 0
    report, table = json.loads(out.read_text()), capsys.readouterr().out
    memory = report["memory"]
    assert (memory["small"]["size"], memory["large"]["size"]) == (256, 512)
    assert memory["small"]["peak_rss_mb"] > 0 and memory["large"]["peak_rss_mb"] > 0
    assert memory["large_over_small"] == pytest.approx(memory["large"]["peak_rss_mb"] / memory["small"]["peak_rss_mb"])
    assert f"x{memory['large_over_small']:.2f}, the model's cost taken out" in table
    assert report["read_parts"] == 1 and "(each batch in" not in table  # --quick's batches of 4 are one part each
    assert report["threads"] == 1 and "1 Dask thread, 2 readers" in table


@pytest.mark.parametrize("args, message", [
    (["--host-only", "--batch", "auto"], "--host-only needs a fixed --batch"),
    (["--memory"], "--memory goes with --host-only"),
    (["--output-compression", "zstd", "--output-level", "23"], "--output-level: zstd levels are 1-22"),
    (["--output-compression", "lzw", "--output-level", "1"], "--output-level: lzw has no levels"),
])
def test_bench_options_that_cannot_run_are_usage_errors(args, message, capsys):
    assert cli_main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("ratios", "chosen"), [([0.3], 0.3), ([0.3, 0.1, 0.2], 0.2), ([0.4, 0.1, 0.3, 0.2], 0.3)])
def test_the_median_round_counts(ratios, chosen):
    rounds = [{"ratio": r, "index": i} for i, r in enumerate(ratios)]
    assert bench.median_round(rounds, lambda r: r["ratio"])["ratio"] == chosen


@pytest.mark.parametrize("rounds", [1, 4, 5])
def test_paired_times_take_turns_at_going_first(rounds):
    calls = []
    first, second = (lambda: calls.append("a")), (lambda: calls.append("b"))
    a, b = bench.paired_times(first, second, rounds=rounds, runs=2)
    assert len(a) == len(b) == rounds and min(a + b) >= 0
    expected = "".join("aabb" if r % 2 == 0 else "bbaa" for r in range(rounds))  # best of 2, in turns
    assert "".join(calls) == expected


@pytest.mark.parametrize("precision,verdict", [
    ("float32", True),
    ("bfloat16", "a float32 goal; this run is bfloat16 (80% of its matmul)"),
])
def test_the_matmul_goal_is_judged_in_float32_only(precision, verdict):
    report = {"end_to_end": {"ratio_to_model_only": 1.0, "paired": {"ratio": 1.0}}, "memory": {"large_over_small": 1.0},
              "model_only": {"fraction_of_matmul": 0.8}, "compile": {"warm_over_cold": 0.1}, "torch": {},
              "backend": "cpu", "model": {"precision": precision}}
    assert bench.targets(report)["model_ge_0.7_matmul"] == verdict


def test_a_bfloat16_matmul_reference_sums_in_float32():
    """As the model's bfloat16 products do, and as a CPU's AMX takes them (a bfloat16 sum it does not)."""
    a = np.full((256, 256), 1 + 2**-7, np.float32)  # a bfloat16 number; its products' sum is not one
    square = np.asarray(bench.square()(jnp.asarray(a, jnp.bfloat16)))
    assert square.dtype == np.float32 and square[0, 0] == pytest.approx(256 * (1 + 2**-7) ** 2, rel=1e-6)
    rates = bench.matmul_rates(256, 0.05, "bfloat16")
    assert rates["dtype"] == "bfloat16" and rates["gflops"] == rates["xla_gflops"] > 0 and rates["numpy_gflops"] is None


def test_bench_parser_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench"])
    opts = bench.options_from_args(ns)
    assert (opts.size, opts.tile, opts.halo, opts.batch, opts.arch) == (4096, 256, 64, 8, (4, 32, 4, 8))
    assert opts.memory_sizes == (2048, 8192)
    assert opts.precision == "auto" and opts.threads is None and opts.scenes == 1 and opts.readers == "auto"
    assert bench.options_from_args(parser.parse_args(["bench", "--readers", "0"])).readers == 0
    assert (opts.output_compression, opts.output_level, opts.host_only, opts.host_runs) == ("deflate", "auto", False, 3)
    assert opts.finishers == "auto" and bench.options_from_args(parser.parse_args(["bench", "--finishers", "3"])).finishers == 3
    assert bench.options_from_args(parser.parse_args(["bench", "--threads", "16"])).threads == 16
    assert bench.options_from_args(parser.parse_args(["bench", "--batch", "auto"])).batch == "auto"
    assert bench.options_from_args(parser.parse_args(["bench", "--quick"])).quick
    assert (opts.block, opts.compress) == (256, "deflate")
    layout = bench.options_from_args(parser.parse_args(["bench", "--block", "512", "--compress", "zstd"]))
    assert (layout.block, layout.compress) == (512, "zstd")
    for bad in ("500", "0", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--block", bad])
    assert opts.compile_rounds == 3 and bench.options_from_args(parser.parse_args(["bench", "--quick"])).compile_rounds == 2
    for args in (["--compile-rounds", "1"], ["--quick", "--compile-rounds", "1"]):
        assert bench.options_from_args(parser.parse_args(["bench", *args])).compile_rounds == 1
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "--compile-rounds", bad])
    quick = bench.options_from_args(parser.parse_args(["bench", "--quick"]))
    assert (quick.size, quick.tile, quick.halo, quick.batch, quick.arch) == (512, 64, 16, 4, (2, 8, 4, 3))
    sized = bench.options_from_args(parser.parse_args(
        ["bench", "--quick", "--batch", "2", "--size", "256", "--tile", "32", "--halo", "8", "--arch", "2,4,3,2",
         "--memory-sizes", "128,256"]))  # what is given wins over --quick's sizes too
    assert (sized.quick, sized.size, sized.tile, sized.halo, sized.batch, sized.arch, sized.memory_sizes) == (
        True, 256, 32, 8, 2, (2, 4, 3, 2), (128, 256))


@pytest.mark.parametrize("block, compress", [(256, "deflate"), (512, "zstd"), (1024, "lzw"), (512, "none")])
def test_the_generated_scene_is_stored_as_asked(tmp_path, block, compress):
    path = bench.write_scene(tmp_path / "s.tif", 1100, 2, block=block, compress=compress)
    with rasterio.open(path) as src:
        assert src.block_shapes == [(block, block)] * 2 and (src.width, src.height) == (1100, 1100)
        assert (src.compression.value.lower() if src.compression else "none") == compress
        data = src.read()
    assert data.dtype == np.uint16 and data.min() < data.max() and data[:, -1].any()  # written to the last row


def test_the_generated_scene_needs_a_tile_side_and_a_known_compression(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        bench.write_scene(tmp_path / "s.tif", 64, 1, block=100)
    with pytest.raises(ValueError, match="compress must be one of"):
        bench.write_scene(tmp_path / "s.tif", 64, 1, compress="jpeg")


@pytest.mark.parametrize("threads", [None, 6])
def test_bench_workflow_sets_the_dask_threads(tmp_path, threads):
    from pipeline.config import Workflow

    checkpoint = bench.make_checkpoint(tmp_path / "m.safetensors", (1, 4, 3, 2))
    (tmp_path / "in").mkdir()
    wf = Workflow.model_validate(bench.bench_workflow(tmp_path / "in", tmp_path / "out", checkpoint, 32, 8, 4,
                                                      tmp_path / "cache", "float32", threads))
    default = Workflow.model_validate({**wf.model_dump(mode="json"), "dask": {}}).dask
    assert wf.dask.threads == (threads or default.threads)
    assert wf.bands == [1, 2, 3] and wf.tiling.batch == 4


def peaks_of(tmp_path, code, **sampling):
    """The sampled peak RSS and PSS of a process running ``code``, and of its children."""
    script = tmp_path / "tree.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)])
    with bench.RssSampler(proc.pid, **sampling) as sampler:
        proc.wait()
    return sampler.peak, sampler.peak_pss


def test_peak_memory_counts_a_grandchild_started_after_the_first_look(tmp_path):
    """The sampler lists the tree again as it grows: a grandchild's memory counts."""
    peak, pss = peaks_of(tmp_path, (
        "import subprocess, sys, time\n"
        "time.sleep(0.5)\n"  # the sampler has listed the tree before the grandchild exists
        "subprocess.run([sys.executable, '-c', 'import time; b = bytearray(300 * 2**20); time.sleep(2.5)'])\n"))
    assert peak > 300 * 2**20 and pss > 300 * 2**20


def test_peak_memory_counts_pages_a_parent_and_its_child_share_once_in_pss(tmp_path):
    """As a worker and its reader map the same batch: RSS counts it twice, PSS once."""
    peak, pss = peaks_of(tmp_path, (
        "import mmap, os, time\n"
        "memory = mmap.mmap(-1, 300 * 2**20)\n"  # shared, anonymous
        "def fill(byte):\n"
        "    for start in range(0, len(memory), 2**20):\n"
        "        memory[start : start + 2**20] = byte * 2**20\n"
        "fill(b'x')\n"
        "if os.fork() == 0:\n"
        "    fill(b'y'); time.sleep(2.5); os._exit(0)\n"
        "time.sleep(2.5); os.wait()\n"), interval=0.1, relist=0.2)
    assert peak > 580 * 2**20
    assert 290 * 2**20 < pss < 400 * 2**20


def test_peak_memory_counts_a_store_of_shared_chunks_that_no_process_maps_once(tmp_path):
    """As a worker and a reader both hold a store (:mod:`pipeline.halos`): in no RSS, counted once."""
    peak, pss = peaks_of(tmp_path, (
        "import os, time\n"
        "fd = os.memfd_create('tilepipe-chunks')\n"
        "for start in range(0, 200 * 2**20, 2**20):\n"
        "    os.pwrite(fd, b'x' * 2**20, start)\n"
        "if os.fork() == 0:\n"
        "    time.sleep(2.5); os._exit(0)\n"
        "time.sleep(2.5); os.wait()\n"), interval=0.1, relist=0.2)
    assert 200 * 2**20 < peak < 300 * 2**20 and 200 * 2**20 < pss < 300 * 2**20


def test_a_childs_own_peak_is_its_own_not_its_parents():
    ballast = bytearray(400 * 2**20)  # a child of a large process must not report this
    code = "from pipeline.bench import own_peak_rss; b = bytearray(100 * 2**20); print(own_peak_rss())"
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 100 * 2**20 < peak < 400 * 2**20 <= len(ballast)


@pytest.mark.parametrize("core", [((16, 48), (16, 48)), ((0, 32), (8, 64)), None])
def test_the_pytorch_twin_computes_the_flax_logits_on_a_core(core):
    """Where torch is installed (the bench extra): the comparison's two networks do the same work."""
    torch = pytest.importorskip("torch")
    from pipeline.torch_unet import torch_input, torch_unet_from_flax
    from unet_flax.model import UNetConfig, create_unet

    model = create_unet(UNetConfig(in_bands=3, num_classes=4, depth=2, base_width=8), seed=3)
    model.eval()
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 64, 64, 3)))
    flax = np.asarray(model(x, core=core))
    net = torch_unet_from_flax(model)
    with torch.inference_mode():
        logits = net(torch_input(net, np.ascontiguousarray(x.transpose(0, 3, 1, 2))), core).numpy()
    np.testing.assert_allclose(logits.transpose(0, 2, 3, 1), flax, rtol=1e-4, atol=1e-4)
