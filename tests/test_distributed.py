"""Sharded statistics: 2 gloo processes equal one; an interrupted collection resumes without recomputing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from surgeon.core.distributed import World, shard
from surgeon.core.stats import HeadStats
from surgeon.inputs.images import ImageSet, folder_images
from surgeon.model.load import load_model
from surgeon.ranking.collect import collect_stats, stats_key
from tests.conftest import run_cli
from tests.test_rank_cli import TAXONOMY

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.parametrize(("count", "size", "batch"), [(10, 3, 1), (2, 4, 1), (24, 2, 5), (103, 3, 8)])
def test_shards_cover_everything_once_at_batch_boundaries(count, size, batch):
    ranges = [shard(count, World(r, size), batch) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start % batch == 0 for start, _ in ranges)
    batches = [-(-(b - a) // batch) for a, b in ranges]
    assert max(batches) - min(batches) <= 1


@pytest.mark.slow  # two torchrun processes
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_gloo_processes_equal_one(tiny_default_dir, image_folder, pool_file, tmp_path):
    """2 processes x batch 5 (shards [0, 15) and [15, 24)) vs 1 process x batch 7: the shard boundary falls
    inside a single-process batch, and the picks, CCS and effective ranks still agree."""
    taxonomy = tmp_path / "taxonomy.json"
    taxonomy.write_text(json.dumps(TAXONOMY))
    args = [
        "rank",
        "--model",
        f"local-dir:{tiny_default_dir}",
        "--images",
        str(image_folder),
        "--texts",
        str(pool_file),
        "--taxonomy",
        str(taxonomy),
        "--layers",
        "1-2",
        "--texts-per-head",
        "3",
        "--quiet",
        "--device",
        "cpu",
        "--batch-size",
        "5",
    ]
    env = {**os.environ, "SURGEON_CACHE_DIR": str(tmp_path / "cache-dist"), "OMP_NUM_THREADS": "1"}
    dist = subprocess.run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "surgeon",
            *args,
            "--out",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert dist.returncode == 0, dist.stderr[-2000:]
    env["SURGEON_CACHE_DIR"] = str(tmp_path / "cache-single")
    single_args = [*args[:-1], "7"]  # --batch-size 7
    single = run_cli(*single_args, "--out", str(tmp_path / "single"), env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    a = json.loads((tmp_path / "dist" / "ranking.json").read_text())
    b = json.loads((tmp_path / "single" / "ranking.json").read_text())
    summary = [[(h["texts"], h["ccs"], h["effective_rank"]) for h in r["heads"]] for r in (a, b)]
    assert summary[0] == summary[1] and all(h["effective_rank"] < 32 for h in a["heads"])
    assert a["images"]["count"] == b["images"]["count"] == 24
    stats = [
        HeadStats.load(next((tmp_path / c / "stats").glob("*.safetensors"))) for c in ("cache-dist", "cache-single")
    ]
    assert stats[0].count == stats[1].count
    # other batch compositions change float32 kernels' rounding, not the sums: agree to float32 precision
    for a_part, b_part in ((stats[0].outer, stats[1].outer), (stats[0].total, stats[1].total)):
        torch.testing.assert_close(a_part, b_part, rtol=1e-5, atol=1e-6 * float(b_part.abs().max()))


class Interrupting:
    """Loads images from a folder and raises KeyboardInterrupt (as SIGINT would) at one index, once."""

    def __init__(self, folder: Path, stop_at: int | None):
        self.inner = folder_images(folder)
        self.stop_at, self.loaded = stop_at, []

    def load(self, index: int) -> Image.Image:
        if index == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt
        self.loaded.append(index)
        return self.inner.load(index)

    def image_set(self) -> ImageSet:
        return ImageSet(self.inner.identity, self.inner.description, self.inner.count, self.load)


def test_interrupted_collection_resumes_without_recomputing(tiny_default_dir, image_folder):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    layers = (1, 2)
    reference, _ = collect_stats(loaded, folder_images(image_folder), layers, batch_size=4, use_cache=False)
    source = Interrupting(image_folder, stop_at=13)
    with pytest.raises(KeyboardInterrupt):
        collect_stats(loaded, source.image_set(), layers, batch_size=4, checkpoint_every=2)
    assert not list((Path(os.environ["SURGEON_CACHE_DIR"]) / "stats").glob("*"))  # no final entry yet
    source.loaded.clear()
    resumed, cached = collect_stats(loaded, source.image_set(), layers, batch_size=4, checkpoint_every=2)
    assert not cached and min(source.loaded) == 8  # batches 0-7 came from the checkpoint
    assert resumed.count == reference.count == 24
    torch.testing.assert_close(resumed.outer, reference.outer, rtol=1e-12, atol=1e-15)
    key = stats_key(loaded, source.image_set(), layers)
    assert not (Path(os.environ["SURGEON_CACHE_DIR"]) / "partial" / f"{key}-rank0of1.safetensors").exists()


def test_corrupt_cache_entry_is_reported_and_recomputed(tiny_default_dir, image_folder):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    images = folder_images(image_folder)
    collect_stats(loaded, images, (2,), batch_size=8)
    entry = next((Path(os.environ["SURGEON_CACHE_DIR"]) / "stats").glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="corrupt statistics .* recomputing"):
        _, cached = collect_stats(loaded, images, (2,), batch_size=8)
    assert not cached and collect_stats(loaded, images, (2,), batch_size=8)[1]  # replaced by a good entry
    shutil.rmtree(entry.parent)
