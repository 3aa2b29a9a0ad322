"""The wheels a lent GPU machine is sent (scripts/device_wheels.py): what its image lacks of
tilepipe's dependencies, for its Python, at the versions installed here."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_wheels.py"


@pytest.fixture(scope="module")
def device_wheels():
    spec = importlib.util.spec_from_file_location("device_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names(pins):
    return {pin.split("==")[0] for pin in pins}


def test_carries_what_the_image_lacks_at_the_installed_versions(device_wheels):
    pins = device_wheels.carried("3.12")
    names = _names(pins)
    assert {"rasterio", "rio-cogeo", "dask", "distributed", "pydantic", "pydantic-core", "pyproj", "shapely",
            "pystac", "blake3", "tornado"} <= names
    assert {"pystac-ext-label", "pystac-ext-projection", "pystac-ext-classification"} <= names  # pystac's needs too
    assert not names & device_wheels.ON_DEVICE
    assert not names & set(device_wheels.LEFT_OUT)
    for pin in pins:
        name, version = pin.split("==")
        assert importlib.metadata.version(name) == version


def test_markers_are_those_of_the_device_python(device_wheels):
    # dask needs the importlib_metadata backport below Python 3.12 only
    assert "importlib-metadata" in _names(device_wheels.carried("3.11"))
    assert "importlib-metadata" not in _names(device_wheels.carried("3.12"))
