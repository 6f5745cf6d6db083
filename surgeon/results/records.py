"""The records a run hands on: the pruning plan (plan.json) and a validation's headline figures (the
"summary" of validation.json, sweeps and studies). Each has one (de)serialisation, so readers use fields
instead of parsing keys such as `max_skew@10_sum`. Records read from files a user hands over are checked field
by field (`wrong_fields`) before anyone reads them: a bad file is one CorruptInput, never a traceback later."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from surgeon import __version__
from surgeon.core.errors import CorruptInput, PreconditionFailed

PLAN_SCHEMA = "surgeon.plan/1"


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON-decoded value fits a field's annotation (the shapes records use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON has no separate float; bool is not a number here
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, origin) and (not items or all(_matches(v, items[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and not wrong_fields(value)
    return isinstance(value, hint)


def wrong_fields(record: Any) -> list[str]:
    """The fields of a dataclass record whose values do not fit their annotations."""
    hints = typing.get_type_hints(type(record))
    return [f.name for f in dataclasses.fields(record) if not _matches(getattr(record, f.name), hints[f.name])]


@dataclass(frozen=True)
class PlannedHead:
    """One pruned head, with why it was chosen and what the ranking said about it (None without a ranking)."""

    head: str  # L{layer}.H{index}
    layer: int
    index: int
    reason: str = ""
    label: str | None = None
    ccs: int | None = None


@dataclass(frozen=True)
class Plan:
    """What was pruned from which model, how, and on which data it was selected and validated."""

    base_model: dict[str, Any]  # LoadedModel.record() of the unpruned model
    ranking_sha256: str | None
    policy: str
    options: dict[str, Any]
    mode: str
    tower: str
    seed: int
    heads: tuple[PlannedHead, ...]
    policy_details: dict[str, Any]
    record: dict[str, Any]  # what the surgery did (heads_kept for a hard pruning)
    validated_on: str = "the validation suite"
    selected_on: str | None = None  # the disjoint search split of a selection by measurement (debias)
    seeds: list[dict[str, Any]] = field(default_factory=list)  # per-seed summaries of a seeded random policy
    seed_mean: dict[str, float] | None = None
    surgeon_version: str = __version__  # a new plan's; a plan read from a file must say which made it

    @property
    def base_identity(self) -> str:
        """name/pretrained of the base model, as `load_model` takes it."""
        pretrained = self.base_model.get("pretrained")
        return self.base_model["name"] + (f"/{pretrained}" if pretrained else "")

    @property
    def hard(self) -> bool:
        return bool(self.record.get("heads_kept"))

    def heads_per_layer(self) -> dict[str, list[int]]:
        layers: dict[str, list[int]] = {}
        for h in self.heads:
            layers.setdefault(str(h.layer), []).append(h.index)
        return layers

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": PLAN_SCHEMA, "surgeon_version": self.surgeon_version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "heads":
                value = [dataclasses.asdict(h) for h in value]
            if (f.name in ("selected_on", "seed_mean") and value is None) or (f.name == "seeds" and not value):
                continue  # absent unless the run had them
            data.setdefault(f.name, value)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise CorruptInput(f"corrupt {source}: a JSON object was expected, not {type(data).__name__}")
        if data.get("schema") != PLAN_SCHEMA:
            raise PreconditionFailed(
                f"{source} was written by another surgeon version (plan schema "
                f"{data.get('schema')!r}, this version reads {PLAN_SCHEMA})"
            )
        if "surgeon_version" not in data:
            raise CorruptInput(f"corrupt {source}: it does not say which surgeon version wrote it")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in names}
            values["heads"] = tuple(PlannedHead(**h) for h in data["heads"])
            plan = cls(**values)
        except (KeyError, TypeError) as err:
            raise CorruptInput(f"corrupt {source}: {err}") from None
        wrong = wrong_fields(plan)
        base = plan.base_model
        if not wrong and not all(isinstance(base.get(k), str) for k in ("name", "weights_sha256")):
            wrong = ["base_model (name and weights_sha256 must be strings)"]
        if wrong:
            raise CorruptInput(f"corrupt {source}: wrong type for {', '.join(wrong)}")
        return plan


def bias_floor(report: dict) -> dict[str, Any]:
    """The `chance` record of a validation report's bias set (results.bias.chance_skews): what a ranking that
    ignores the images scores, keyed like its figures; empty without a bias set or in reports written before it."""
    return next((r["metrics"].get("chance", {}) for r in report.get("results", []) if r["task"] == "bias"), {})


@dataclass(frozen=True)
class ValidationSummary:
    """The headline figures of one validation: mean zero-shot top-1 over the tasks and, with a bias set,
    MaxSkew@k (mean over queries; summed too where the protocol headlines the sum, the paper's figure) and
    NDKL; with retrieval sets, the mean over them of text -> image (or video) recall@1."""

    mean_acc1: float | None
    skew_k: int | None = None
    max_skew: float | None = None
    max_skew_sum: float | None = None
    ndkl: float | None = None
    mean_recall1: float | None = None

    @property
    def skew_key(self) -> str | None:
        return None if self.skew_k is None else f"max_skew@{self.skew_k}"

    def headline_skew(self) -> tuple[str, float] | None:
        """(key, value) of the bias figure a table shows: the sum where measured, else the mean."""
        if self.skew_key is None or self.max_skew is None:
            return None
        if self.max_skew_sum is not None:
            return f"{self.skew_key}_sum", self.max_skew_sum
        return self.skew_key, self.max_skew

    def to_dict(self) -> dict[str, float | None]:
        data: dict[str, float | None] = {"mean_acc1": self.mean_acc1}
        if self.skew_key is not None:
            data[self.skew_key] = self.max_skew
            if self.max_skew_sum is not None:
                data[f"{self.skew_key}_sum"] = self.max_skew_sum
            data["ndkl"] = self.ndkl
        if self.mean_recall1 is not None:
            data["mean_recall1"] = self.mean_recall1
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationSummary:
        skew = [k for k in data if k.startswith("max_skew@") and not k.endswith(("_sum", "_per_query"))]
        if len(skew) > 1:
            raise CorruptInput(f"a validation summary holds one MaxSkew@k, not {skew}")
        k = skew[0].split("@", 1)[1] if skew else None
        if k is not None and not k.isdigit():
            raise CorruptInput(f"not a MaxSkew@k key: {skew[0]!r}")
        summary = cls(
            mean_acc1=data.get("mean_acc1"),
            skew_k=None if k is None else int(k),
            max_skew=data[skew[0]] if skew else None,
            max_skew_sum=data.get(f"{skew[0]}_sum") if skew else None,
            ndkl=data.get("ndkl") if skew else None,
            mean_recall1=data.get("mean_recall1"),
        )
        wrong = wrong_fields(summary)
        if wrong:
            raise CorruptInput(f"a validation summary's {', '.join(wrong)} is not a number")
        return summary


def check_validation_report(data: dict[str, Any], source: str) -> None:
    """validation.json's before/after reports, checked for what the card and the report tables read: each
    result names its set and task, a zero-shot task has its three accuracies, a bias set its figures, and
    after measured the same sets as before."""
    from surgeon.results.bias import PROTOCOLS

    sets = {}
    for side in ("before", "after"):
        report = data.get(side)
        if not (
            isinstance(report, dict)
            and isinstance(report.get("summary"), dict)
            and isinstance(report.get("results"), list)
            and all(_is_result(r, PROTOCOLS) for r in report["results"])
        ):
            raise CorruptInput(f"corrupt {source}: '{side}' is not a validation report")
        ValidationSummary.from_dict(report["summary"])
        sets[side] = {(r["dataset"], r["task"]) for r in report["results"]}
    if sets["before"] != sets["after"]:
        raise CorruptInput(f"corrupt {source}: before and after measured different sets")
    if "against_chance" in data and not _is_chance(data["against_chance"]):
        raise CorruptInput(f"corrupt {source}: 'against_chance' is not a comparison with random head sets")


#: what the card reads of a debias run's comparison with random head sets (surgeon.selection.debias.against_chance)
_CHANCE_FIELDS: dict[str, Any] = {
    "metric": str,
    "measured_on": str,
    "size": int,
    "sets": int,
    "exhaustive": bool,
    "base": float,
    "base_ci95": list[float],
    "policy": float,
    "policy_ci95": list[float],
    "change": float | None,
    "change_ci95": list[float] | None,
    "percentile": float,
    "p_value": float,
}
_CHANCE_RANDOM: dict[str, Any] = {"mean": float, "sd": float, "min": float, "max": float, "mean_change": float | None}


def _is_chance(entry: Any) -> bool:
    def fits(value: Any, fields: dict[str, Any]) -> bool:
        return isinstance(value, dict) and all(_matches(value.get(k), hint) for k, hint in fields.items())

    return fits(entry, _CHANCE_FIELDS) and fits(entry.get("random"), _CHANCE_RANDOM)


def _is_result(entry: Any, protocols: dict) -> bool:
    from surgeon.results.retrieval import TASKS as RETRIEVAL_TASKS

    if not (
        isinstance(entry, dict) and isinstance(entry.get("dataset"), str) and isinstance(entry.get("metrics"), dict)
    ):
        return False
    metrics = entry["metrics"]
    if entry.get("task") == "zeroshot_classification":
        return all(_matches(metrics.get(k), float) for k in ("acc1", "acc5", "mean_per_class_recall"))
    if entry.get("task") in RETRIEVAL_TASKS:
        figures = [v for k, v in metrics.items() if "_recall@" in k or k.endswith("_rank")]
        return bool(figures) and all(_matches(v, float) for v in figures)
    if entry.get("task") == "bias":
        figures = [
            v for k, v in metrics.items() if k.startswith(("max_skew@", "min_skew@", "ndkl")) and "_per_" not in k
        ]
        return metrics.get("protocol", "surgeon") in protocols and all(_matches(v, float) for v in figures)
    return False
