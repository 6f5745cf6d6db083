"""The prune pipeline: rank (or reuse a ranking) -> select -> surgery -> validate -> write a run folder.
The library function behind `surgeon prune` and the Prune RPC."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from surgeon.core.errors import InvalidInput, PreconditionFailed
from surgeon.core.options import OnnxExport
from surgeon.core.paths import atomic_dir
from surgeon.core.progress import progress_bar
from surgeon.inputs.clipbench import CLIP_BENCHMARK_DIR, pruned_tag, write_results
from surgeon.inputs.images import ImageSet
from surgeon.model.decompose import head_means
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import vision_tower
from surgeon.model.load import LoadedModel, weights_hash
from surgeon.model.surgery import SurgeryRequest, apply_surgery
from surgeon.ranking.rank import Ranking
from surgeon.results.records import Plan, PlannedHead
from surgeon.results.runfolder import heads_table, validation_note
from surgeon.selection.debias import NULL_SETS, against_chance, chance_lines, search_data
from surgeon.selection.policies import (
    POLICIES,
    DebiasData,
    Policy,
    PolicyOptions,
    Selection,
    debias_bound,
    policy_names,
)
from surgeon.validation.datarecord import DATA_RECORD
from surgeon.validation.validate import Evaluator, Gates, SearchSplits, ValidationSuite, markdown_report, validate


@dataclass
class PruneResult:
    run_dir: Path | None
    plan: Plan
    before: dict
    after: dict
    gate_failures: list[str]
    exported: bool
    seeds: list[dict] = field(default_factory=list)
    against_chance: dict | None = None  # debias: its held-out result next to random head sets of its size


def policy_options(loaded: LoadedModel, preset: tuple[str | None, str | None] | None = None, **choice) -> PolicyOptions:
    """The options a policy selects with on `loaded`: the caller's `choice` (k, seed, heads...) and whose paper
    head lists the preset policies read: `preset`'s (MODEL, TAG) when given (a checkpoint file's weights), else
    the model's own name and tag (recorded in plan.json's options and each head's reason)."""
    name, tag = preset if preset is not None else (loaded.name, loaded.pretrained)
    return PolicyOptions(model_name=name or "", pretrained=tag, **choice)


def select_heads(
    ranking: Ranking | None, policy: Policy, options: PolicyOptions, measure: DebiasData | None = None
) -> Selection:
    """`measure`: the search and stop splits a measuring policy selects on (never the report split)."""
    return policy.select(ranking, replace(options, measure=measure) if policy.measures else options)


def prune(
    loaded: LoadedModel,
    ranking: Ranking | None,
    suite: ValidationSuite,
    policy: str,
    options: PolicyOptions,
    mode: str = "zero",
    tower: str = "vision",
    gates: Gates | None = None,
    out_dir: Path | None = None,
    reference: ImageSet | None = None,
    seeds: int = 1,
    export_anyway: bool = False,
    force: bool = False,
    exporters: list[str] | None = None,
    onnx: OnnxExport = OnnxExport(),
    search_images: int = 500,
    language: str = "en",
    quiet: bool = True,
    data_record: dict | None = None,
) -> PruneResult:
    """Prune `loaded.model` in place. Writes `out_dir` (atomically) unless it is None. The debias policy
    selects by measuring, so the suite is split three ways (`ValidationSuite.split_for_search`, seeded by
    `options.seed`): it searches on one (at most `search_images` images per task), decides when to stop on
    another, and the before/after validation, the gates, every reported figure and the comparison with random
    head sets of the same size (`against_chance`) come from the third, which selection never touches. Other
    policies validate on the whole suite. `ranking` may be None for the policies that do not read one
    (the paper's presets, an explicit list of heads). `language` is recorded in the clip_benchmark result files;
    `data_record` (surgeon.validation.datarecord) in validation_data.json, for measuring the run's exports again."""
    from surgeon.exporting.export import export_run

    if loaded.pruned_layout.get("heads_kept"):
        raise PreconditionFailed(
            "this model is already hard-pruned: its layout would have to be merged with a second pruning",
            hint="prune the original checkpoint once, with every head to remove (e.g. --policy heads)",
        )
    chosen = POLICIES.get(policy)
    chosen.check_ranking(ranking)
    if ranking is not None:
        ranking.check_model(loaded)
    if seeds < 1:
        raise InvalidInput("--seeds must be at least 1")
    if chosen.measures or seeds > 1:
        suite.require_accuracy(policy if chosen.measures else "--seeds")
    if seeds > 1 and not chosen.seeded:
        drawn = ", ".join(policy_names(lambda p: p.seeded))
        raise InvalidInput(f"--seeds repeats a random policy ({drawn}); {policy} is deterministic")
    check_operation(mode, tower, reference)
    gates = gates or Gates()
    splits: SearchSplits | None = None
    if chosen.measures:
        splits = suite.split_for_search(seed=options.seed)
        suite = splits.report  # every figure below, the gates' too, comes from the split selection never saw
    gates.check_measurable(suite)
    first_layer = cached_from(chosen, ranking)
    if splits is not None:
        assert ranking is not None and first_layer is not None  # a measuring policy reads the ranking: checked
        budget = options.k if options.k is not None else min(4, len(ranking.heads))
        bound = debias_bound(len(ranking.heads), budget, options.candidates)
        with progress_bar(f"{policy} search (at most {bound} head sets)", bound, quiet) as advance:
            selection = select_heads(
                ranking, chosen, options, search_data(loaded, splits, first_layer, search_images, advance)
            )
    else:
        selection = select_heads(ranking, chosen, options)
    if first_layer is None:
        first_layer = min(h.layer for h in selection.heads)
    evaluator = Evaluator(loaded, suite, first_layer, cache=seeds > 1 or splits is not None, deep=splits is not None)
    base_model = ranking.model if ranking is not None else loaded.record()
    before = evaluator.evaluate([], bar="validation before", quiet=quiet)
    chance = None
    if splits is not None:
        assert ranking is not None  # checked above
        pool = [HeadRef(h.layer, h.head) for h in ranking.sorted_heads()]
        n_sets = min(NULL_SETS, math.comb(len(pool), len(selection.heads)) - 1)
        with progress_bar(f"random {len(selection.heads)}-head sets on the report split", n_sets, quiet) as advance:
            chance = against_chance(evaluator, selection.heads, pool, NULL_SETS, options.seed, advance)
    seed_runs = []
    if seeds > 1:  # the paper's control: average the random policy over seeds (zero ablation, measured)
        for offset in range(seeds):
            seeded = replace(options, seed=options.seed + offset)
            heads = select_heads(ranking, chosen, seeded).heads
            summary = evaluator.evaluate(heads)["summary"]
            seed_runs.append({"seed": seeded.seed, "heads": [h.name for h in heads], **summary})
    record = operate(loaded, selection.heads, mode, tower, reference)
    after = validate(loaded, suite, bar="validation after", quiet=quiet)
    before.update(model=loaded.identity)
    failures = gates.check(before, after)
    by_name = {h.name: h for h in ranking.heads} if ranking is not None else {}
    plan = Plan(
        base_model=base_model,
        ranking_sha256=ranking.digest() if ranking is not None else None,
        policy=policy,
        options={  # not asdict: it would deep-copy `evaluate`, i.e. the whole evaluator and its model
            f.name: getattr(options, f.name)
            for f in fields(options)
            if f.name != "measure" and getattr(options, f.name) is not None
        },
        mode=mode,
        tower=tower,
        seed=options.seed,
        heads=tuple(
            PlannedHead(
                head=h.name,
                layer=h.layer,
                index=h.head,
                reason=selection.reasons.get(h.name, ""),
                label=by_name[h.name].label if h.name in by_name else None,
                ccs=by_name[h.name].ccs if h.name in by_name else None,
            )
            for h in selection.heads
        ),
        policy_details=selection.details,
        record=record,
        validated_on=suite.description,
        selected_on=f"{splits.search.description}; stopped on {splits.stop.description}" if splits else None,
        seeds=seed_runs,
        seed_mean={k: statistics.fmean(r[k] for r in seed_runs) for k in after["summary"]} if seed_runs else None,
    )
    validation = {"before": before, "after": after, "gate_failures": failures}
    if chance is not None:
        validation["against_chance"] = chance
    exported = not failures or export_anyway
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            (tmp / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2), encoding="utf-8")
            (tmp / "validation.json").write_text(json.dumps(validation, indent=2), encoding="utf-8")
            (tmp / "report.md").write_text(_report(plan, before, after, failures, chance), encoding="utf-8")
            if data_record is not None:
                (tmp / DATA_RECORD).write_text(json.dumps(data_record, indent=2), encoding="utf-8")
            if ranking is not None:
                (tmp / "ranking.json").write_text(json.dumps(ranking.to_dict(), indent=2), encoding="utf-8")
            # clip_benchmark's result files, before and after (told apart by the pretrained tag)
            benchmark, original = tmp / CLIP_BENCHMARK_DIR, loaded.pretrained or ""
            write_results(before, benchmark, language, loaded.name, original)
            write_results(after, benchmark, language, loaded.name, pruned_tag(original, policy, len(selection.heads)))
            if exported:
                export_run(
                    loaded,
                    plan,
                    {k: v for k, v in validation.items() if k != "gate_failures"},
                    tmp,
                    exporters or ["safetensors"],
                    **onnx.as_arguments(),
                )
    return PruneResult(out_dir, plan, before, after, failures, exported and out_dir is not None, seed_runs, chance)


def cached_from(policy: Policy, ranking: Ranking | None) -> int | None:
    """The first layer an Evaluator may cache the residual stream up to for this policy's head sets: the
    ranking's first layer; 0 for presets (they may name any layer, and paper-random draws anew per seed);
    None when only the selection can tell (no ranking)."""
    if policy.preset:
        return 0
    return min(ranking.layers) if ranking is not None else None


def check_operation(mode: str, tower: str, reference: ImageSet | None) -> None:
    if mode == "mean" and reference is None:
        raise InvalidInput("mean ablation needs reference images")
    if mode == "mean" and tower != "vision":
        raise InvalidInput("mean ablation is defined for the vision tower only")


def operate(
    loaded: LoadedModel, heads: list[HeadRef], mode: str, tower: str = "vision", reference: ImageSet | None = None
) -> dict:
    """Surgery on `loaded.model` in place (mean ablation: each head's mean over `reference`), its weights hash
    made anew; the surgery record (surgery.json's content)."""
    check_operation(mode, tower, reference)
    means = mean_ablation(loaded, reference) if mode == "mean" and reference is not None else None
    record = apply_surgery(loaded.model, SurgeryRequest(heads, mode, tower, means))
    loaded.weights_hash = weights_hash(loaded.model)
    return record


def mean_ablation(loaded: LoadedModel, reference: ImageSet):
    """The `reference_means` of a mean ablation: each head's mean CLS output over the reference images."""

    def means(blocks, heads):
        return head_means(
            vision_tower(loaded.model), (b.to(loaded.device) for b in reference.batches(loaded.preprocess, 256)), heads
        )

    return means


def _report(plan: Plan, before: dict, after: dict, failures: list[str], chance: dict | None = None) -> str:
    lines = [
        f"# surgeon prune — {plan.base_model['name']}",
        "",
        f"Policy `{plan.policy}`, mode `{plan.mode}`, tower `{plan.tower}`, {len(plan.heads)} head(s) pruned.",
        "",
        *heads_table(plan),
    ]
    if "stopped" in plan.policy_details:
        lines += ["", f"Search: {plan.policy_details['stopped']}."]
    lines += ["", "## Validation", "", validation_note(plan), "", markdown_report(before, after, failures)]
    if chance is not None:
        lines += ["## Against chance", "", *chance_lines(chance), ""]
    return "\n".join(lines)
