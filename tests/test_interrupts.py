"""What the CLI promises under interruption and races: no partial outputs, caches stay loadable (SIGINT, SIGTERM,
two processes exporting into one folder). Each run is a real child process: the signal is what is tested."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from surgeon.core.stats import HeadStats
from surgeon.exporting.export import sha256_file
from surgeon.pruning.prune import prune
from surgeon.selection.policies import PolicyOptions
from tests.conftest import synthetic_suite
from tests.test_rank_cli import TAXONOMY

pytestmark = pytest.mark.slow  # real child processes, signalled or racing


@pytest.fixture
def run_dir(setup, tmp_path) -> Path:
    loaded, ranking = setup
    out = tmp_path / "run"
    prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=2), out_dir=out)
    return out


def surgeon(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "surgeon", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def assert_complete_or_absent(folder: Path, required: list[str]) -> None:
    if folder.exists():
        assert all((folder / name).is_file() for name in required), sorted(p.name for p in folder.iterdir())
    if folder.parent.exists():
        assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_two_processes_exporting_into_one_folder(run_dir, tmp_path):
    target = tmp_path / "shared-export"
    procs = [surgeon("export", str(run_dir), "--format", "safetensors", "--out", str(target)) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 5], results
    loser = next(err for code, err in results if code == 5)
    assert "already exists" in loser or "another process" in loser
    surgery = json.loads((target / "surgery.json").read_text())
    for name, digest in surgery["sha256"].items():  # the winner's folder is whole and consistent
        assert sha256_file(target / name) == digest


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_sigint_during_rank_leaves_no_partial_output(tiny_default_dir, tmp_path, delay):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    taxonomy = tmp_path / "taxonomy.json"
    taxonomy.write_text(json.dumps(TAXONOMY))
    pool = tmp_path / "pool.txt"
    pool.write_text("a red dog\na blue cat\nthree birds\nParis\na green bird\nfive cats\n")
    out = tmp_path / "out" / "rank"
    proc = surgeon(
        "rank",
        "--model",
        f"local-dir:{tiny_default_dir}",
        "--images",
        str(images),
        "--texts",
        str(pool),
        "--taxonomy",
        str(taxonomy),
        "--batch-size",
        "2",
        "--checkpoint-every",
        "5",
        "--out",
        str(out),
        "--quiet",
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    assert code in (0, 130, -signal.SIGINT), proc.stderr.read()  # -SIGINT: interrupted while starting up
    assert_complete_or_absent(out, ["ranking.json", "ranking.csv", "ccs_heatmap.png"])
    cache = Path(os.environ["SURGEON_CACHE_DIR"])
    for entry in cache.rglob("*.safetensors"):  # every cache entry (final or resumable checkpoint) loads
        if entry.parent.name == "text":  # the pool's embeddings
            assert load_file(entry)["embeddings"].ndim == 2
        else:
            HeadStats.load(entry)
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]


def test_sigint_during_export_leaves_no_partial_output(run_dir, tmp_path):
    target = tmp_path / "exp" / "onnx"
    proc = surgeon("export", str(run_dir), "--format", "onnx", "--out", str(target))
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=300)
    assert code in (0, 130, -signal.SIGINT), proc.stderr.read()  # -SIGINT: interrupted while starting up
    assert_complete_or_absent(target, ["surgery.json", "README.md", "onnx/visual.onnx"])


def test_sigterm_unwinds_like_ctrl_c(onnx_run, tmp_path):
    """SIGTERM (docker stop, kill) unwinds the CLI like Ctrl-C: no temporary folder is left behind."""
    import signal

    target = tmp_path / "exp" / "onnx"
    proc = surgeon("export", str(onnx_run), "--format", "onnx", "--out", str(target))
    deadline = time.monotonic() + 300
    while not list(target.parent.glob(".onnx.tmp-*")):  # inside the export: its temporary folder exists
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted" in stderr, (stdout, stderr)
    assert list(target.parent.iterdir()) == []
