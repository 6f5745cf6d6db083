"""Every count, range and size is bounded before anything is allocated (surgeon/core/limits.py): bad numbers are
input errors (exit 2) before any work, image bombs are refused before decoding or resizing, and `serve` refuses
ports and grace periods out of range."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.core import limits
from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.inputs.images import open_image
from surgeon.inputs.preprocess import PreprocessConfig, load_image
from surgeon.model.decompose import parse_layers
from surgeon.model.load import load_model
from tests.conftest import NO_MODEL, run_cli

DOCUMENTED_EXIT_CODES = {0, 2, 3, 4, 5, 6, 7, 8, 10, 130}


@pytest.mark.parametrize(
    "args, message",
    [
        (["rank", "--batch-size", "0"], "batch_size must be an integer in 1.."),
        (["rank", "--batch-size", "-1"], "batch_size"),
        (["rank", "--n-images", "0"], "n_images"),
        (["rank", "--n-images", "2147483647"], "n_images"),
        (["rank", "--checkpoint-every", "-2"], "checkpoint_every"),
        (["rank", "--m", "0"], "m (texts per head)"),
        (["rank", "--span-rank", "100000"], "rank must be"),
        (["prune", "--atol", "-1"], "atol"),
        (["prune", "--atol", "nan"], "atol must be a finite number"),
        (["prune", "--k", "0"], "k must be"),
        (["prune", "--seeds", "1000000"], "seeds"),
        (["prune", "--seed", "-3"], "seed"),
        (["prune", "--max-acc-drop", "inf"], "max_acc_drop"),
        (["prune", "--skew-k", "0"], "skew_k"),
        (["sweep", "--counts", ",".join(["1"] * 100)], "at most 64"),
        (["sweep", "--counts", "99999999999999999999"], "bad counts"),
        (["validate", "--skew-k", "-5"], "skew_k"),
        (["export", "--atol", "nan"], "atol"),
        (["toy", "images", "--out", "x", "--n", "100000000"], "n (images) must be"),
    ],
)
def test_bad_numbers_exit_2_before_any_work(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = NO_MODEL if args[0] in ("rank", "prune", "sweep", "validate") else []
    done = run_cli(*args, *extra)
    code, err = done.returncode, done.stderr
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a child process under a memory limit
def test_layer_spans_are_checked_before_a_range_is_built():
    """'0-999999999999' (14 bytes) must not build set(range(10**12)) (an OOM-killed server). A subprocess
    with a 4 GiB address-space limit keeps a regression from taking the machine down with it."""
    script = textwrap.dedent(
        """
        import resource, sys
        from surgeon.model.decompose import parse_layers
        from surgeon.core.errors import InvalidInput
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        try:
            parse_layers("0-999999999999", 12)
        except InvalidInput as err:
            print(err)
            sys.exit(0)
        sys.exit(1)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "out of range: the model has layers 0..11" in done.stdout


@pytest.mark.parametrize("spec", ["3-1", "12", "-13", "0-12", "last13", "1," * 5000 + "x", "9" * 5000])
def test_layer_specs_out_of_range_or_malformed(spec):
    with pytest.raises(InvalidInput) as info:
        parse_layers(spec, 12)
    assert len(str(info.value)) < 300  # echoed input is truncated


def test_echoed_input_is_truncated():
    from surgeon.model.heads import parse_heads

    with pytest.raises(InvalidInput) as info:
        parse_heads("L1.H1," + "x" * 4_000_000)
    assert len(str(info.value)) < 300 and "4,000,000 characters" in str(info.value)
    assert limits.echo("abc") == "'abc'"


def test_limits_refuse_nan_bools_and_long_strings():
    with pytest.raises(InvalidInput, match="finite"):
        limits.number("atol", float("nan"), 0, 1)
    with pytest.raises(InvalidInput):
        limits.count("k", True, 1, 10)
    with pytest.raises(InvalidInput, match="characters long"):
        limits.text("heads", "x" * (limits.MAX_SPEC_CHARS + 1))
    with pytest.raises(InvalidInput, match="NUL"):
        limits.text("out", "a\0b")
    assert limits.sweep_counts(" 0, 2,8") == [0, 2, 8]


def test_a_one_pixel_wide_strip_is_refused_before_resizing(tmp_path):
    strip = tmp_path / "imgs" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (1, 200_000)).save(strip)  # under 1 KB on disk; 48 x 9.6 M pixels once resized
    assert strip.stat().st_size < 2000
    with pytest.raises(CorruptInput, match="elongated"):
        load_image(strip)
    with pytest.raises(CorruptInput, match="resized beyond"):  # in-memory images skip load_image
        PreprocessConfig(size=(48, 48))(Image.new("RGB", (1, 200_000)))
    # the torch path skips it with a count, like any unreadable image
    from surgeon.inputs.images import folder_images

    for i in range(2):
        Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(strip.parent / f"ok{i}.png")
    images = folder_images(strip.parent)
    loaded = load_model(device="cpu")
    batches = list(images.batches(loaded.preprocess, 8))
    assert sum(len(b) for b in batches) == 2 and "elongated" in images.skipped[0]


@pytest.mark.slow  # a child process per value: a server that accepted one would listen
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


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # a few KiB on disk, 100 megapixels decoded
    assert path.stat().st_size < 100_000
    with pytest.raises(CorruptInput, match="decompression bomb"):
        open_image(path)


@pytest.mark.parametrize("value", ["1", "-5", "10001", str(2**70)])
def test_toy_report_refuses_claim_draws_out_of_range_before_the_model_loads(value):
    done = run_cli("toy", "report", f"--claim-draws={value}", *NO_MODEL)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--claim-draws must be an integer in 2..10,000, got {value}" in done.stderr
