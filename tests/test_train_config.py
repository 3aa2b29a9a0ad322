"""The training workflow schema: paths, package paths, overrides and helpful errors."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from pipeline.errors import WorkflowError
from unet_flax.train_config import load_train_workflow, resolve_package_path

CLASSES = [{"code": 0, "name": "a", "color": "#000000"}, {"code": 1, "name": "b", "color": "#ffffff"}]


def write(tmp_path: Path, **data) -> Path:
    data = {"data": {"pairs": [{"image": "img.tif", "labels": "lab/img.gpkg"}]}, "classes": CLASSES,
            "output": {"checkpoint": "model/m.safetensors"}, **data}
    path = tmp_path / "wf" / "train.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_relative_paths_are_relative_to_the_workflow_file(tmp_path):
    cfg = load_train_workflow(write(tmp_path))
    pair = cfg.data.pairs[0]
    assert pair.image == tmp_path / "wf" / "img.tif"
    assert pair.labels == tmp_path / "wf" / "lab" / "img.gpkg" and pair.vector_labels
    assert cfg.output.checkpoint == tmp_path / "wf" / "model" / "m.safetensors"
    assert cfg.output.metrics.name == "m.metrics.json" and cfg.output.last_state.name == "m.last.safetensors"


def test_set_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_workflow(write(tmp_path), ["output.checkpoint=here/x.safetensors", "optimizer.steps=7"])
    assert cfg.output.checkpoint == tmp_path / "here" / "x.safetensors"
    assert cfg.optimizer.steps == 7


def test_home_paths_are_expanded_in_the_file_and_in_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_train_workflow(write(tmp_path, output={"checkpoint": "~/m.safetensors"}))
    assert cfg.output.checkpoint == tmp_path / "home" / "m.safetensors"
    cfg = load_train_workflow(write(tmp_path), ["output.checkpoint=~/n.safetensors"])
    assert cfg.output.checkpoint == tmp_path / "home" / "n.safetensors"


def test_set_pairs_lists_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_train_workflow(write(tmp_path), ["data.pairs=[{image: [b1.tif, b2.tif], labels: l.tif}]"])
    assert cfg.data.pairs[0].images == (tmp_path / "b1.tif", tmp_path / "b2.tif")
    assert cfg.data.pairs[0].labels == tmp_path / "l.tif"


def test_stacked_band_files_and_directories(tmp_path):
    (tmp_path / "wf" / "imgs").mkdir(parents=True)
    (tmp_path / "wf" / "labs").mkdir()
    for stem in ("s1", "s2"):
        (tmp_path / "wf" / "imgs" / f"{stem}.tif").touch()
        (tmp_path / "wf" / "labs" / f"{stem}.shp").touch()
    cfg = load_train_workflow(write(tmp_path, data={"images_dir": "imgs", "labels_dir": "labs"}))
    pairs = cfg.data.scene_pairs()
    assert [(p.image.name, p.labels.name) for p in pairs] == [("s1.tif", "s1.shp"), ("s2.tif", "s2.shp")]
    cfg = load_train_workflow(write(tmp_path, data={"pairs": [{"image": ["b1.tif", "b2.tif"], "labels": "l.tif"}]}))
    assert [p.name for p in cfg.data.pairs[0].images] == ["b1.tif", "b2.tif"]


def test_package_paths_resolve_without_importing():
    path = resolve_package_path("pkg://pytest/__init__.py")
    assert path == Path(importlib.util.find_spec("pytest").submodule_search_locations[0]) / "__init__.py"
    with pytest.raises(ValueError, match="pip install --no-deps no_such_pkg"):
        resolve_package_path("pkg://no_such_pkg/x.tif")


def test_package_paths_in_a_workflow(tmp_path):
    cfg = load_train_workflow(write(tmp_path, data={"pairs": [{"image": ["pkg://pytest/a.tif"], "labels": "pkg://pytest/b.shp"}]}))
    assert cfg.data.pairs[0].images[0].parent.name == "pytest" and cfg.data.pairs[0].labels.is_absolute()


@pytest.mark.parametrize(("data", "field"), [
    ({"loss": {"kind": "focal"}}, "loss.kind"),
    ({"optimiser": {}}, "optimiser: unknown field"),
    ({"loss": {"class_weights": [1.0]}}, "class_weights has 1 values for 2 classes"),
    ({"sampling": {"patch": 100}}, "multiple of 8"),
    ({"validation": {"mode": "strips", "strips": 4, "fold": 4}}, "fold 4"),
    ({"classes": [CLASSES[0], CLASSES[0]]}, "duplicate codes"),
    ({"data": {"pairs": [], "images_dir": "x"}}, "labels_dir"),
])
def test_errors_name_the_field(tmp_path, data, field):
    with pytest.raises(WorkflowError, match=field):
        load_train_workflow(write(tmp_path, **data))
