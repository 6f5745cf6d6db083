"""A study vs the same cells as separate `surgeon prune` runs, side by side in one run (issue 17).

    python benchmarks/bench_study.py

One random-init 12-layer ViT (a local-dir folder; small images so it runs on 2 CPU cores), 3 policies
(top-k, bottom-k, random; 4 heads each, in the ranking's last 4 layers) x 2 ImageFolder data sets. The
separate runs are library calls of what `surgeon prune` does per cell (load the model, rank, validate
before/after on the cell's data set, write the run folder with its safetensors), not subprocesses, so no
interpreter start-up is counted against them. Ranking statistics and text embeddings are cached on disk
before timing, for both sides. Prints the time ratio (goal <= 0.5x) and the largest difference between the
accuracies the two report for the same cell."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import save_local_dir  # noqa: E402

CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 12, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
POLICIES = {"top-k": {"k": 4}, "bottom-k": {"k": 4}, "random": {"k": 4, "seed": 0}}
N_PER_CLASS, N_RANK = 60, 200


def image_folder(root: Path, classes: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def separate_prune_runs(model: str, rank_images: Path, data: dict[str, Path], out: Path) -> dict:
    from surgeon.core.options import RankMethod
    from surgeon.inputs.images import resolve_images
    from surgeon.inputs.pools import load_pool
    from surgeon.model.load import load_model
    from surgeon.pruning.prune import prune
    from surgeon.ranking.rank import rank_heads
    from surgeon.selection.policies import PolicyOptions
    from surgeon.validation.validate import build_suite

    accuracies = {}
    for policy, options in POLICIES.items():
        for name, folder in data.items():
            loaded = load_model(model)
            ranking = rank_heads(
                loaded, resolve_images(str(rank_images), N_RANK, model), load_pool(None, False), RankMethod()
            )
            suite = build_suite(folder, model=model)
            opts = PolicyOptions(model_name=loaded.name, pretrained=loaded.pretrained, **options)
            result = prune(loaded, ranking, suite, policy, opts, out_dir=out / f"{policy}-{name}")
            accuracies[(policy, name)] = result.after["summary"]["mean_acc1"]
    return accuracies


def main() -> None:
    from surgeon.studies.study import compute_study, parse_study

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["SURGEON_CACHE_DIR"] = str(root / "cache")
        model = "local-dir:" + str(save_local_dir(root / "model", CFG))
        rank_images = image_folder(root / "rank", ["x"], 0)
        data = {
            "colours": image_folder(root / "a", ["red", "blue"], 1),
            "animals": image_folder(root / "b", ["dog", "cat"], 2),
        }
        policies = "".join(
            f'[[policies]]\npolicy = "{p}"\n' + "".join(f"{k} = {v}\n" for k, v in o.items())
            for p, o in POLICIES.items()
        )
        datasets = "".join(f'[[data]]\nname = "{n}"\npath = "{p}"\n' for n, p in data.items())
        study_file = root / "bench.toml"
        study_file.write_text(
            f'[rank]\nimages = "{rank_images}"\nn_images = {N_RANK}\n'
            f'[[models]]\nname = "{model}"\n{policies}{datasets}',
            encoding="utf-8",
        )
        spec = parse_study(study_file)
        compute_study(spec, root / "warm")  # fills the statistics and text caches both sides use; untimed

        start = time.perf_counter()
        separate = separate_prune_runs(model, rank_images, data, root / "runs")
        t_separate = time.perf_counter() - start
        start = time.perf_counter()
        run = compute_study(spec, root / "study")
        t_study = time.perf_counter() - start

        table = json.loads((root / "study" / "table.json").read_text())
        rows = {r["policy"]: r for r in table["rows"]}
        diff = max(abs(rows[p]["cells"][n]["value"] - acc) for (p, n), acc in separate.items())
        print(f"separate prune runs: {t_separate:.1f} s for {len(separate)} cells (library calls)")
        print(f"study:               {t_study:.1f} s for {len(run.computed)} cells (incl. 2 unpruned baselines)")
        print(f"ratio study/separate {t_study / t_separate:.2f}x (goal <= 0.5x); max |acc difference| {diff:.2e}")


if __name__ == "__main__":
    main()
