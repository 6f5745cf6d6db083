"""Every count, range and size a CLI option or a gRPC request may carry, in one table.

The CLI and the service call the same checks before anything is loaded or allocated, so a request such as
`layers="0-999999999999"` or 2,147,483,647 images is refused in microseconds (exit 2 / INVALID_ARGUMENT)
instead of building a huge range or array. Echoed input is truncated so an error stays one short line."""

from __future__ import annotations

import math
import os
import re
from typing import overload

from surgeon.core.errors import InvalidInput

MAX_IMAGES = 10_000_000  # images of a folder used at once
MAX_TOY_IMAGES = 20_000  # the toy world draws images in memory (48 px: ~7 kB each)
MAX_TOY_STEPS = 10_000_000  # toy training steps
MAX_BATCH_SIZE = 4096
MAX_TEXTS_PER_HEAD = 100  # m
MAX_SPAN_RANK = 4096  # TextSpan projection rank
MAX_LAYER_INDEX = 999  # the largest layer index a layer spec may name (ViT-bigG has 48 blocks)
MAX_K = 10_000  # heads to prune (ViT-bigG has 1,664)
MAX_SEEDS = 100
MAX_SEED = 2**63 - 1
MAX_SWEEP_COUNTS = 64
MAX_CLAIM_DRAWS = 10_000  # `surgeon toy report --claim-draws`: random head sets per size (each one validation)
MAX_MODEL_PARAMETERS = 10_000_000_000  # estimated from a model config before it is built (ViT-bigG-14: 2.5 B)
MAX_SEQUENCE_TOKENS = 16_384  # image patches + 1, or the text context (ViT-B-16 at 1,024 px: 4,097)
MAX_ACTIVATION_ELEMENTS = 1 << 26  # tokens x width of one sample in one block (ViT-bigG-14: 0.43 M)
MAX_STUDY_CELLS = 100_000  # cells of one study (models x policy seeds x modes x data sets)
MAX_SHARDS = 10_000  # `surgeon study --shard i/n`
MAX_WEBDATASET_SHARDS = 100_000  # .tar shards of one webdataset split (nshards.txt; ImageNet's val set has 50)
MAX_SHARD_MEMBER_BYTES = 64 << 20  # one member of a webdataset shard (an image, a label), read into memory
MAX_SHARD_HEADER_BYTES = 1 << 20  # a shard's pax or GNU long-name header (a long path: a few KB), read whole
MAX_ZIP_INFLATION = 100  # a checkpoint's zip record may inflate at most this much (torch stores records)
MAX_CHECKPOINT_EVERY = 1_000_000
MAX_SKEW_K = 10_000
MAX_TOP_K = 1000
MAX_CCS = 1000
MAX_POINTS = 100.0  # accuracy gates are in points
MAX_SKEW = 1e6
MAX_ATOL = 1.0
MAX_PREFIX_CACHE_BYTES = 2 << 30  # residual streams an Evaluator keeps per layer (deep cache, debias search)
MAX_SPEC_CHARS = 65_536  # layers, heads, concept, counts, names, paths (every head of ViT-bigG: ~13k)
# video retrieval sets (surgeon.inputs.video): checked from each file's header before a frame is decoded
MAX_VIDEO_BYTES = 4 << 30  # one video file
MAX_VIDEO_SIDE = 4096  # pixels (4K); each decoded frame of a bigger video would be over 50 MB
MAX_VIDEO_SECONDS = 1200.0  # the paper's sets hold clips of 10 s to 1 min; a feature film would decode for minutes
MAX_VIDEO_FRAMES = 72_000  # frames in one file (20 min at 60 fps): counted while demuxing, before decoding
MAX_FRAMES_PER_VIDEO = 256  # frames sampled per video
DEFAULT_VIDEO_FRAMES = 12  # the paper's for MSRVTT and MSVD (DiDeMo: 32)
MAX_FRAME_CACHE_BYTES = 64 << 30  # decoded frames of one set (videos x frames x side^2 x 3) on disk
MAX_ASPECT_RATIO = 100  # image width:height; 1x200000 PNGs would resize to 48 x 9.6 M pixels
ECHO_CHARS = 60
MAX_TEXT_FILE_BYTES = 256 << 20  # text pools, class names, queries, labels
MAX_MESSAGE_CHARS = 1000  # any error line, at the CLI's and the service's boundary
# `surgeon serve-model` (Open Inference Protocol)
MAX_PORT = 65_535  # a TCP port (0: the system picks a free one)
MAX_GRACE_S = 86_400.0  # `surgeon serve --grace`: seconds running jobs get on SIGTERM
MAX_OIP_ROWS = 1024  # rows (images or texts) of one inference request
MAX_OIP_TEXT_CHARS = 10_000  # one text (the tokenizer keeps its first 77 tokens anyway)
MAX_OIP_MESSAGE_BYTES = 64 << 20  # one gRPC message: 1024 RGB 224 px FP32 images are 616 MB, so ~100 per request
MAX_OIP_BATCH_TIME_MS = 1000.0  # how long adaptive batching may hold a request
MAX_OIP_DIMS = 8  # dimensions of one tensor
MAX_OIP_ELEMENTS = MAX_OIP_MESSAGE_BYTES  # each dimension of a tensor, and the product of its non-zero ones
MAX_OIP_REQUEST_PIXELS = 256_000_000  # decoded pixels (from the headers) of one request's image files
MAX_OIP_DECODING_PIXELS = 64_000_000  # decoded pixels held at once across every request being decoded
MAX_THREADS = 1024  # onnxruntime intra-op threads


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """repr(value), cut to `limit` characters with the full length said: error messages stay short."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes | list | tuple) else len(text)
    return f"{text[:limit]}... ({size:,} characters)"


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message cut in the middle to `limit` characters: a message that echoes a long name (a path, a
    model) must still fit a terminal line or a gRPC status (the client refuses large metadata)."""
    if len(message) <= limit:
        return message
    half = (limit - 30) // 2
    return f"{message[:half]} ...({len(message) - 2 * half:,} characters cut)... {message[-half:]}"


def field_of(name: str) -> str:
    """The request field an option name blames (gRPC BadRequest): "m (texts per head)" -> "m", "--k" -> "k"."""
    return name.split(" ")[0].lstrip("-").replace("-", "_")


@overload
def count(name: str, value: int, low: int, high: int) -> int: ...
@overload
def count(name: str, value: int | None, low: int, high: int) -> int | None: ...
def count(name: str, value: int | None, low: int, high: int) -> int | None:
    """An integer option within [low, high] (None: the default, unchecked)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{name} must be an integer in {low}..{high:,}, got {echo(value)}", field=field_of(name))
    return value


def number(name: str, value: float | None, low: float, high: float) -> float | None:
    """A finite number within [low, high]; NaN and infinities are refused (None: the default)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        message = f"{name} must be a finite number in {low:g}..{high:g}, got {echo(value)}"
        raise InvalidInput(message, field=field_of(name))
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be in {low:g}..{high:g}, got {value:g}", field=field_of(name))
    return float(value)


@overload
def text(name: str, value: str, limit: int = MAX_SPEC_CHARS) -> str: ...
@overload
def text(name: str, value: str | None, limit: int = MAX_SPEC_CHARS) -> str | None: ...
def text(name: str, value: str | None, limit: int = MAX_SPEC_CHARS) -> str | None:
    """A string option of at most `limit` characters, without NUL bytes (paths cannot hold them)."""
    if value is None:
        return None
    if len(value) > limit:
        raise InvalidInput(
            f"{name} is {len(value):,} characters long; at most {limit:,} are accepted", field=field_of(name)
        )
    if "\0" in value:
        raise InvalidInput(f"{name} contains a NUL character: {echo(value)}", field=field_of(name))
    return value


def header_count(name: str, value: str, high: int) -> int:
    """An HTTP header's non-negative integer in 0..high: ASCII digits only, at most as many as `high` has (str.isdigit
    takes "²" and int() refuses 5,000 digits with a ValueError: both would be a 500, not a 400)."""
    if not re.fullmatch(r"[0-9]+", value, re.ASCII) or len(value) > len(str(high)) or int(value) > high:
        raise InvalidInput(f"{name} {echo(value)} is not a number of bytes in 0..{high:,}")
    return int(value)


def token_from_env(token_env: str | None) -> str | None:
    """The bearer token a server requires, read from the variable `--token-env` names; None without the option.
    An unset or empty variable is refused: it would otherwise start a server without the auth asked for."""
    if not token_env:
        return None
    token = os.environ.get(token_env, "")
    if not token:
        raise InvalidInput(f"--token-env {token_env}: the environment variable is unset or empty")
    return token


def texts(**values: str | None) -> None:
    """Check several string options at once (keyword = option name)."""
    for name, value in values.items():
        text(name, value)


def images(toy: bool) -> tuple[int, int]:
    """How many images may be used at once: the toy world's are drawn in memory, a folder's are streamed."""
    return 1, MAX_TOY_IMAGES if toy else MAX_IMAGES


#: what decompose.parse_layers accepts: all, lastN, or indices (negative from the end) and spans, comma-separated
_LAYER_SPEC = re.compile(r"all|last\d*|(-?\d+|\d+-\d+)(,(-?\d+|\d+-\d+))*")


def layer_spec(spec: str | None) -> str | None:
    """A layer spec's syntax and size before any model is loaded: "0-999999999999" is refused here (a request
    error), not in the job; which layers the model has is checked when it is loaded (decompose.parse_layers)."""
    if spec is None:
        return None
    compact = re.sub(r"\s*,\s*", ",", text("layers", spec).strip().lower())
    if not _LAYER_SPEC.fullmatch(compact):
        raise InvalidInput(f"bad layer spec {echo(spec)}", hint="use e.g. 8-11, 3,5,7, last4 or all", field="layers")
    too_big = next((n for n in re.findall(r"\d+", compact) if len(n) > 6 or int(n) > MAX_LAYER_INDEX), None)
    if too_big is not None:
        raise InvalidInput(
            f"layers {echo(spec)} names layer {echo(too_big)}; no model has more than {MAX_LAYER_INDEX + 1} layers",
            field="layers",
        )
    return spec


def sweep_counts(spec: str | None) -> list[int] | None:
    """`--counts 0,2,4,8` -> [0, 2, 4, 8]: at most MAX_SWEEP_COUNTS non-negative counts of at most MAX_K heads."""
    if spec is None:
        return None
    text("counts", spec)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > MAX_SWEEP_COUNTS:
        raise InvalidInput(f"counts lists {len(parts)} numbers; at most {MAX_SWEEP_COUNTS} are accepted")
    if not all(re.fullmatch(r"\d{1,6}", p) for p in parts):
        raise InvalidInput(f"bad counts {echo(spec)}", hint="non-negative integers separated by commas, e.g. 0,2,4,8")
    return [count("counts", int(p), 0, MAX_K) for p in parts]


def shard(spec: str | None) -> tuple[int, int] | None:
    """`--shard i/n` (0-based, as a Slurm array 0..n-1 or a Kubernetes indexed Job's completion index) -> (i, n)."""
    if spec is None:
        return None
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text("shard", spec).strip())
    if match is None:
        raise InvalidInput(f"bad --shard {echo(spec)}", hint="i/n with 0 <= i < n, e.g. 0/4", field="shard")
    n = count("shard count (n of --shard i/n)", int(match[2]), 1, MAX_SHARDS)
    return count("shard index (i of --shard i/n)", int(match[1]), 0, n - 1), n
