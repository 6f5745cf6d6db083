"""The records a run hands on: the pruning plan (plan.json) and a validation's headline figures (the
"summary" of validation.json, sweeps and studies). Each has one (de)serialisation, so readers use fields
instead of parsing keys such as `max_skew@10_sum`; the JSON on disk is what it always was."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from surgeon import __version__
from surgeon.errors import CorruptInput, PreconditionFailed

PLAN_SCHEMA = "surgeon.plan/1"


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
    surgeon_version: str = __version__

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
        data: dict[str, Any] = {"schema": PLAN_SCHEMA}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "heads":
                value = [dataclasses.asdict(h) for h in value]
            if f.name in ("selected_on", "seed_mean") and value is None or f.name == "seeds" and not value:
                continue  # absent unless the run had them
            data[f.name] = value
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
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in names}
            values["heads"] = tuple(PlannedHead(**h) for h in data["heads"])
            plan = cls(**values)
        except (KeyError, TypeError) as err:
            raise CorruptInput(f"corrupt {source}: {err}") from None
        wrong = [name for name, kinds in _PLAN_TYPES.items() if not isinstance(getattr(plan, name), kinds)]
        wrong += ["heads"] * any(
            not (isinstance(h.head, str) and type(h.layer) is type(h.index) is int) for h in plan.heads
        )
        if wrong or not isinstance(plan.base_model.get("name"), str):
            raise CorruptInput(f"corrupt {source}: wrong type for {', '.join(wrong) or 'base_model.name'}")
        return plan


#: what Plan.from_dict checks before anyone reads a field (a plan.json comes from a folder a user hands over)
_PLAN_TYPES: dict[str, type | tuple[type, ...]] = {
    "base_model": dict,
    "ranking_sha256": (str, type(None)),
    "policy": str,
    "options": dict,
    "mode": str,
    "tower": str,
    "seed": int,
    "policy_details": dict,
    "record": dict,
    "validated_on": str,
    "selected_on": (str, type(None)),
    "seeds": list,
    "seed_mean": (dict, type(None)),
    "surgeon_version": str,
}


@dataclass(frozen=True)
class ValidationSummary:
    """The headline figures of one validation: mean zero-shot top-1 over the tasks and, with a bias set,
    MaxSkew@k (mean over queries; summed too where the protocol headlines the sum, the paper's figure) and
    NDKL."""

    mean_acc1: float | None
    skew_k: int | None = None
    max_skew: float | None = None
    max_skew_sum: float | None = None
    ndkl: float | None = None

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
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationSummary:
        skew = [k for k in data if k.startswith("max_skew@") and not k.endswith(("_sum", "_per_query"))]
        if len(skew) > 1:
            raise CorruptInput(f"a validation summary holds one MaxSkew@k, not {skew}")
        if not skew:
            return cls(mean_acc1=data.get("mean_acc1"))
        k = skew[0].split("@", 1)[1]
        if not k.isdigit():
            raise CorruptInput(f"not a MaxSkew@k key: {skew[0]!r}")
        return cls(
            mean_acc1=data.get("mean_acc1"),
            skew_k=int(k),
            max_skew=data[skew[0]],
            max_skew_sum=data.get(f"{skew[0]}_sum"),
            ndkl=data.get("ndkl"),
        )
