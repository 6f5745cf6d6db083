"""Open Inference Protocol tensors on the wire <-> numpy, with no Python object per value.

Numeric tensors are read with np.frombuffer from gRPC's raw_input_contents and from the REST binary tensor
extension (Triton's: a JSON header of `Inference-Header-Content-Length` bytes, then each binary input's bytes
in order) and written back the same way; JSON `data` lists and gRPC `contents` are read too (those carry one
Python object per value by their nature: the client chose them). BYTES tensors are Triton's raw format (each
element a 4-byte little-endian length, then its bytes) in binary, strings in JSON.

Every tensor is checked whole here: the shape is a list of at most MAX_OIP_DIMS non-negative integers, the
element count is the product of the shape, its non-zero dimensions multiply to at most MAX_OIP_ELEMENTS, the
datatype is one the protocol names; what fails raises
InvalidInput (400 / INVALID_ARGUMENT) before any model sees the request."""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgeon.core import limits
from surgeon.core.errors import InvalidInput

#: OIP datatypes -> numpy (little-endian, as the protocol's binary forms are)
NUMPY_TYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
#: gRPC InferTensorContents field per datatype (for clients that send `contents` instead of raw bytes)
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
HEADER_LENGTH = "Inference-Header-Content-Length"
FIX_REST = "send JSON, or the binary tensor extension with an Inference-Header-Content-Length header"


@dataclass(frozen=True)
class Tensor:
    """One named tensor: numeric datatypes as a numpy array of `shape`, BYTES as an object array of `bytes`
    (binary and gRPC) or `str` (JSON) elements."""

    name: str
    datatype: str
    array: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    """A tensor's declared shape, checked before anything is allocated for it."""
    if not isinstance(shape, list | tuple) or len(shape) > limits.MAX_OIP_DIMS:
        raise InvalidInput(
            f"{name}: shape must be a list of at most {limits.MAX_OIP_DIMS} integers, got {limits.echo(shape)}"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"{name}: shape must hold non-negative integers, got {limits.echo(shape)}")
    # numpy refuses (ValueError) shapes whose non-zero dimensions multiply past its index range even when a 0 makes
    # the element count 0: [0, 10**30] passed a bound on the count alone and failed in reshape, a 500
    if math.prod(max(d, 1) for d in shape) > limits.MAX_OIP_ELEMENTS:
        raise InvalidInput(
            f"{name}: shape {limits.echo(list(shape))} has dimensions multiplying to more than "
            f"{limits.MAX_OIP_ELEMENTS:,} (zeros aside)"
        )
    return tuple(shape)


def _datatype(name: str, datatype: Any) -> str:
    if datatype != "BYTES" and datatype not in NUMPY_TYPES:
        raise InvalidInput(f"{name}: unknown datatype {limits.echo(datatype)} (FP32, INT64, BYTES, ...)")
    return str(datatype)


def _count_mismatch(name: str, shape: tuple[int, ...], got: int) -> InvalidInput:
    return InvalidInput(f"{name}: shape {list(shape)} needs {math.prod(shape):,} values, got {got:,}")


def from_bytes(name: str, datatype: Any, shape: Any, raw: bytes | memoryview) -> Tensor:
    """A tensor from its binary form (gRPC raw contents, a REST binary chunk): numeric data by np.frombuffer,
    BYTES from length-prefixed elements."""
    shown = limits.echo(name)
    datatype, dims = _datatype(shown, datatype), _shape(shown, shape)
    count = math.prod(dims)
    if datatype == "BYTES":
        return Tensor(name, datatype, _unpack_bytes(shown, dims, memoryview(raw)))
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"{shown}: shape {list(dims)} of {datatype} needs {count * dtype.itemsize:,} bytes, got {len(raw):,}"
        )
    return Tensor(name, datatype, np.frombuffer(raw, dtype=dtype).reshape(dims))


def _unpack_bytes(name: str, dims: tuple[int, ...], raw: memoryview) -> np.ndarray:
    """Triton's serialized BYTES tensor -> an object array of bytes; every length checked against what is left."""
    count = math.prod(dims)
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(items) == count or offset + 4 > len(raw):
            raise _count_mismatch(name, dims, len(items) + 1)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"{name}: element #{len(items)} declares {length:,} bytes, {len(raw) - offset:,} left")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise _count_mismatch(name, dims, len(items))
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(dims)


def from_values(name: str, datatype: Any, shape: Any, data: Any) -> Tensor:
    """A tensor from JSON `data` (flat or nested, row-major) or gRPC `contents` values."""
    shown = limits.echo(name)
    datatype, dims = _datatype(shown, datatype), _shape(shown, shape)
    values = _flatten(shown, data)
    if len(values) != math.prod(dims):
        raise _count_mismatch(shown, dims, len(values))
    if datatype == "BYTES":
        if not all(isinstance(v, str | bytes) for v in values):
            raise InvalidInput(f"{shown}: BYTES data must be strings")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return Tensor(name, datatype, array.reshape(dims))
    if not all(isinstance(v, int | float | bool) for v in values):
        raise InvalidInput(f"{shown}: {datatype} data must be numbers")
    try:
        return Tensor(name, datatype, np.asarray(values, dtype=NUMPY_TYPES[datatype]).reshape(dims))
    except (OverflowError, ValueError) as err:
        raise InvalidInput(f"{shown}: values do not fit {datatype}: {err}") from None


def _flatten(name: str, data: Any) -> list:
    """JSON data nested in row-major lists -> one flat list."""
    if not isinstance(data, list):
        raise InvalidInput(f"{name}: data must be a list, got {type(data).__name__}")
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > limits.MAX_OIP_DIMS:
                    raise InvalidInput(f"{name}: data nested deeper than {limits.MAX_OIP_DIMS} lists")
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def to_bytes(tensor: Tensor) -> bytes:
    """A tensor's binary form: numeric data as little-endian bytes, BYTES length-prefixed."""
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(tensor.array, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
    parts = []
    for item in tensor.array.ravel():
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def to_values(tensor: Tensor) -> list:
    """A tensor's JSON `data`: flat, row-major; BYTES as UTF-8 strings."""
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in tensor.array.ravel()]
    return tensor.array.ravel().tolist()


@dataclass(frozen=True)
class RestRequest:
    """A parsed REST inference request: its id, input tensors, and the outputs asked for as binary."""

    id: str | None
    inputs: list[Tensor]
    binary_outputs: dict[str, bool]
    binary_by_default: bool


#: Content-Encoding -> zlib's wbits for it (tritonclient's request_compression_algorithm)
COMPRESSIONS = {"gzip": 31, "deflate": 15}


def decompress(body: bytes, content_encoding: str | None) -> bytes:
    """The body as sent before compression (gzip or deflate), never more than MAX_OIP_MESSAGE_BYTES of it."""
    if content_encoding in (None, "", "identity"):
        return body
    if content_encoding not in COMPRESSIONS:
        raise InvalidInput(
            f"Content-Encoding {limits.echo(content_encoding)} is not read; send the request uncompressed, gzip "
            "or deflate (tritonclient: request_compression_algorithm=None, 'gzip' or 'deflate')"
        )
    inflater = zlib.decompressobj(COMPRESSIONS[content_encoding])
    try:
        plain = inflater.decompress(body, limits.MAX_OIP_MESSAGE_BYTES + 1)
    except zlib.error as err:
        raise InvalidInput(f"the {content_encoding} body does not decompress: {err}") from None
    if len(plain) > limits.MAX_OIP_MESSAGE_BYTES or inflater.unconsumed_tail:
        raise InvalidInput(f"the request decompresses to more than {limits.MAX_OIP_MESSAGE_BYTES:,} bytes; split it")
    return plain


def parse_rest(body: bytes, header_length: str | None, content_encoding: str | None = None) -> RestRequest:
    """A REST request body (JSON, or JSON + binary tensors; gzip or deflate) -> tensors, checked whole."""
    body = decompress(body, content_encoding)
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        length = limits.header_count(HEADER_LENGTH, header_length, len(body))
        header, binary = body[:length], memoryview(body)[length:]
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[" nested 100,000 deep
        raise InvalidInput(f"the request is not JSON; {FIX_REST}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InvalidInput('the request must be a JSON object with an "inputs" list')
    inputs, offset = [], 0
    for index, item in enumerate(request["inputs"]):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"inputs[{index}] must be an object with a name")
        name = item["name"]
        size = (_parameters(item) or {}).get("binary_data_size")
        if size is None:
            if "data" not in item:
                raise InvalidInput(f"{limits.echo(name)}: no data and no binary_data_size parameter")
            inputs.append(from_values(name, item.get("datatype"), item.get("shape"), item["data"]))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(
                f"{limits.echo(name)}: binary_data_size {limits.echo(size)} overruns the {len(binary):,} bytes sent"
            )
        inputs.append(from_bytes(name, item.get("datatype"), item.get("shape"), binary[offset : offset + size]))
        offset += size
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset:,} bytes after the binary tensors belong to no input")
    parameters = _parameters(request) or {}
    outputs = request.get("outputs") or []
    named = isinstance(outputs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    if not named:
        raise InvalidInput('"outputs" must be a list of objects with a name')
    asked = {o["name"]: bool((_parameters(o) or {}).get("binary_data", False)) for o in outputs}
    request_id = request.get("id")
    return RestRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        binary_outputs=asked,
        binary_by_default=bool(parameters.get("binary_data_output", False)),
    )


def _parameters(item: dict) -> dict | None:
    parameters = item.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    return parameters


def chosen_outputs(outputs: list[Tensor], asked: Iterable[str]) -> list[Tensor]:
    """The outputs a request asked for, all when it named none; a name the model does not have is refused
    (Triton's answer too): an empty 200 would read as "no result" rather than "wrong name"."""
    names = set(asked)
    unknown = sorted(names - {o.name for o in outputs})
    if unknown:
        raise InvalidInput(
            f"no output {limits.echo(unknown[0])}: this model answers {', '.join(o.name for o in outputs)}"
        )
    return [o for o in outputs if not names or o.name in names]


def encode_rest(model: str, request_id: str | None, outputs: list[Tensor], request: RestRequest) -> tuple[bytes, dict]:
    """(body, headers) of a REST answer: each output binary where the request asked (Triton's extension), else
    JSON `data`; only the outputs asked for, or all when none were named."""
    chosen = chosen_outputs(outputs, request.binary_outputs)
    described, chunks = [], []
    for tensor in chosen:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if request.binary_outputs.get(tensor.name, request.binary_by_default):
            chunk = to_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = to_values(tensor)
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model, "outputs": described}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":"), allow_nan=False).encode()  # NaN is no JSON: an error, not a body
    if not chunks:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH.lower(): str(len(header))}
    return b"".join([header, *chunks]), headers
