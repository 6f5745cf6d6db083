"""What `prune --policy debias` costs next to a plain prune of the same model, suite and ranking (issue 24).

    python benchmarks/bench_debias.py                      # the bundled toy model, its default suite
    python benchmarks/bench_debias.py --model vit-b-32     # ViT-B-32 (random init, 224 px), synthetic data

Both runs start from the same ranking (ranking costs the same for every policy) and write nothing. Prints CPU
and wall seconds of each, the ratio (goal <= 3x), the head sets the search announced it would measure at most
and how many it measured, and why it stopped. CPU time is what a shared machine's contention does not skew.
When the search finds no head to remove (random weights carry no bias), the run goes on with a stand-in, the
ranking's first head, so that the report split's validations and the
comparison with random head sets are timed too, as a complete run would spend them."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from surgeon.core.errors import InvalidInput
from surgeon.model.heads import HeadRef
from surgeon.model.load import LoadedModel, build_clip, load_model, weights_hash
from surgeon.pruning import prune as prune_module
from surgeon.pruning.prune import prune, select_heads
from surgeon.ranking.rank import HeadRank, Ranking
from surgeon.selection.policies import PolicyOptions, Selection, debias_bound
from surgeon.validation.validate import BiasSet, ClassificationSet, ValidationSuite, toy_suite

VIT_B_32 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def vit_b_32() -> LoadedModel:
    import open_clip

    torch.manual_seed(0)
    model = build_clip(VIT_B_32).eval()
    pcfg = {"size": (224, 224), "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28), "interpolation": "bicubic"}
    pcfg["resize_mode"] = "shortest"
    loaded = LoadedModel(
        model, None, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32", None, pcfg, VIT_B_32, torch.device("cpu")
    )
    loaded.weights_hash = weights_hash(model)
    return loaded


def synthetic_suite(n_task: int, n_units: int) -> ValidationSuite:
    """Two classification tasks sharing `n_task` images, a bias set of `n_units` units x 2 groups."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_task, 224, 224, 3), dtype=np.uint8)
    tasks = [
        ClassificationSet(name, classes, ["a photo of a {}"], images, rng.integers(0, len(classes), n_task))
        for name, classes in (("colors", ["red", "blue", "green"]), ("animals", ["dog", "cat"]))
    ]
    faces = rng.integers(0, 255, (2 * n_units, 224, 224, 3), dtype=np.uint8)
    bias = BiasSet(
        "people",
        faces,
        np.tile([0, 1], n_units),
        ["a", "b"],
        {q: [f"a photo of a {q}"] for q in ("doctor", "nurse", "pilot")},
        units=np.repeat(np.arange(n_units), 2),
    )
    return ValidationSuite(tasks, bias, "files", "synthetic")


def ranking_of(loaded: LoadedModel, layers: list[int], n_heads: int) -> Ranking:
    """A ranking of every head of `layers` (debias reads only which heads were analysed)."""
    heads = [HeadRank(layer, h, [], [], "none", [], 0, 0.0, 0) for layer in layers for h in range(n_heads)]
    return Ranking(loaded.record(), {}, layers, n_heads, 5, 80, {}, "lexicon", heads)


def timed(run):
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = run()
    return outcome, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("toy", "vit-b-32"), default="toy")
    parser.add_argument("--task-images", type=int, default=256, help="vit-b-32: images per task")
    parser.add_argument("--bias-units", type=int, default=150, help="vit-b-32: bias units (2 images each)")
    parser.add_argument("--search-images", type=int, default=64)
    args = parser.parse_args()
    if args.model == "toy":
        model_of, suite_of, layers, n_heads = (lambda: load_model(None)), toy_suite, list(range(4)), 8
    else:
        model_of, layers, n_heads = vit_b_32, list(range(8, 12)), 12

        def suite_of() -> ValidationSuite:
            return synthetic_suite(args.task_images, args.bias_units)

    loaded = model_of()  # prune works in place: each run gets its own copy, loaded outside the timing
    ranking = ranking_of(loaded, layers, n_heads)

    refusals: list[str] = []

    def selected(ranking, policy, options, measure=None):
        try:
            return select_heads(ranking, policy, options, measure)
        except InvalidInput as refused:  # random weights may carry no bias: go on with a stand-in head
            refusals.append(str(refused))
            first = ranking.sorted_heads()[0]
            return Selection([HeadRef(first.layer, first.head)], {first.name: "stand-in"}, {"stopped": str(refused)})

    prune_module.select_heads = selected
    result, debias_cpu, debias_wall = timed(
        lambda: prune(loaded, ranking, suite_of(), "debias", PolicyOptions(), search_images=args.search_images)
    )
    size = len(result.plan.heads)
    plain = ",".join(f"L{h.layer}.H{h.head}" for h in ranking.heads[:size])
    loaded = model_of()
    _, plain_cpu, plain_wall = timed(lambda: prune(loaded, ranking, suite_of(), "heads", PolicyOptions(heads=plain)))
    print(f"model {args.model}: {len(ranking.heads)} heads analysed, search images per task {args.search_images}")
    print(f"plain prune ({size} head(s)): {plain_cpu:.1f} s CPU, {plain_wall:.1f} s wall")
    print(f"debias prune: {debias_cpu:.1f} s CPU, {debias_wall:.1f} s wall")
    print(f"ratio: {debias_cpu / plain_cpu:.2f}x CPU, {debias_wall / plain_wall:.2f}x wall (goal <= 3x)")
    details = result.plan.policy_details
    if refusals:
        print(f"head sets announced at most: {debias_bound(len(ranking.heads), 4, PolicyOptions().candidates)}")
        print(f"the search refused ({refusals[0]}); completed with a stand-in head, {result.plan.heads[0].head}")
    else:
        print(f"head sets announced at most: {details['bound']}; measured: {details['measured']}")
        print(f"pruned {[h.head for h in result.plan.heads]}: {details['stopped']}")
    chance = result.against_chance
    assert chance is not None  # a debias result always carries it
    print(f"random {chance['size']}-head sets on the report split: {chance['sets']}")


if __name__ == "__main__":
    main()
