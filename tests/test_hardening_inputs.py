"""Small inputs that used to slip through: `serve --port` beyond 65535 (it wrapped modulo 65536), `--grace` NaN or
negative, a CSV manifest or class-names file starting with a UTF-8 BOM, negative class indices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.errors import InvalidInput
from surgeon.validate import classification_set


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be an integer in 0..65,535, got 70000"),
        (["--port", "-1"], "--port must be an integer in 0..65,535"),
        (["--grace", "nan"], "--grace must be a finite number"),
        (["--grace", "-1"], "--grace must be in 0..86400, got -1"),
        (["--grace", "inf"], "--grace must be a finite number"),
    ],
)
def test_serve_refuses_ports_and_grace_periods_out_of_range(args, message, tmp_path):
    """In a child process with a timeout: a server that accepted the option would listen until killed."""
    code = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])  # this checkout
    command = [sys.executable, "-m", "surgeon", "serve", "--exports-root", str(tmp_path / "exports"), *args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": code}
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve {' '.join(args)} was accepted: the server listened")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "exports").exists()  # refused before the server was built


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name)


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header is still a header, the first class name still itself."""
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,cat\nb.png,dog\nc.png,cat\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    task = classification_set(manifest)
    assert task.classnames == ["cat", "dog"] and list(task.labels) == [0, 1, 0]
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n", encoding="utf-8-sig")
    manifest.write_text("path,label\na.png,1\nb.png,0\nc.png,1\n", encoding="utf-8-sig")
    task = classification_set(manifest, names)
    assert task.classnames == ["dog", "cat"] and list(task.labels) == [1, 0, 1]


def test_a_negative_manifest_label_says_so(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,1\nb.png,-1\n")
    with pytest.raises(InvalidInput, match=r"has label -1, but .*names.txt names 2 classes \(indices 0..1\)"):
        classification_set(manifest, names)
