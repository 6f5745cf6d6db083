"""`surgeon rank` end to end through the real CLI, and its bad-input promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli

TAXONOMY = {
    "version": 1,
    "concepts": {
        "colors": {"description": "hues", "terms": ["red", "blue", "green", "yellow"], "priority": 0},
        "animals": {"description": "animals", "terms": ["dog", "cat", "bird"], "priority": 0},
        "locations": {"description": "places", "terms": ["paris", "tokyo", "city"], "priority": 0},
        "counting": {"description": "numbers", "terms": ["three", "five"], "priority": 0},
    },
}


@pytest.fixture
def taxonomy_file(tmp_path) -> Path:
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(TAXONOMY))
    return path


def rank_args(model_dir, images, pool, taxonomy, out) -> list[str]:
    return [
        "rank",
        "--model",
        f"local-dir:{model_dir}",
        "--images",
        str(images),
        "--texts",
        str(pool),
        "--taxonomy",
        str(taxonomy),
        "--layers",
        "1-2",
        "--m",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]


def test_rank_writes_files_and_reuses_cached_statistics(
    tiny_default_dir, image_folder, pool_file, taxonomy_file, tmp_path
):
    out = tmp_path / "run"
    result = run_cli(*rank_args(tiny_default_dir, image_folder, pool_file, taxonomy_file, out))
    assert result.returncode == 0, result.stderr
    assert "fresh statistics over 24 images" in result.stdout
    data = json.loads((out / "ranking.json").read_text())
    assert data["schema"] == "surgeon.ranking/3" and data["layers"] == [1, 2] and data["m"] == 3
    assert len(data["heads"]) == 8 and data["model"]["weights_sha256"] and data["model"]["activation"] == "GELU"
    # the 32-dim joint space cannot hold rank 80: each head's rank is clamped to what its statistics carry
    assert data["span_rank"] == 80 and all(16 <= h["effective_rank"] <= 19 for h in data["heads"])
    assert "TextSpan rank 80 exceeds the numerical rank of 8 of 8 heads" in result.stdout
    assert abs(sum(data["ccs_distribution"].values()) - 1) < 1e-9
    for head in data["heads"]:
        assert head["label"] in {*TAXONOMY["concepts"], "none"} and len(head["texts"]) == 3
        assert head["ccs"] == sum(head["verdicts"])  # verdicts mark the texts about the label; CCS counts them
    assert (out / "ranking.csv").read_text().startswith("layer,head,label,ccs")
    assert Image.open(out / "ccs_heatmap.png").size[0] > 300
    # another pool: same statistics from the cache, no forward pass
    other_pool = tmp_path / "other.txt"
    other_pool.write_text("a red dog\na blue cat\nthree birds\nParis at night\n")
    again = run_cli(*rank_args(tiny_default_dir, image_folder, other_pool, taxonomy_file, tmp_path / "run2"))
    assert again.returncode == 0, again.stderr
    assert "cached statistics over 24 images" in again.stdout


def test_unreadable_images_are_skipped_with_a_count(tiny_default_dir, image_folder, pool_file, taxonomy_file, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in list(image_folder.iterdir())[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "notes.jpg").write_text("not an image")
    result = run_cli(*rank_args(tiny_default_dir, folder, pool_file, taxonomy_file, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable image(s)" in result.stderr
    assert "over 4 images" in result.stdout


@pytest.mark.parametrize(
    ("change", "message", "code"),
    [
        (lambda a, tmp: a.__setitem__(2, "local-dir:/nope"), "model folder not found", 3),
        (lambda a, tmp: a.__setitem__(a.index("--m") + 1, "0"), "m (texts per head) must be an integer in 1..", 2),
        (lambda a, tmp: a.__setitem__(a.index("--layers") + 1, "2-7"), "out of range", 2),
        (lambda a, tmp: a.__setitem__(a.index("--texts") + 1, str(tmp / "empty.txt")), "is empty", 2),
        (lambda a, tmp: a.__setitem__(a.index("--texts") + 1, str(tmp / "latin1.txt")), "not UTF-8", 2),
        (lambda a, tmp: a.__setitem__(a.index("--texts") + 1, str(tmp / "missing.txt")), "not found", 3),
        (lambda a, tmp: a.__setitem__(a.index("--images") + 1, str(tmp / "empty_dir")), "no images in", 2),
        (lambda a, tmp: a.__setitem__(a.index("--images") + 1, str(tmp / "junk_dir")), "readable image", 2),
        (lambda a, tmp: a.extend(["--judge", "oracle"]), "unknown judge 'oracle'", 2),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(
    tiny_default_dir, image_folder, pool_file, taxonomy_file, tmp_path, change, message, code
):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "junk_dir").mkdir()
    (tmp_path / "junk_dir" / "a.png").write_text("junk")
    out = tmp_path / "out"
    args = rank_args(tiny_default_dir, image_folder, pool_file, taxonomy_file, out)
    change(args, tmp_path)
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
