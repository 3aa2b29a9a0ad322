"""Download, for a GPU machine without network access, the wheels of tilepipe's dependencies
that its image lacks, at the versions installed here, into ``.whl/`` (ignored by git).

The device machines' image (Python 3.12) holds JAX with CUDA, Flax, Optax, NumPy and much
else (:data:`ON_DEVICE`), but none of the geospatial or Dask packages. Every dependency of
tilepipe, and theirs, for that Python, that is not in the image is carried: so a new
dependency travels without anyone listing it. ``scripts/device-check`` installs the wheels
there into ``/tmp/site`` with ``--no-deps`` and runs issue 6's device checks.

    .venv/bin/python scripts/device_wheels.py [--python 3.12] [--dest .whl]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ON_DEVICE = frozenset("""
    absl-py aiofiles attrs certifi click cloudpickle etils flax fsspec humanize jax jaxlib jinja2
    markdown-it-py markupsafe mdurl ml-dtypes msgpack numpy opt-einsum optax orbax-checkpoint packaging
    prometheus-client protobuf psutil pygments pyparsing python-dateutil pyyaml rich safetensors scipy
    simplejson sortedcontainers tensorstore toolz tqdm treescope typing-extensions uvloop
""".split())
"""Dependencies the device image holds (its package list as of 2026-11): not carried."""

LEFT_OUT = {
    "fiona": "17 MB of the 64 MiB a call may carry; only polygons and GDAL virtual folders load it",
    "tzdata": "python-dateutil's time-zone data, which tilepipe never reads",
}
"""Dependencies not carried although the image lacks them, and why."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any")


def carried(python: str = "3.12", root: str = "tilepipe") -> list[str]:
    """``root``'s runtime dependencies and theirs (with the extras each asks for) on Linux
    with ``python`` that the image lacks, each pinned to the version installed here."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux"}
    followed: set[tuple[str, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        package, extras = todo.pop()
        for text in _requires(package):
            requirement = Requirement(text)
            if requirement.marker is not None and not any(
                    requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}):
                continue
            name, asked = canonicalize_name(requirement.name), frozenset(requirement.extras)
            if (name, asked) not in followed:
                followed.add((name, asked))
                if name not in LEFT_OUT and name not in ON_DEVICE:  # the image holds what those need
                    todo.append((name, asked))
    keep = sorted({name for name, _ in followed} - ON_DEVICE - set(LEFT_OUT))
    return [_pinned(name) for name in keep]


def _requires(package: str) -> list[str]:
    """What ``package`` requires, as installed here (nothing where it is not installed)."""
    try:
        return importlib.metadata.requires(package) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def _pinned(name: str) -> str:
    """``name==version`` installed here; ``name`` alone where it is not (a package this
    Python does not need, pip's choice for the device's)."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the device's Python version (default 3.12)")
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    args.dest.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python, "--implementation", "cp", "--dest", str(args.dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + carried(args.python), check=True)
    wheels = list(args.dest.glob("*.whl"))
    print(f"{len(wheels)} wheels, {sum(p.stat().st_size for p in wheels) / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
