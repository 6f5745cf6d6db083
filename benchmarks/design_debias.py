"""Design measurements for the debias search (issue 24), on toy probes no run searches, stops or reports on.

    python benchmarks/design_debias.py measure --seeds 10-19 --out /tmp/design   # similarities (slow part)
    python benchmarks/design_debias.py analyse --out /tmp/design                 # tables for NOTES.md
    python benchmarks/design_debias.py measure --seeds 0,7,8,9 --pairs '' --out /tmp/report
    python benchmarks/design_debias.py ceiling --out /tmp/report                 # after the fact: no selection
    python benchmarks/design_debias.py judge --seeds 200-215 --heads L0.H7,L1.H7  # the policy's sets, fresh probes
    python benchmarks/design_debias.py rotate --per-split 6 --rotations 0-4      # the policy on design probes

`measure` writes, per probe seed, the (queries x images) similarity of the bundled toy model's bias probe
(600 scenes) with nothing removed, every head removed alone, and every pair of the `--pairs` heads removed.
`analyse` compares objectives (how stable a head's effect is from probe to probe, how well it predicts
MaxSkew@10 on another probe) and selection rules, each judged by the held-out MaxSkew@10 change it gets on
probes it did not select on. The standard suite reports on probes 0, 7, 8, 9 (validate.REPORT_PROBES); searches
read 20 and up. `ceiling` reads measured report probes after the policy has run: how much each head removed
alone lowers the reported figure there (the mean over the probes), the most any one-head selection could get."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from surgeon.core.errors import InvalidInput
from surgeon.model.heads import HeadRef
from surgeon.model.load import load_model
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.results.bias import bias_metrics, resampled_skews, unit_weights
from surgeon.selection.debias import against_chance, bias_measure, chance_line
from surgeon.selection.policies import POLICIES, DebiasData, PolicyOptions
from surgeon.validation.validate import Evaluator, ValidationSuite, toy_probe, toy_probes, toy_suite, toy_tasks

HEADS = [HeadRef(layer, head) for layer in range(4) for head in range(8)]
BY_NAME = {h.name: h for h in HEADS}
#: the heads whose pairs are measured: those lowering NDKL most, alone, on average over probes 10-15
PAIRS = ["L0.H7", "L1.H7", "L2.H7", "L2.H0", "L0.H2", "L3.H1"]


def seeds_of(text: str) -> list[int]:
    """'10-19' or '0,7,8,9'."""
    if "," in text:
        return [int(x) for x in text.split(",")]
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def measure(seeds: list[int], out: Path, pair_heads: list[str]) -> None:
    loaded = load_model(None)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(BY_NAME[a], BY_NAME[b]) for a, b in itertools.combinations([h for h in pair_heads if h], 2)]
    for seed in seeds:
        probe = toy_probe(None, seed)
        evaluator = Evaluator(loaded, ValidationSuite([], probe, "toy", f"probe {seed}"), 0, deep=True)
        sets: list[tuple[HeadRef, ...]] = [(), *((h,) for h in HEADS), *pairs]
        sims = np.stack([evaluator.bias_similarity(list(s)) for s in sets]).astype(np.float32)
        names = np.asarray(["+".join(h.name for h in s) or "none" for s in sets])
        assert probe.units is not None  # a toy probe's scenes are its units
        np.savez(out / f"probe{seed}.npz", sims=sims, names=names, groups=probe.groups, units=probe.units)
        print(f"probe {seed}: {len(sets)} head sets", flush=True)


def objectives(sim: np.ndarray, groups: np.ndarray, units: np.ndarray) -> dict[str, float]:
    metrics = bias_metrics(sim, groups, 2, 10)
    values = {f"max_skew@{k}": bias_metrics(sim, groups, 2, k)[f"max_skew@{k}"] for k in (10, 25, 50, 100)}
    values["ndkl"] = metrics["ndkl"]
    return values


def analyse(out: Path) -> None:
    files = sorted(out.glob("probe*.npz"), key=lambda p: int(p.stem[5:]))
    data = [np.load(f) for f in files]
    seeds = [int(f.stem[5:]) for f in files]
    names = list(data[0]["names"])
    table = {}  # seed -> set name -> objective -> value
    for seed, d in zip(seeds, data, strict=True):
        table[seed] = {n: objectives(s, d["groups"], d["units"]) for n, s in zip(names, d["sims"], strict=True)}
    keys = list(table[seeds[0]]["none"])

    def effect(seed: int, name: str, key: str) -> float:
        return table[seed][name][key] / table[seed]["none"][key] - 1

    singles = [h.name for h in HEADS]
    print(f"probes {seeds}")
    print("objective | reliability | validity vs MaxSkew@10 | S/N")
    for key in keys:
        e = np.array([[effect(s, n, key) for n in singles] for s in seeds])
        m = np.array([[effect(s, n, "max_skew@10") for n in singles] for s in seeds])
        rel = np.mean([np.corrcoef(e[i], e[j])[0, 1] for i, j in itertools.combinations(range(len(seeds)), 2)])
        val = np.mean([np.corrcoef(e[i], m[j])[0, 1] for i in range(len(seeds)) for j in range(len(seeds)) if i != j])
        sn = e.mean(0).std() / e.std(0).mean()
        print(f"{key} | {rel:.2f} | {val:.2f} | {sn:.1f}")
    print("\nset | mean held-out MaxSkew@10 change | sd | min | max | mean NDKL change")
    rows = []
    for name in names[1:]:
        changes = [effect(s, name, "max_skew@10") for s in seeds]
        rows.append((np.mean(changes), name, np.std(changes, ddof=1), min(changes), max(changes)))
    for mean, name, sd, low, high in sorted(rows)[:15]:
        ndkl = np.mean([effect(s, name, "ndkl") for s in seeds])
        print(f"{name} | {mean:+.1%} | {sd:.1%} | {low:+.1%} | {high:+.1%} | {ndkl:+.1%}")
    print("\nper probe: MaxSkew@10 change of L0.H7 and L1.H7, and how many of the other 31 single heads each beats")
    for seed in seeds:
        alone = {n: effect(seed, n, "max_skew@10") for n in singles}
        line = [
            f"{n} {alone[n]:+.1%} (beats {sum(v > alone[n] for k, v in alone.items() if k != n)})"
            for n in ("L0.H7", "L1.H7")
        ]
        print(f"probe {seed}: " + "; ".join(line))
    print("\nreport-probe-like noise: MaxSkew@10 of the unpruned model across probes")
    base = [table[s]["none"]["max_skew@10"] for s in seeds]
    print(f"mean {np.mean(base):.3f} sd {np.std(base, ddof=1):.3f} range {min(base):.3f}-{max(base):.3f}")
    for seed, d in zip(seeds[:3], data[:3], strict=True):
        w = unit_weights(d["units"], len(d["groups"]), 500, 0)
        draws = resampled_skews(d["sims"][0], d["groups"], 2, w, 10, with_ndkl=False)["max"].mean(1)
        print(f"probe {seed}: bootstrap sd of MaxSkew@10 {draws.std():.3f} (value {base[seeds.index(seed)]:.3f})")


def search(
    data: list, search_probes: list[int], stop_probes: list[int], objective: str, resamples: int = 50
) -> list[str]:
    """The debias policy's rule (surgeon.selection.policies.debias), two steps at most (pairs are measured among PAIRS
    only), with `objective` averaged over the probes (each probe ranked apart, like the report probe):
    candidates lower it alone by more than its bootstrap SE; a step takes the candidate best in most
    resamples and keeps it if the stop probes' objective falls by more than that gain's SE."""
    names = list(data[0]["names"])
    kind, _, k = objective.partition("@")

    def scorer(probes: list[int], seed: int):
        weights = {p: unit_weights(data[p]["units"], len(data[p]["groups"]), resamples, seed + p) for p in probes}
        cache: dict[str, tuple[float, np.ndarray]] = {}

        def score(name: str) -> tuple[float, np.ndarray]:
            if name not in cache:
                points, draws = [], []
                for p in probes:
                    sim, groups = data[p]["sims"][names.index(name)], data[p]["groups"]
                    points.append(bias_metrics(sim, groups, 2, int(k or 10))[objective])
                    got = resampled_skews(sim, groups, 2, weights[p], int(k or 10), with_ndkl=kind == "ndkl")
                    draws.append(got["ndkl" if kind == "ndkl" else "max"].mean(1))
                cache[name] = (float(np.mean(points)), np.mean(draws, axis=0))
            return cache[name]

        return score

    find, check = scorer(search_probes, 0), scorer(stop_probes, 100)
    base = find("none")
    effects = {h.name: (find(h.name)[0] - base[0], np.std(find(h.name)[1] - base[1], ddof=1)) for h in HEADS}
    pool = sorted((h for h, (gain, se) in effects.items() if gain < -se), key=lambda h: effects[h][0])[:8]
    chosen: list[str] = []
    current, current_stop = base, check("none")
    while pool and len(chosen) < 2:
        sets = {h: "+".join(sorted([*chosen, h], key=lambda n: HEADS.index(HeadRef.parse(n)))) for h in pool}
        sets = {h: n for h, n in sets.items() if n in names}
        if not sets:
            break
        stacked = np.stack([find(n)[1] for n in sets.values()])
        wins = np.bincount(stacked.argmin(0), minlength=len(sets))
        best = min(sets, key=lambda h: (-wins[list(sets).index(h)], find(sets[h])[0]))
        if find(sets[best])[0] >= current[0]:
            break
        new_stop = check(sets[best])
        if current_stop[0] - new_stop[0] <= np.std(current_stop[1] - new_stop[1], ddof=1):
            break
        chosen.append(best)
        pool.remove(best)
        current, current_stop = find(sets[best]), new_stop
    return chosen


def simulate(out: Path, objectives: list[str], sizes: list[int]) -> None:
    """Held-out MaxSkew@10 change of what the search picks, by objective and by the number of probes searched
    and stopped on; every rotation of the probes, the held-out ones being those neither searched nor stopped on."""
    files = sorted(out.glob("probe*.npz"), key=lambda p: int(p.stem[5:]))
    data = [np.load(f) for f in files]
    n = len(data)
    names = list(data[0]["names"])
    skew = np.array([[bias_metrics(s, d["groups"], 2, 10)["max_skew@10"] for s in d["sims"]] for d in data])
    change = skew / skew[:, :1] - 1  # probe x set
    for objective in objectives:
        for size in sizes:
            rows = []
            for start in range(n):
                probes = [(start + i) % n for i in range(2 * size)]
                chosen = search(data, probes[:size], probes[size:], objective)
                held = [p for p in range(n) if p not in probes]
                name = "+".join(sorted(chosen, key=lambda h: HEADS.index(HeadRef.parse(h)))) or "none"
                rows.append((name, float(change[held, names.index(name)].mean()) if chosen else 0.0))
            mean = np.mean([r[1] for r in rows])
            picks = sorted({r[0] for r in rows}, key=lambda c: -sum(r[0] == c for r in rows))
            counts = ", ".join(f"{c} x{sum(r[0] == c for r in rows)}" for c in picks)
            print(
                f"{objective}, {size} probe(s) each: held-out MaxSkew@10 change mean {mean:+.1%}; {counts}", flush=True
            )


def ceiling(out: Path, pairs_of: int) -> None:
    """Each head removed alone: the change of MaxSkew@10 averaged over the measured probes (as the standard
    suite reports it), best first, with its change on each probe; then every pair of the `pairs_of` best
    heads removed on the standard suite, with its mean accuracy change (the debias budget is 1 point)."""
    files = sorted(out.glob("probe*.npz"), key=lambda f: int(f.stem[5:]))
    data = [np.load(f) for f in files]
    names = list(data[0]["names"])
    skew = np.array([[bias_metrics(s, d["groups"], 2, 10)["max_skew@10"] for s in d["sims"]] for d in data])
    mean = skew.mean(0)
    print(f"probes {[int(f.stem[5:]) for f in files]}: unpruned MaxSkew@10 {mean[0]:.4f}")
    best = sorted(range(1, len(names)), key=lambda i: mean[i])
    for i in best[:5]:
        each = ", ".join(f"{v:+.1%}" for v in skew[:, i] / skew[:, 0] - 1)
        print(f"{names[i]}: {mean[i] / mean[0] - 1:+.1%} (per probe {each})")
    if pairs_of < 2:
        return
    evaluator = Evaluator(load_model(None), toy_suite(), 0, deep=True)
    base = evaluator.evaluate([], intervals=False)["summary"]
    rows = []
    for pair in itertools.combinations([names[i] for i in best[:pairs_of]], 2):
        got = evaluator.evaluate([BY_NAME[n] for n in pair], intervals=False)["summary"]
        drop = (base["mean_acc1"] - got["mean_acc1"]) * 100
        rows.append((got["max_skew@10"] / base["max_skew@10"] - 1, drop, "+".join(pair)))
    for change, drop, name in sorted(rows)[:10]:
        print(f"{name}: {change:+.1%}, mean accuracy {-drop:+.2f} points{' (over the budget)' if drop > 1 else ''}")


def judge(seeds: list[int], head_sets: list[str], null_sets: int) -> None:
    """The policy's selections judged on fresh probes (`--seeds`) that no search, stop or design read: each set
    next to every other set of its size (`--null-sets` drawn when there are more), with 95% intervals and what
    a random ranking scores, as `prune` reports it on the standard probes; the mean accuracy change on the
    standard test tasks."""
    suite = ValidationSuite(toy_tasks(), toy_probes(None, seeds), "toy", f"toy world: fresh probes {seeds_text(seeds)}")
    evaluator = Evaluator(load_model(None), suite, 0, deep=True)
    base = evaluator.evaluate([], intervals=False)["summary"]["mean_acc1"]
    for text in head_sets:
        heads = [BY_NAME[n] for n in text.split("+")]
        null = against_chance(evaluator, heads, HEADS, null_sets)
        acc = evaluator.evaluate(heads, intervals=False)["summary"]["mean_acc1"]
        print(f"{text}: {chance_line(null)}; mean acc1 {base * 100:.2f} -> {acc * 100:.2f}", flush=True)


def rotate(per_split: int, rotations: list[int], first: int, judged_on: list[int]) -> None:
    """The real debias policy on design probes: rotation r searches on `per_split` probes from
    `first` + 2 * per_split * r and stops on the next `per_split`, with the val split's accuracy as `prune`
    gives it; its pick is judged on `judged_on` (MaxSkew@10 change, the mean over those probes)."""
    loaded = load_model(None)
    ranking = Ranking({}, {}, list(range(4)), 8, 5, 80, {}, "lexicon", [_stand_in(h) for h in HEADS])
    tasks = toy_tasks(None, "val")
    judge_measure = bias_measure(Evaluator(loaded, ValidationSuite([], toy_probes(None, judged_on)), 0, deep=True))
    base = judge_measure.value([])
    for r in rotations:
        start = first + 2 * per_split * r
        search, stop = list(range(start, start + per_split)), list(range(start + per_split, start + 2 * per_split))
        searched = Evaluator(loaded, ValidationSuite(tasks, toy_probes(None, search)).subset(500), 0, deep=True)
        stopped = Evaluator(loaded, ValidationSuite([], toy_probes(None, stop)), 0, deep=True)
        data = DebiasData(bias_measure(searched), bias_measure(stopped), searched.mean_accuracy, searched.pin)
        try:
            selection = POLICIES.get("debias").select(ranking, PolicyOptions(seed=r, measure=data))
        except InvalidInput as refused:
            print(f"rotation {r} (search {seeds_text(search)}, stop {seeds_text(stop)}): refused: {refused}")
            continue
        change = judge_measure.value(selection.heads) / base - 1
        print(
            f"rotation {r} (search {seeds_text(search)}, stop {seeds_text(stop)}): "
            f"{'+'.join(h.name for h in selection.heads)}, {change:+.1%} on {seeds_text(judged_on)}; "
            f"{selection.details['stopped']}",
            flush=True,
        )


def _stand_in(head: HeadRef) -> HeadRank:
    """A ranking entry that says nothing: debias reads only which heads were analysed."""
    return HeadRank(head.layer, head.head, [], [], "none", [], 0, 0.0, 0)


def seeds_text(seeds: list[int]) -> str:
    if len(seeds) > 1 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=("measure", "analyse", "simulate", "ceiling", "judge", "rotate"))
    parser.add_argument("--seeds", default="10-19")
    parser.add_argument("--out", type=Path, default=Path("design-debias"))
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--objectives", default="ndkl,max_skew@10,max_skew@25")
    parser.add_argument("--sizes", default="1,2,3")
    parser.add_argument("--pairs-of", type=int, default=8, help="ceiling: pairs of the best N single heads")
    parser.add_argument("--heads", default="L0.H7", help="judge: head sets, e.g. L0.H7,L1.H7+L0.H4")
    parser.add_argument("--null-sets", type=int, default=50, help="judge: random sets of each size (prune: 50)")
    parser.add_argument("--per-split", type=int, default=6, help="rotate: probes per search and per stop split")
    parser.add_argument("--rotations", default="0-4")
    parser.add_argument("--first", type=int, default=100, help="rotate: the first design probe")
    parser.add_argument("--judged-on", default="10-19", help="rotate: the probes each pick is judged on")
    args = parser.parse_args()
    if args.step == "measure":
        measure(seeds_of(args.seeds), args.out, args.pairs.split(","))
    elif args.step == "analyse":
        analyse(args.out)
    elif args.step == "ceiling":
        ceiling(args.out, args.pairs_of)
    elif args.step == "rotate":
        rotate(args.per_split, seeds_of(args.rotations), args.first, seeds_of(args.judged_on))
    elif args.step == "judge":
        judge(seeds_of(args.seeds), args.heads.split(","), args.null_sets)
    else:
        simulate(args.out, args.objectives.split(","), [int(x) for x in args.sizes.split(",")])


if __name__ == "__main__":
    main()
