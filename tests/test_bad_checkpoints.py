"""Checkpoints and local-dir configs whose values would load as a plausible model (NaN weights, integer tensors
cast to float) or fail deep inside torch (a preprocess size, a pruned layout, a TorchScript view or bomb):
each is one CorruptInput line at load, before anything large is allocated."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.core.errors import CorruptInput
from surgeon.model.load import load_model, read_state_dict


def _copy(tiny_default_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_default_dir, folder)
    return folder


def _edit_config(folder: Path, **entries) -> None:
    path = folder / "open_clip_config.json"
    config = json.loads(path.read_text())
    for key, value in entries.items():
        config[key] = {**config.get(key, {}), **value} if key == "preprocess_cfg" else value
    path.write_text(json.dumps(config))


def _refused(folder: Path, *words: str) -> None:
    with pytest.raises(CorruptInput) as err:
        load_model(f"local-dir:{folder}", device="cpu")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


NAME = "visual.transformer.resblocks.0.attn.in_proj_weight"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_default_dir, tmp_path, bad):
    folder = _copy(tiny_default_dir, tmp_path)
    weights = load_file(str(folder / "open_clip_model.safetensors"))
    weights[NAME][0, 0] = bad
    save_file(weights, str(folder / "open_clip_model.safetensors"))
    _refused(folder, NAME, "NaN or infinite")


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32])
def test_integer_or_bool_weights_are_refused_not_cast(tiny_default_dir, tmp_path, dtype):
    """Through a .bin read with weights_only (the safetensors path shares the check)."""
    folder = _copy(tiny_default_dir, tmp_path)
    weights = load_file(str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_model.safetensors").unlink()
    torch.save({k: v.to(dtype) for k, v in weights.items()}, folder / "model.bin")
    _refused(folder, str(dtype).removeprefix("torch."), "float32")


@pytest.mark.parametrize(
    "pcfg, words",
    [
        ({"size": 60000}, ["size", "32x32"]),
        ({"size": [64, 32]}, ["size"]),
        ({"mean": ["x", 1, 1]}, ["mean"]),
        ({"mean": [0.5, 0.5]}, ["mean"]),
        ({"std": [0, 0, 0]}, ["std", "above 0"]),
        ({"interpolation": "nope"}, ["interpolation", "bicubic"]),
        ({"resize_mode": "fill"}, ["resize_mode", "squash"]),
        ({"mode": "CMYK"}, ["mode", "RGB"]),
        ({"fill_color": 10**12}, ["fill_color", "0..255"]),
        ({"fill_color": [0, 0, 0]}, ["fill_color"]),
    ],
)
def test_a_bad_preprocess_cfg_is_refused_when_read(tiny_default_dir, tmp_path, pcfg, words):
    folder = _copy(tiny_default_dir, tmp_path)
    _edit_config(folder, preprocess_cfg=pcfg)
    _refused(folder, "preprocess_cfg", *words)


def test_a_preprocess_cfg_within_bounds_loads(tiny_default_dir, tmp_path):
    folder = _copy(tiny_default_dir, tmp_path)
    _edit_config(folder, preprocess_cfg={"size": [32, 32], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear"})
    loaded = load_model(f"local-dir:{folder}", device="cpu")
    assert loaded.preprocess_cfg["std"] == (0.2, 0.3, 0.4)


@pytest.mark.parametrize(
    "layout, words",
    [
        ([1], ["surgeon must be a JSON object"]),
        ({"heads_kept": [1]}, ["heads_kept"]),
        ({"heads_kept": {"nope": {"0": [0]}}}, ["'nope'"]),
        ({"heads_kept": {"vision": {"99": [0]}}}, ["layers 0..", "not '99'"]),
        ({"heads_kept": {"vision": {"abc": [0]}}}, ["'abc'"]),
        ({"heads_kept": {"vision": {"0": "x" * 5_000_000}}}, ["distinct heads of 0..3", "5,000,000"]),
        ({"heads_kept": {"vision": {"0": [0, 0]}}}, ["distinct heads"]),
        ({"heads_kept": {"vision": {"0": [4]}}}, ["distinct heads of 0..3"]),
        ({"heads_kept": {"vision": {"0": list(range(5))}}}, ["distinct heads"]),
    ],
)
def test_a_bad_pruned_layout_is_refused_before_building(tiny_default_dir, tmp_path, layout, words):
    folder = _copy(tiny_default_dir, tmp_path)
    _edit_config(folder, surgeon=layout)
    _refused(folder, "open_clip_config.json", *words)


# --- TorchScript archives written by hand: what torch.jit.save would never write ---


@pytest.fixture
def script_module(monkeypatch):
    """A pickler-side stand-in for a `__torch__` module class, and storages as persistent ids."""
    fake = types.ModuleType("__torch__")
    monkeypatch.setitem(sys.modules, "__torch__", fake)

    class M:
        def __init__(self, state=None):
            self.state = state

        def __reduce__(self):
            return M, (), self.state

    M.__module__, M.__qualname__ = "__torch__", "M"
    fake.M = M  # type: ignore[attr-defined]
    return M


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _View:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = storage, offset, size, stride, False, OrderedDict()

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", "FloatStorage", obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None


def _archive(path: Path, top, records: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(top)
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("arch/data.pkl", buffer.getvalue())
        archive.writestr("arch/constants.pkl", pickle.dumps(()))
        for key, data in records.items():
            archive.writestr(f"arch/data/{key}", data)
    return path


def _script_refused(path: Path, *words: str) -> None:
    with pytest.raises(CorruptInput) as err:
        read_state_dict(path)
    assert all(w in str(err.value).splitlines()[0] for w in words), str(err.value)


def test_a_script_view_outside_its_storage_is_refused(tmp_path, script_module):
    past_end = script_module({"w": _View(_Storage("0", 4), 0, (100_000_000,), (1,))})
    _script_refused(_archive(tmp_path / "oob.pt", past_end, {"0": bytes(16)}), "past its storage of 4")
    negative = script_module({"w": _View(_Storage("0", 4), -5, (2,), (1,))})
    _script_refused(_archive(tmp_path / "neg.pt", negative, {"0": bytes(16)}), "negative")


def test_a_script_module_containing_itself_is_refused(tmp_path, script_module):
    loop = script_module()
    loop.state = {"child": loop}
    _script_refused(_archive(tmp_path / "cycle.pt", loop, {}), "contains itself")


def test_a_script_deflate_bomb_is_refused_from_its_header(tmp_path, script_module):
    size = 16 << 20
    top = script_module({"w": _View(_Storage("0", size // 4), 0, (1,), (1,))})
    _script_refused(_archive(tmp_path / "bomb.pt", top, {"0": bytes(size)}, zipfile.ZIP_DEFLATED), "bomb")
    lying = script_module({"w": _View(_Storage("0", 2), 0, (1,), (1,))})
    _script_refused(_archive(tmp_path / "size.pt", lying, {"0": bytes(16)}), "declares 8")


def test_a_script_archive_within_bounds_still_reads(tmp_path, script_module):
    top = script_module({"w": _View(_Storage("0", 4), 1, (3,), (1,))})
    weights = read_state_dict(_archive(tmp_path / "ok.pt", top, {"0": torch.arange(4.0).numpy().tobytes()}))
    assert weights["w"].tolist() == [1.0, 2.0, 3.0]
