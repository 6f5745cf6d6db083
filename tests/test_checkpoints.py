"""Checkpoints, model configs and devices: what cannot be loaded is one clear error (never a traceback), a
checkpoint is never unpickled and `--pretrained` is never ignored."""

from __future__ import annotations

import json
import pickle

import pytest

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.model.load import load_model, parse_device, read_state_dict
from tests.conftest import run_cli


def test_checkpoints_that_are_not_checkpoints(tmp_path):
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "text.bin").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CorruptInput, match="empty"):
        read_state_dict(tmp_path / "zero.pt")
    with pytest.raises(CorruptInput, match="not a tensor checkpoint"):
        read_state_dict(tmp_path / "text.bin")


def test_a_config_with_wrong_types(tmp_path, tiny_default_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in tiny_default_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["embed_dim"] = "x"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    done = run_cli("validate", "--model", f"local-dir:{folder}", "--data", "toy")
    code, err = done.returncode, done.stderr
    assert code == 4 and "invalid model configuration" in err and "Traceback" not in err


@pytest.mark.parametrize("device, kind", [("tpu", InvalidInput), ("cuda:9", NotFound), ("cuda:x", InvalidInput)])
def test_unknown_or_absent_devices(device, kind):
    import torch

    if device == "cuda:9" and torch.cuda.device_count() > 9:
        pytest.skip("this machine has ten GPUs")
    with pytest.raises(kind):
        parse_device(device)


def test_device_errors_on_the_command_line():
    done = run_cli("validate", "--device", "tpu")
    code, err = done.returncode, done.stderr
    assert code == 2 and "unknown device 'tpu'" in err


def test_pretrained_is_never_ignored(tmp_path, tiny_default_dir):
    (tmp_path / "evil.pt").write_bytes(b"")
    done = run_cli("rank", "--pretrained", str(tmp_path / "evil.pt"))
    code, err = done.returncode, done.stderr
    assert code == 2 and "--pretrained needs --model" in err
    with pytest.raises(InvalidInput, match="takes no --pretrained"):
        load_model(f"local-dir:{tiny_default_dir}", str(tmp_path / "evil.pt"), device="cpu")


def test_pickled_code_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (open, ("PWNED", "w"))

    (tmp_path / "model.pt").write_bytes(pickle.dumps({"visual.proj": Payload()}))
    with pytest.raises(CorruptInput, match="refused"):
        read_state_dict(tmp_path / "model.pt")
    assert not (tmp_path / "PWNED").exists()
