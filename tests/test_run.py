"""`tilepipe run` end to end on directories of real small GeoTIFFs."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import TINY, scene, write_raster

from pipeline import reading
from pipeline.chunks import ChunkCache
from pipeline.cli import main
from pipeline.outputs import stored_pixels
from pipeline.windows import seamless_halo


def run(workflow, *extra):
    return main(["run", str(workflow), "--no-progress", *extra])


def assert_same_grid(src_path, out_path):
    with rasterio.open(src_path) as src, rasterio.open(out_path) as out:
        assert (out.width, out.height) == (src.width, src.height)
        assert out.crs == src.crs
        assert out.transform == src.transform
        assert out.count == 1 and out.dtypes[0] == "uint8" and out.nodata == 255


def input_validity(path):
    with rasterio.open(path) as src:
        valid = np.all(src.read_masks() > 0, axis=0)
        data = src.read()
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.all(np.isfinite(data), axis=0)
    return valid


@pytest.mark.parametrize("crs", ["utm", "geographic", "webmercator"])
@pytest.mark.parametrize("dtype, scale", [("uint8", 1 / 255), ("int16", 1 / 20000), ("uint16", 1 / 10000), ("float32", 1.0)])
def test_every_input_gets_a_mask_on_its_own_grid(tmp_path, make_workflow, crs, dtype, scale):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shapes = {"tiny": (5, 7), "odd": (45, 71)}
    for i, (name, shape) in enumerate(shapes.items()):
        write_raster(inputs / f"{name}.tif", scene(*shape, dtype=dtype, seed=i), crs=crs, tiled=(i % 2 == 0))
    wf = make_workflow(inputs, normalise={"scale": scale})
    assert run(wf) == 0
    for name in shapes:
        assert_same_grid(inputs / f"{name}.tif", tmp_path / "out" / f"{name}.tif")
        with rasterio.open(tmp_path / "out" / f"{name}.tif") as out:
            assert set(np.unique(out.read(1))) <= {0, 1, 2}


@pytest.mark.parametrize("precision,used", [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_outputs_say_on_what_and_in_what_precision_the_model_ran(tmp_path, make_workflow, precision, used):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "a.tif", scene(40, 40))
    assert run(make_workflow(inputs, runtime={"precision": precision})) == 0
    with rasterio.open(tmp_path / "out" / "a.tif") as out:
        tags = out.tags()
    assert tags["TILEPIPE_PRECISION"] == used and tags["TILEPIPE_DEVICE"].startswith("cpu (")
    item = json.loads((tmp_path / "out" / "a.item.json").read_text())  # and so does its STAC item
    assert item["properties"]["tilepipe:precision"] == used


def test_nodata_is_exactly_where_the_input_has_none(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = scene(60, 50, dtype="float32")
    data[:, :10, :7] = -9999.0
    data[2, 30, 30] = np.nan
    write_raster(inputs / "nodata.tif", data, nodata=-9999.0)
    mask = np.ones((40, 40), bool)
    mask[5:15, 20:] = False
    write_raster(inputs / "masked.tif", scene(40, 40), mask=mask)
    assert run(make_workflow(inputs, normalise={"scale": 1.0})) == 0
    for name in ("nodata", "masked"):
        with rasterio.open(tmp_path / "out" / f"{name}.tif") as out:
            written = out.read(1)
        np.testing.assert_array_equal(written == 255, ~input_validity(inputs / f"{name}.tif"))


def test_a_mask_keeps_the_class_counts_its_tiles_were_written_with(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = scene(150, 170, seed=3)
    east = np.broadcast_to(np.arange(170) >= 120, (150, 170))
    write_raster(inputs / "counted.tif", data, mask=~east)  # no data in the 50 columns to the east
    assert run(make_workflow(inputs)) == 0
    with rasterio.open(tmp_path / "out" / "counted.tif") as out:
        np.testing.assert_array_equal(stored_pixels(out), np.bincount(out.read(1).ravel(), minlength=256))
        assert int(out.tags(1)["NODATA_PIXELS"]) == 150 * 50


def test_the_workers_free_an_inputs_decoded_chunks_once_its_tiles_are_read(tmp_path, make_workflow, monkeypatch):
    chunks = ChunkCache()
    monkeypatch.setattr(reading, "CHUNKS", chunks)  # the in-process workers' cache
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        write_raster(inputs / f"s{i}.tif", scene(300, 340, seed=i))
    assert run(make_workflow(inputs)) == 0
    assert chunks.misses > 0 and chunks.hits > 0
    assert chunks.bytes == 0


def test_a_bad_file_fails_alone_and_leaves_nothing(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "good.tif", scene(40, 40))
    (inputs / "corrupt.tif").write_bytes(b"II*\x00" + b"\x13" * 300)
    (inputs / "empty.tif").write_bytes(b"")
    write_raster(inputs / "short.tif", scene(20, 20, bands=2))
    report_path = tmp_path / "report.json"
    assert run(make_workflow(inputs), "--report", str(report_path)) == 1
    report = json.loads(report_path.read_text())
    status = {entry["input"].rsplit("/", 1)[-1]: entry for entry in report["files"]}
    assert status["good.tif"]["status"] == "ok"
    for bad in ("corrupt.tif", "empty.tif", "short.tif"):
        assert status[bad]["status"] == "failed"
        assert status[bad]["error"].startswith(f"{bad}: ") and "\n" not in status[bad]["error"]
        assert not (tmp_path / "out" / bad).exists()
    assert report["summary"] == {"ok": 1, "skipped": 0, "failed": 3}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.name != ".tilepipe"]
    err = capsys.readouterr().err
    assert "FAILED corrupt.tif" in err and "FAILED empty.tif" in err


@pytest.mark.parametrize("readers", [0, 2])
def test_a_file_whose_blocks_cannot_be_decoded_fails_in_a_line_that_says_where(tmp_path, make_workflow, readers):
    """Its header reads, so it is planned; a block of it does not decode: read in the worker's
    threads or in a reader process, the reason comes back whole, GDAL's words in it."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "good.tif", scene(40, 40))
    damaged = inputs / "damaged.tif"
    profile = dict(driver="GTiff", width=128, height=128, count=4, dtype="uint16", compress="deflate", tiled=True,
                   blockxsize=16, blockysize=16)
    with rasterio.open(damaged, "w", **profile) as dst:
        dst.write(scene(128, 128, seed=3))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + len(data) // 10] = b"\x55" * (len(data) // 10)  # blocks' bytes, not the header
    damaged.write_bytes(bytes(data))
    report_path = tmp_path / "report.json"
    wf = make_workflow(inputs, runtime={"readers": readers}, dask={"threads": 1, "retries": 0})
    assert run(wf, "--report", str(report_path)) == 1
    status = {e["input"].rsplit("/", 1)[-1]: e for e in json.loads(report_path.read_text())["files"]}
    assert status["good.tif"]["status"] == "ok" and status["damaged.tif"]["status"] == "failed"
    assert re.fullmatch(r"damaged\.tif: its blocks at rows \d+-\d+, columns \d+-\d+ cannot be read "
                        r"\(RasterioIOError: Read failed\. \(damaged\.tif, band \d: .+\)\)", status["damaged.tif"]["error"])


def test_the_report_says_how_much_of_the_run_the_model_was_busy(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        write_raster(inputs / f"s{i}.tif", scene(90, 70, seed=i))
    wf, report_path = make_workflow(inputs), tmp_path / "report.json"
    assert run(wf, "--report", str(report_path)) == 0
    report = json.loads(report_path.read_text())
    (busy,) = report["model_busy_s"].values()  # the local cluster's one process
    assert 0 < busy < report["seconds"]
    (batch,) = report["model_batch_s"].values()  # the median of 6 batches (3 of each scene)
    assert report["model_batch_s"].keys() == report["model_busy_s"].keys() and 0 < batch <= busy / 3
    assert report["model_busy_share"] == pytest.approx(busy / report["seconds"])
    assert f"model busy {100 * report['model_busy_share']:.0f}% of it" in capsys.readouterr().out
    assert run(wf, "--report", str(report_path)) == 0  # nothing left to predict
    report = json.loads(report_path.read_text())
    assert report["model_busy_s"] == report["model_batch_s"] == {} and report["model_busy_share"] is None


def test_inputs_without_a_crs_are_written_without_one_with_a_warning(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "plain.tif", scene(30, 30), crs=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(make_workflow(inputs)) == 0
    assert "no CRS" in capsys.readouterr().err
    with rasterio.open(tmp_path / "out" / "plain.tif") as out:
        assert out.crs is None


def test_tile_size_does_not_change_the_result(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "big.tif", scene(150, 170, seed=4))
    wf = make_workflow(inputs)
    results = {}
    for tile in (32, 96):
        out = tmp_path / f"out{tile}"
        assert run(wf, "--tile", str(tile), "--output", str(out)) == 0
        with rasterio.open(out / "big.tif") as src:
            results[tile] = src.read(1)
    assert (results[32] == results[96]).mean() >= 0.9999


@pytest.mark.parametrize("setting, low, high", [("output.level", 1, 12), ("output.deflate_level", 1, 12),
                                                ("output.compression=zstd --set output.level", 1, 19)])
def test_the_level_trades_bytes_for_cpu_and_nothing_else(tmp_path, make_workflow, setting, low, high):
    """``deflate_level``, ``level``'s former name, still sets DEFLATE's."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "big.tif", scene(300, 340, seed=4))
    wf = make_workflow(inputs, output={"dir": str(tmp_path / "out"), "confidence": True})
    codec = "zstd" if "zstd" in setting else "deflate"
    sizes, pixels = {}, {}
    for level in (low, high):
        out = tmp_path / f"out{level}"
        assert run(wf, "--output", str(out), *f"--set {setting}={level}".split()) == 0
        sizes[level] = sum((out / name).stat().st_size for name in ("big.tif", "big.confidence.tif"))
        with rasterio.open(out / "big.tif") as mask, rasterio.open(out / "big.confidence.tif") as conf:
            assert mask.compression.name == conf.compression.name == codec
            pixels[level] = (mask.read(), conf.read())
    assert sizes[low] > sizes[high], sizes
    for a, b in zip(pixels[low], pixels[high]):
        np.testing.assert_array_equal(a, b)
    out = tmp_path / f"out{low}"
    assert run(wf, "--output", str(out), *f"--set {setting}={high}".split()) == 0  # finished work stays
    assert (out / "big.tif").stat().st_size + (out / "big.confidence.tif").stat().st_size == sizes[low]


def test_the_level_auto_is_gdals_own_where_the_workers_run_on_cpu(tmp_path, make_workflow):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "big.tif", scene(300, 340, seed=4))
    wf = make_workflow(inputs, output={"dir": str(tmp_path / "out")})
    blocks = {}  # the compressed bytes of each block: the tags (run, time) differ from run to run
    for level in ("auto", "6", "5"):
        out = tmp_path / f"out-{level}"
        assert run(wf, "--output", str(out), "--set", f"output.level={level}") == 0
        with rasterio.open(out / "big.tif") as src:
            blocks[level] = [src.block_size(1, i, j) for (i, j), _ in src.block_windows(1)]
    assert blocks["auto"] == blocks["6"] != blocks["5"]


def test_halo_auto_is_the_models_seamless_halo(tmp_path, make_workflow, capsys):
    """``tiling.halo: auto``, the default, is the model's receptive radius rounded up to its
    factor: the same result as that halo written out, so a rerun with it redoes nothing; a
    narrower halo is a different result, said to be short of the model's reach."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_raster(inputs / "big.tif", scene(150, 170, seed=4))
    wf, out = make_workflow(inputs), tmp_path / "out"
    halo = seamless_halo(TINY.receptive_radius, TINY.factor)
    assert TINY.receptive_radius == 26 and halo == 28
    assert run(wf, "--halo", "auto", "--output", str(out)) == 0
    assert "receptive radius" not in "".join(capsys.readouterr())
    written = (out / "big.tif").stat().st_mtime_ns
    assert run(wf, "--halo", str(halo), "--output", str(out)) == 0
    assert (out / "big.tif").stat().st_mtime_ns == written  # skipped: the same result
    assert run(wf, "--halo", "8", "--output", str(out)) == 0
    assert (out / "big.tif").stat().st_mtime_ns != written
    assert "halo 8 < receptive radius 26" in "".join(capsys.readouterr())


@pytest.mark.parametrize("args, message", [
    (["--tile", "30"], "multiple of the model's down-sampling factor"),
    (["--set", "output.level=0"], "output.level: Value error, deflate levels are 1-12"),
    (["--set", "output.level=fast"], "output.level"),
    (["--set", "output.compression=zstd", "--set", "output.level=23"], "output.level: Value error, zstd levels"),
    (["--set", "output.compression=lzw", "--set", "output.level=3"], "output.level: Value error, lzw has no levels"),
    (["--set", "output.compression=jpeg"], "output.compression"),
    (["--set", "output.deflate_level=0"], "output: Value error, deflate_level (now level) must be auto or 1-12"),
    (["--set", "output.deflate_level=fast"], "deflate_level (now level) must be auto or 1-12"),
    (["--set", "output.deflate_level=5", "--set", "output.level=5"], "deflate_level is the former name of level"),
    (["--set", "bands=[1,2]"], "bands: the workflow selects 2"),
    (["--set", "tiling.halo=-4"], "tiling.halo"),
    (["--set", "tiling.halo=wide"], "tiling.halo"),
    (["--halo", "30"], "multiple of the model's down-sampling factor"),
    (["--tile", "30", "--batch", "auto"], "multiple of the model's down-sampling factor"),
    (["--set", "bands=[1,2]", "--batch", "auto"], "bands: the workflow selects 2"),
])
def test_usage_errors_exit_2_with_the_field(tmp_path, make_workflow, capsys, args, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    assert run(make_workflow(inputs), *args) == 2
    assert message in capsys.readouterr().err


def test_batch_on_the_command_line_is_a_positive_integer_or_auto(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run(make_workflow(inputs), "--batch", "0")
    assert exit_info.value.code == 2 and "--batch is a positive integer or auto" in capsys.readouterr().err
    assert run(make_workflow(inputs), "--batch", "auto") == 0


def test_an_empty_directory_is_not_an_error(tmp_path, make_workflow, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    assert run(make_workflow(inputs)) == 0
    assert "no input matched" in capsys.readouterr().err


def test_the_sample_workflow_maps_the_sample_scenes(tmp_path):
    """The demo's workflow as committed: one mask per scene, on its grid, and right."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sample"
    assert main(["run", str(root / "workflows" / "sample.yaml"), "--no-progress", "--output", str(out),
                 "--set", f"runtime.compilation_cache={tmp_path / 'cache'}"]) == 0
    scenes = sorted((root / "sample_tiles").glob("*.tif"))
    assert [p.name for p in scenes] == ["scene_a.tif", "scene_b.tif", "scene_c.tif"]
    for image in scenes:
        assert_same_grid(image, out / image.name)
        with rasterio.open(out / image.name) as mask, rasterio.open(root / "sample_tiles" / "labels" / image.name) as lab:
            predicted, labels = mask.read(1), lab.read(1)
        np.testing.assert_array_equal(predicted == 255, labels == 255)
        labelled = labels != 255
        assert (predicted[labelled] == labels[labelled]).mean() > 0.95


def test_inputs_inside_a_gdal_virtual_folder_run_like_local_ones(tmp_path, make_workflow):
    """A zip archive read through /vsizip/: listed, read and checksummed by GDAL alone."""
    import zipfile

    local = tmp_path / "in"
    local.mkdir()
    for i, shape in enumerate([(40, 50), (5, 7)]):
        write_raster(local / f"s{i}.tif", scene(*shape, seed=i))
    (local / "broken.tif").write_bytes(b"not a tiff")
    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(local.iterdir()):
            zf.write(path, path.name)
    wf = make_workflow(local)
    assert run(wf, "--output", str(tmp_path / "local")) == 1
    virtual = f"/vsizip/{archive}"
    assert run(wf, "--input", virtual, "--output", str(tmp_path / "zip")) == 1
    for name in ("s0.tif", "s1.tif"):
        with rasterio.open(tmp_path / "local" / name) as a, rasterio.open(tmp_path / "zip" / name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.transform == b.transform and a.crs == b.crs
    report = json.loads((tmp_path / "zip" / "tilepipe-report.json").read_text())
    status = {entry["input"]: entry for entry in report["files"]}
    assert status[f"{virtual}/broken.tif"]["error"].startswith("broken.tif: ")
    assert not (tmp_path / "zip" / "broken.tif").exists()
    again = tmp_path / "again.json"
    assert run(wf, "--input", virtual, "--output", str(tmp_path / "zip"), "--report", str(again)) == 1
    statuses = {e["input"].rsplit("/", 1)[-1]: e["status"] for e in json.loads(again.read_text())["files"]}
    assert statuses == {"s0.tif": "skipped", "s1.tif": "skipped", "broken.tif": "failed"}
