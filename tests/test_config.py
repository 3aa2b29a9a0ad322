"""Workflow files: safe YAML, one validated object, errors that name the field."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_workflow
from pipeline.errors import WorkflowError


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"input": {"dir": "in"}, "output": {"dir": "out"}, "model": {"checkpoint": "m.safetensors"}, "bands": [1, 2]}


def test_relative_paths_are_relative_to_the_workflow_file(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    wf = load_workflow(write(tmp_path, BASE))
    assert wf.input.dir == tmp_path / "in" and wf.model.checkpoint == tmp_path / "m.safetensors"


@pytest.mark.parametrize("change, field", [
    ({"tiling": {"tile": "big"}}, "tiling.tile"),
    ({"tiling": {"tyle": 3}}, "tiling.tyle: unknown field"),
    ({"tiling": {"halo": -8}}, "tiling.halo"),
    ({"tiling": {"halo": "wide"}}, "tiling.halo"),
    ({"bands": [0, 1]}, "bands"),
    ({"bands": []}, "bands"),
    ({"normalise": {"scale": [1.0, 2.0, 3.0]}}, "normalise.scale"),
    ({"surprise": 1}, "surprise: unknown field"),
    *(({"runtime": {field: value}}, f"runtime.{field}") for field in ("readers", "finishers")
      for value in (-1, "many", 1.5)),
])
def test_bad_fields_are_reported_by_name(tmp_path, change, field):
    with pytest.raises(WorkflowError, match=field.replace(".", r"\.")):
        load_workflow(write(tmp_path, {**BASE, **change}))


def test_tiles_are_512_with_the_models_seamless_halo_unless_the_workflow_says(tmp_path):
    wf = load_workflow(write(tmp_path, BASE))
    assert (wf.tiling.tile, wf.tiling.halo, wf.tiling.batch) == (512, "auto", "auto")
    wf = load_workflow(write(tmp_path, {**BASE, "tiling": {"tile": 256, "halo": 64}}))
    assert (wf.tiling.tile, wf.tiling.halo) == (256, 64)


def test_missing_sections_are_named(tmp_path):
    with pytest.raises(WorkflowError, match="model: Field required"):
        load_workflow(write(tmp_path, {k: v for k, v in BASE.items() if k != "model"}))


def test_overrides_are_validated_like_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE)
    wf = load_workflow(path, ["tiling.tile=128", "dask.scheduler=tcp://127.0.0.1:8786", "output.dir=elsewhere"])
    assert wf.tiling.tile == 128 and wf.dask.scheduler == "tcp://127.0.0.1:8786"
    assert wf.output.dir == tmp_path / "elsewhere"
    with pytest.raises(WorkflowError, match="tiling.batch"):
        load_workflow(path, ["tiling.batch=zero"])
    with pytest.raises(WorkflowError, match="expected section.key=value"):
        load_workflow(path, ["tiling.batch"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(WorkflowError, match="not valid YAML"):
        load_workflow(path)


def test_not_a_mapping_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(WorkflowError, match="mapping"):
        load_workflow(path)


def test_digest_changes_with_content(tmp_path):
    path = write(tmp_path, BASE)
    assert load_workflow(path).digest() == load_workflow(path).digest()
    assert load_workflow(path).digest() != load_workflow(path, ["tiling.halo=8"]).digest()


@pytest.mark.parametrize("source", ["/vsizip//data/scenes.zip", "/vsis3/bucket/prefix", "s3://bucket/prefix"])
def test_gdal_virtual_input_folders_are_kept_verbatim(tmp_path, source):
    wf = load_workflow(write(tmp_path, {**BASE, "input": {"dir": source}}))
    assert wf.input.dir == source and str(wf.input.source) == source
    assert load_workflow(write(tmp_path, BASE)).input.source == tmp_path / "in"


def test_outputs_are_deflate_at_an_automatic_level_unless_the_workflow_says(tmp_path):
    wf = load_workflow(write(tmp_path, BASE))
    assert (wf.output.compression, wf.output.level) == ("deflate", "auto")
    wf = load_workflow(write(tmp_path, {**BASE, "output": {"dir": "out", "compression": "zstd", "level": 3}}))
    assert (wf.output.compression, wf.output.level) == ("zstd", 3)


def test_deflate_level_is_the_former_name_of_level(tmp_path):
    wf = load_workflow(write(tmp_path, {**BASE, "output": {"dir": "out", "deflate_level": 3}}))
    assert (wf.output.compression, wf.output.level) == ("deflate", 3)
    with pytest.raises(WorkflowError, match="output: Value error, deflate_level is the former name of level"):
        load_workflow(write(tmp_path, {**BASE, "output": {"dir": "out", "compression": "zstd", "deflate_level": 3}}))
