"""Each option declared once, as data: a spec field carrying its default, bound, unit and help.

surgeon/api.py's specs declare their fields with `option(...)` (or share an `Option` between specs, so an option
used by several jobs still has one default); the nested parts of a spec (its model, its validation data) with
`part(...)`. Everything else is derived from those fields: the bounds checks (`check_bounds`, bounds read from
limits.py, the one bounds table), the CLI options (cli.py), the gRPC request mapping (`from_message`, used by
server/specs.py), the study file's keys (`from_table`, used by study.py) and docs/options.md (`markdown`). Adding
an option is then its field, the code that uses it and, for gRPC, its proto field.

Light to import (no torch): the CLI reads these fields at start-up."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgeon.core import limits
from surgeon.core.errors import InvalidInput
from surgeon.core.fallback import toy_data

OPTION = "surgeon.option"  # the metadata key of an option field
Bound = tuple[int, int] | tuple[float, float] | Callable[[Any], tuple[int, int]]
PART = "surgeon.part"  # the metadata key of a nested spec


@dataclass(frozen=True)
class Option:
    """What a field is as an option. `bound`: inclusive (low, high) from limits.py, integers for a count and
    floats for a number, or a function of the spec giving them (its docstring says how); `flags`: its CLI names
    (default --field-name; "--a/--no-a" for a switch); `path`: it
    names a file or folder (never mapped from a request without confining it to a root); `cli`: offered as a
    CLI option of the verbs whose spec holds it; `named`: how a bounds error names it (default: the field)."""

    default: Any = None
    help: str = ""
    bound: Bound | None = None
    unit: str = ""
    flags: tuple[str, ...] = ()
    path: bool = False
    cli: bool = True
    named: str = ""  # how errors name it, when more than its field name: "m (texts per head)"

    def field(self, **changes: Any) -> Any:
        """The dataclass field of this option (`changes`: a field's own help or flags; never its default)."""
        if "default" in changes:
            raise TypeError("an option's default is declared once, in its Option")
        option = dataclasses.replace(self, **changes)
        return dataclasses.field(default=option.default, metadata={OPTION: option})


def option(default: Any = None, **declared: Any) -> Any:
    """A field declared as an option of one spec (see `Option`)."""
    return Option(default, **declared).field()


@dataclass(frozen=True)
class Part:
    """A nested spec whose options are offered flat (the CLI's --model, --data ...). `only`: the subset offered;
    `optional`: the field is None unless one of them is given."""

    spec: type
    only: tuple[str, ...] | None = None
    optional: bool = False


def part(spec: type, only: tuple[str, ...] | None = None, optional: bool = False) -> Any:
    declared = Part(spec, only, optional)
    if optional:
        return dataclasses.field(default=None, metadata={PART: declared})
    return dataclasses.field(default_factory=spec, metadata={PART: declared})


@dataclass(frozen=True)
class Declared:
    """One option of a spec as the shells see it: its field name, its declaration and its resolved type."""

    name: str
    option: Option
    type: Any


def options_of(spec: type, only: tuple[str, ...] | None = None) -> Iterator[Declared]:
    """The option fields of `spec`, nested parts flattened, in declaration order."""
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        if only is not None and f.name not in only:
            continue
        if PART in f.metadata:
            nested: Part = f.metadata[PART]
            yield from options_of(nested.spec, nested.only)
        elif OPTION in f.metadata:
            yield Declared(f.name, f.metadata[OPTION], hints[f.name])


def declared(spec: type, name: str) -> Option:
    """The declaration of `spec`'s option `name` (its help for a shell's own parameter of the same meaning)."""
    return next(f for f in dataclasses.fields(spec) if f.name == name).metadata[OPTION]


def build(spec: type, values: dict[str, Any]) -> Any:
    """`spec` from flat option values (the CLI's parameters): nested parts built from their own fields; an
    optional part stays None when none of its options is given."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if PART in f.metadata:
            nested: Part = f.metadata[PART]
            names = [o.name for o in options_of(nested.spec, nested.only)]
            given = {n: values[n] for n in names if n in values}
            if nested.optional and all(v is None for v in given.values()):
                kwargs[f.name] = None
            else:
                kwargs[f.name] = build(nested.spec, given)
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value or ()) if _is_tuple(f.metadata.get(OPTION), spec, f.name) else value
    return spec(**kwargs)


def _is_tuple(declared: Option | None, spec: type, name: str) -> bool:
    return declared is not None and typing.get_origin(typing.get_type_hints(spec)[name]) is tuple


def check_bounds(spec: Any) -> None:
    """Every bounded option of `spec` (its own fields; nested parts check themselves) within its bound."""
    for f in dataclasses.fields(spec):
        declared: Option | None = f.metadata.get(OPTION)
        if declared is None or declared.bound is None:
            continue
        low, high = bound_of(declared, spec)
        name = declared.named or f.name
        if isinstance(low, int) and isinstance(high, int):
            limits.count(name, getattr(spec, f.name), low, high)
        else:
            limits.number(name, getattr(spec, f.name), low, high)


def bound_of(declared: Option, spec: Any) -> tuple[float, float]:
    """The (low, high) of a bounded option of `spec`."""
    assert declared.bound is not None
    return declared.bound(spec) if callable(declared.bound) else declared.bound


def from_message(spec: type, message: Any, **given: Any) -> Any:
    """`spec` from a gRPC request whose fields carry the options' names: a proto3 `optional` field the client
    left unset, and an empty string, take the spec's default; `given` (paths confined to a root, renamed or
    restricted fields) wins. Path options are never read from the message: the caller confines them."""
    return spec(**message_values(spec, message, given), **given)


def message_values(spec: type, message: Any, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The option values of `spec` a request sets (see `from_message`), except those in `given`."""
    given = given or {}
    present = {f.name for f in message.DESCRIPTOR.fields}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name in given or f.name not in present:
            continue
        declared: Option | None = f.metadata.get(OPTION)
        if declared is None or declared.path or is_path(spec, f.name):
            continue
        descriptor = message.DESCRIPTOR.fields_by_name[f.name]
        if descriptor.has_presence and descriptor.type != descriptor.TYPE_MESSAGE:
            if message.HasField(f.name):
                values[f.name] = getattr(message, f.name)
        elif getattr(message, f.name) not in ("", 0):  # proto3's unset scalars: the spec's default
            values[f.name] = getattr(message, f.name)
        elif isinstance(getattr(message, f.name), bool):
            values[f.name] = getattr(message, f.name)
    return values


def is_path(spec: type, name: str) -> bool:
    """The field names a file or folder (typed Path)."""
    hint = typing.get_type_hints(spec)[name]
    return Path in (hint, *typing.get_args(hint))


def from_table(spec: type, table: Any, **given: Any) -> Any:
    """`spec` from a study file's table (study._Table): each option under its field's name, its type and bound
    checked there (errors name the key); `given` (paths resolved against the study file) wins."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(spec)
    for f in dataclasses.fields(spec):
        declared: Option | None = f.metadata.get(OPTION)
        if f.name not in given and declared is not None:
            kinds = tuple(k for k in (int, float, str, bool) if _accepts(hints[f.name], k))
            values[f.name] = table.get(f.name, kinds, declared.default)
    read = spec(**values, **given)
    for f in dataclasses.fields(spec):
        bounded: Option | None = f.metadata.get(OPTION)
        value = getattr(read, f.name)
        if f.name in values and bounded is not None and bounded.bound is not None and value is not None:
            low, high = bound_of(bounded, read)
            if not low <= value <= high:
                where = table.path(f.name)
                raise InvalidInput(f"{where}: must be in {low:,}..{high:,}, got {value}", field=where)
    return read


def _accepts(hint: Any, kind: type) -> bool:
    allowed = typing.get_args(hint) or (hint,)
    return kind in allowed or (kind is int and float in allowed)


# ---- options several specs share (api's jobs, the study's [rank] table): one declaration, one default ------

IMAGES = Option(help="a folder of images, or 'toy' (the default for the toy model only)", path=True)


def _image_count(spec: Any) -> tuple[int, int]:
    return limits.images(toy_data(spec.images))


_image_count.__doc__ = (
    f"1 .. {limits.MAX_TOY_IMAGES:,} toy images (drawn in memory), 1 .. {limits.MAX_IMAGES:,} of a folder"
)


N_IMAGES = Option(bound=_image_count, unit="images", help="use at most this many images (toy default: 2000)")
TEXTS = Option(help="'toy', 'general' or a file, one description per line", path=True)
SKEW_K = Option(10, bound=(1, limits.MAX_SKEW_K), unit="images", help="k of MaxSkew@k / MinSkew@k")
BIAS_PROTOCOL = Option(
    "surgeon",
    help="surgeon (uniform p*, absent groups as 1/k, mean over queries) or paper (the set's proportions, "
    "absent groups skipped, MaxSkew summed over queries: max_skew@k_sum is the paper's figure)",
)


def choice(what: str, value: str | None, choices: Any) -> None:
    if value not in choices:
        shown = ", ".join(str(c) for c in choices if c is not None)
        raise InvalidInput(f"unknown {what} {limits.echo(value)}", hint=f"choose {shown}")


# ---- typed parts the stage functions take ---------------------------------------------------------------

JUDGE = Option("lexicon", help="lexicon, embedding or llm (prune, sweep: the judge when ranking first)")
LAYERS = Option(None, help="e.g. 8-11, 3,5, last4 (default) or all (prune, sweep: when ranking first)")


@dataclass(frozen=True)
class RankMethod:
    """How heads are ranked (rank.rank_heads): what a ranking records (`identity`), and how it is computed."""

    judge: str = JUDGE.field()
    layers: str | None = LAYERS.field()
    m: int = option(  # the paper's
        5,
        bound=(1, limits.MAX_TEXTS_PER_HEAD),
        unit="texts",
        flags=("--texts-per-head", "--m"),
        help="texts per head (m)",
        named="m (texts per head)",
    )
    span_rank: int = option(  # TextSpan's reference code's (clamped per head to its numerical rank)
        80,
        bound=(1, limits.MAX_SPAN_RANK),
        flags=("--span-rank", "--rank"),
        help="TextSpan projection rank",
    )
    batch_size: int = option(64, bound=(1, limits.MAX_BATCH_SIZE), unit="images", help="images per forward pass")
    use_cache: bool = option(
        True,
        flags=("--cache/--no-cache",),
        help="--no-cache: recompute statistics and text embeddings even when cached",
    )
    checkpoint_every: int | None = option(
        bound=(1, limits.MAX_CHECKPOINT_EVERY),
        unit="batches",
        help="checkpoint statistics every N batches (resumable after interruption)",
    )

    def check(self) -> None:
        check_bounds(self)
        limits.layer_spec(self.layers)

    def identity(self) -> dict[str, Any]:
        """What decides the ranking (a study's cell key)."""
        return {k: getattr(self, k) for k in ("judge", "layers", "m", "span_rank")}


@dataclass(frozen=True)
class LlmJudge:
    """The llm judge's endpoint (rank --judge llm): the judges.base.JudgeContext fields of the same names."""

    llm_url: str | None = option(help="OpenAI-compatible endpoint for --judge llm")
    llm_models: tuple[str, ...] = option((), flags=("--llm-model",), help="judge model(s); several = majority vote")
    llm_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")


@dataclass(frozen=True)
class OnnxExport:
    """How the ONNX graphs of an export are made and checked (prune --export onnx, surgeon export)."""

    labels: Path | None = option(help="class names for classifier.onnx (ONNX export)")
    atol: float = option(1e-4, bound=(0.0, limits.MAX_ATOL), help="ONNX parity tolerance (max abs difference)")
    onnx_exporter: str | None = option(
        help="dynamo (torch.export; default, or $SURGEON_ONNX_EXPORTER) or torchscript (deprecated by torch); "
        "both parity-checked"
    )

    def check(self) -> None:
        """Its bounds (api's specs also check the exporter's name and read the labels before any work)."""
        check_bounds(self)

    def as_arguments(self) -> dict[str, Any]:
        """The keyword arguments of export.export_run and export_existing_run."""
        return {"labels": self.labels, "atol": self.atol, "exporter": self.onnx_exporter}


def cli_flags(name: str, declared: Option, kind: Any) -> tuple[str, ...]:
    """The CLI names of an option: its flags, else typer's (--name; --name/--no-name for a switch)."""
    flag = name.replace("_", "-")
    return declared.flags or ((f"--{flag}/--no-{flag}",) if kind is bool else (f"--{flag}",))


def markdown(specs: dict[str, type]) -> str:
    """docs/options.md: every option of every job's spec, with its CLI flags, default, bound and unit."""
    lines = [
        "# Options",
        "",
        "Generated from the specs' fields (surgeon/api.py, surgeon/core/options.py) by `python -m surgeon.api`;",
        "do not edit by hand. The same fields give the CLI options, the gRPC request fields of the same names,",
        "the study file's keys and the bounds every shell checks.",
    ]
    for job, spec in specs.items():
        lines += ["", f"## {job}", "", "| option | CLI | default | bound | unit | help |", "|---|---|---|---|---|---|"]
        for o in options_of(spec):
            flags = (
                ", ".join(f"`{f}`" for f in cli_flags(o.name, o.option, o.type)) if o.option.cli else "(not on the CLI)"
            )
            bound = _shown_bound(o.option.bound)
            default = "" if o.option.default is None else f"`{o.option.default!r}`"
            help_text = o.option.help.replace("|", "\\|")
            lines.append(f"| `{o.name}` | {flags} | {default} | {bound} | {o.option.unit} | {help_text} |")
    return "\n".join(lines) + "\n"


def _shown_bound(bound: Bound | None) -> str:
    if bound is None:
        return ""
    return (bound.__doc__ or "") if callable(bound) else f"{bound[0]:,} .. {bound[1]:,}"


DOCS = Path(__file__).resolve().parents[2] / "docs" / "options.md"  # written by `python -m surgeon.api`
