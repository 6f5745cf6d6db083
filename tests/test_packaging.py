"""The wheel a user installs: one top-level namespace, the data files the stages read, the generated stubs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel with pip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    source = tmp_path_factory.mktemp("source")
    for name in tracked.splitlines():  # a clean copy: the build must not pick up local build/ or .venv leftovers
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("surgeon-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_one_namespace(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"surgeon"}


def test_the_wheel_carries_data_stubs_and_the_toy_model(wheel):
    names = set(wheel.namelist())
    assert "surgeon/v1/surgeon_pb2.py" in names and "surgeon/v1/surgeon_pb2_grpc.py" in names
    assert "surgeon/data/pools/toy.json" in names and "surgeon/data/taxonomies/toy.json" in names
    assert any(n.startswith("surgeon/data/toy_model/") and n.endswith(".safetensors") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
