"""The tensors of a TorchScript archive (OpenAI's own CLIP files, `~/.cache/clip/ViT-B-32.pt`), read without
executing anything from it.

`torch.load(weights_only=True)` refuses TorchScript archives and `torch.jit.load` compiles and runs the code
they carry. Their `data.pkl` is a pickle of module objects whose attributes are tensors: an unpickler that
knows exactly two callables (OrderedDict and a tensor rebuild over the archive's raw storages) and turns every
`__torch__.*` class into an inert attribute holder yields the state dict; any other global is refused."""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from surgeon.core import limits
from surgeon.core.errors import CorruptInput

_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript(path: Path) -> bool:
    """A zip whose records include TorchScript code (`<root>/code/` or `constants.pkl`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in archive.namelist())


def script_activation(path: Path) -> str | None:
    """ "QuickGELU" or "GELU" when a TorchScript archive's code names the activation module, else None
    (also for any other file)."""
    if not is_torchscript(path):
        return None
    with zipfile.ZipFile(path) as archive:
        code = " ".join(
            archive.read(n).decode("utf-8", "replace")
            for n in archive.namelist()
            if "/code/" in n and n.endswith(".py")
        )
    return "QuickGELU" if "QuickGELU" in code else "GELU" if "GELU" in code else None


class _ScriptObject:
    """Stands in for a TorchScript class: keeps the attributes BUILD gives it, nothing else."""

    def __init__(self, *_args):
        self.attributes: dict = {}

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.attributes = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_rest) -> torch.Tensor:
    """A view of a storage, refused unless it lies inside it (as_strided reads past the end unchecked)."""
    shape, strides = tuple(size), tuple(stride)
    numbers = (offset, *shape, *strides)
    if len(shape) != len(strides) or not all(type(n) is int and n >= 0 for n in numbers):
        raise pickle.UnpicklingError(
            f"a tensor view with a negative or non-integer offset {offset!r}, size {shape!r} or stride {strides!r}"
        )
    if 0 not in shape and offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= storage.numel():
        raise pickle.UnpicklingError(
            f"a tensor view (offset {offset}, size {shape}, stride {strides}) reaches past its storage of "
            f"{storage.numel():,} elements"
        )
    return torch.as_strided(storage, shape, strides, offset)


class _Unpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, root: str):
        super().__init__(handle)
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _DTYPES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights archive")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _DTYPES:
            raise pickle.UnpicklingError(f"unexpected record {kind!r} / {storage_type!r}")
        if key not in self.storages:
            member = self.archive.getinfo(f"{self.root}/data/{key}")
            check_storage_member(member, numel * _DTYPES[storage_type].itemsize if type(numel) is int else None)
            raw = bytearray(self.archive.read(member))
            self.storages[key] = torch.frombuffer(raw, dtype=_DTYPES[storage_type]) if raw else torch.empty(0)
        return self.storages[key]


def check_storage_member(member: zipfile.ZipInfo, nbytes: int | None) -> None:
    """A storage record is read whole into memory: refuse one whose size is not what its tensor declares, or
    that inflates more than limits.MAX_ZIP_INFLATION times (torch writes records stored; a 1.5 MB deflate
    bomb would otherwise become 1.5 GB)."""
    if nbytes is None or member.file_size != nbytes:
        raise pickle.UnpicklingError(
            f"record {member.filename} holds {member.file_size:,} bytes; its storage declares {nbytes!r}"
        )
    if member.file_size > max(member.compress_size, 1) * limits.MAX_ZIP_INFLATION:
        raise pickle.UnpicklingError(
            f"record {member.filename} inflates {member.compress_size:,} bytes to {member.file_size:,} "
            f"(more than {limits.MAX_ZIP_INFLATION}x: a compression bomb)"
        )


def _walk(top: _ScriptObject) -> dict[str, torch.Tensor]:
    """Every tensor of the module tree by dotted name; iterative, and a module met twice (an archive whose
    module contains itself) is refused instead of recursing forever."""
    out: dict[str, torch.Tensor] = {}
    seen = {id(top)}
    stack = [(top, "")]
    while stack:
        obj, prefix = stack.pop()
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                if id(value) in seen:
                    raise CorruptInput(f"the TorchScript archive's module {prefix}{name} contains itself")
                seen.add(id(value))
                stack.append((value, f"{prefix}{name}."))
    return out


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archived module tree, by dotted name (parameters, buffers and tensor
    constants such as OpenAI's `input_resolution`; the loader drops names the model does not have)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise CorruptInput(f"{path} is a TorchScript archive without data.pkl")
            root = pickles[0].split("/")[0]
            with archive.open(pickles[0]) as handle:
                top = _Unpickler(handle, archive, root).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError) as err:
        raise CorruptInput(
            f"cannot read the weights of the TorchScript archive {path}: {err}",
            hint="convert it to .safetensors on a trusted machine: torch.jit.load(PATH).state_dict() -> "
            "safetensors.torch.save_file",
        ) from None
    if not isinstance(top, _ScriptObject):
        raise CorruptInput(f"{path}: the TorchScript archive does not hold a module")
    try:
        return _walk(top)
    except CorruptInput as err:
        raise CorruptInput(f"{path}: {err}") from None
