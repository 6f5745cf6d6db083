"""Every count, range and size is bounded before anything is allocated (surgeon/limits.py),
bad numbers are input errors (exit 2) before any work, and the CLI's failures are one clear line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon import limits
from surgeon.cli import main
from surgeon.decompose import parse_layers
from surgeon.errors import CorruptInput, InvalidInput, NotFound, StorageError
from surgeon.load import load_model, parse_device, read_state_dict
from surgeon.runtime.preprocess import PreprocessConfig, load_image

DOCUMENTED_EXIT_CODES = {0, 2, 3, 4, 5, 6, 7, 8, 10, 130}


def run_cli(*args: str, capsys) -> tuple[int, str]:
    """`surgeon ARGS` in this process (main(): the real error handling), its exit code and stderr."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    argv = sys.argv
    sys.argv = ["surgeon", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return code, capsys.readouterr().err


# ---- numbers refused before any work: exit 2, one line, nothing written ----

NO_MODEL = ["--model", "local-dir:/nonexistent/surgeon-model"]  # a valid request would fail here with exit 3


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
def test_bad_numbers_exit_2_before_any_work(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = NO_MODEL if args[0] in ("rank", "prune", "sweep", "validate") else []
    code, err = run_cli(*args, *extra, capsys=capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []


def test_layer_spans_are_checked_before_a_range_is_built():
    """'0-999999999999' (14 bytes) must not build set(range(10**12)) (an OOM-killed server). A subprocess
    with a 4 GiB address-space limit keeps a regression from taking the machine down with it."""
    script = textwrap.dedent(
        """
        import resource, sys
        from surgeon.decompose import parse_layers
        from surgeon.errors import InvalidInput
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
    from surgeon.heads import parse_heads

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


# ---- image bombs after resizing (the torch path and the torch-free path) ----


def test_a_one_pixel_wide_strip_is_refused_before_resizing(tmp_path, capsys):
    strip = tmp_path / "imgs" / "strip.png"
    strip.parent.mkdir()
    Image.new("RGB", (1, 200_000)).save(strip)  # under 1 KB on disk; 48 x 9.6 M pixels once resized
    assert strip.stat().st_size < 2000
    with pytest.raises(CorruptInput, match="elongated"):
        load_image(strip)
    with pytest.raises(CorruptInput, match="resized beyond"):  # in-memory images skip load_image
        PreprocessConfig(size=(48, 48))(Image.new("RGB", (1, 200_000)))
    # the torch path skips it with a count, like any unreadable image
    from surgeon.images import folder_images

    for i in range(2):
        Image.fromarray(np.full((40, 60, 3), 60 * i, np.uint8)).save(strip.parent / f"ok{i}.png")
    images = folder_images(strip.parent)
    loaded = load_model(device="cpu")
    batches = list(images.batches(loaded.preprocess, 8))
    assert sum(len(b) for b in batches) == 2 and "elongated" in images.skipped[0]


# ---- tracebacks that became one clear line ----


def test_checkpoints_that_are_not_checkpoints(tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "text.bin").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CorruptInput, match="empty"):
        read_state_dict(tmp_path / "zero.pt")
    with pytest.raises(CorruptInput, match="not a tensor checkpoint"):
        read_state_dict(tmp_path / "text.bin")


def test_a_config_with_wrong_types(tmp_path, tiny_default_dir, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in tiny_default_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = "x"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    code, err = run_cli("validate", "--model", f"local-dir:{folder}", "--data", "toy", capsys=capsys)
    assert code == 4 and "invalid model configuration" in err and "Traceback" not in err


@pytest.mark.parametrize("device, kind", [("tpu", InvalidInput), ("cuda:9", NotFound), ("cuda:x", InvalidInput)])
def test_unknown_or_absent_devices(device, kind):
    import torch

    if device == "cuda:9" and torch.cuda.device_count() > 9:
        pytest.skip("this machine has ten GPUs")
    with pytest.raises(kind):
        parse_device(device)


def test_device_errors_on_the_command_line(capsys):
    code, err = run_cli("validate", "--device", "tpu", capsys=capsys)
    assert code == 2 and "unknown device 'tpu'" in err


def test_pretrained_is_never_ignored(tmp_path, tiny_default_dir, capsys):
    (tmp_path / "evil.pt").write_bytes(b"")
    code, err = run_cli("rank", "--pretrained", str(tmp_path / "evil.pt"), capsys=capsys)
    assert code == 2 and "--pretrained needs --model" in err
    with pytest.raises(InvalidInput, match="takes no --pretrained"):
        load_model(f"local-dir:{tiny_default_dir}", str(tmp_path / "evil.pt"), device="cpu")


def test_disk_full_while_writing_safetensors_is_a_storage_error(tmp_path, monkeypatch, tiny_default_dir):
    """safetensors reports ENOSPC as its own SafetensorError (message from a real 1 MB tmpfs), not an OSError."""
    from safetensors import SafetensorError

    from surgeon.checkpoint import write_local_dir
    from surgeon.paths import atomic_dir

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("surgeon.checkpoint.save_file", full)
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    with pytest.raises(StorageError, match="No space left on device"):
        with atomic_dir(tmp_path / "out") as tmp:
            write_local_dir(loaded, tmp)
    assert list(tmp_path.iterdir()) == []
    assert StorageError.exit_code == 8


# ---- CSV labels ----


def _manifest(tmp_path: Path, labels: list[str]) -> Path:
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_integer_csv_labels_index_classnames(tmp_path):
    from surgeon.validate import classification_set

    names = [f"class{i}" for i in range(12)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    task = classification_set(_manifest(tmp_path, ["2", "10", "0"]), tmp_path / "names.txt")
    assert task.labels.tolist() == [2, 10, 0]
    assert task.classnames == names


@pytest.mark.parametrize(
    "labels, names, message",
    [
        (["2", "cat"], ["cat", "dog", "x"], "mixes class indices and class names"),
        (["0", "3"], ["cat", "dog"], "label 3"),
        (["0", "1"], None, "integer labels"),
        (["cat", "cow"], ["cat", "dog"], "not in"),
    ],
)
def test_csv_label_mismatches_are_errors(tmp_path, labels, names, message):
    from surgeon.validate import classification_set

    names_file = None
    if names is not None:
        names_file = tmp_path / "names.txt"
        names_file.write_text("\n".join(names) + "\n")
    with pytest.raises(InvalidInput, match=message):
        classification_set(_manifest(tmp_path, labels), names_file)


def test_name_labels_follow_the_classnames_order(tmp_path):
    from surgeon.validate import classification_set

    (tmp_path / "names.txt").write_text("dog\ncat\n")
    task = classification_set(_manifest(tmp_path, ["cat", "dog", "cat"]), tmp_path / "names.txt")
    assert task.classnames == ["dog", "cat"] and task.labels.tolist() == [1, 0, 1]


# ---- surprises ----


def test_a_fifo_as_text_pool_is_refused_not_read(tmp_path, capsys):
    import os

    fifo = tmp_path / "pool.txt"
    os.mkfifo(fifo)  # reading it would block forever
    code, err = run_cli("rank", "--texts", str(fifo), capsys=capsys)
    assert code == 2 and "not a regular file" in err


def test_validate_out_needs_force_to_replace_a_file(tmp_path, capsys):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    code, err = run_cli("validate", "--out", str(existing), capsys=capsys)
    assert code == 5 and "already exists" in err and existing.read_text() == "{}"
