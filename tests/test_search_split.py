"""Selection by measurement (debias) never reports on the data it selected on: the suite splits into disjoint
search and held-out halves (toy: other streams; files: seeded, by a unit column), too-small halves refused."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from surgeon.errors import InvalidInput
from surgeon.validate import bias_set, toy_suite


def digests(images) -> set[str]:
    return {hashlib.sha256(np.asarray(image).tobytes()).hexdigest() for image in images}


def test_toy_search_suite_shares_no_image_with_the_reported_one():
    suite = toy_suite(n_per_task=64, n_scenes=24)
    search, held_out = suite.split_for_search()
    assert held_out is suite and "test split" in held_out.description and "val split" in search.description
    assert len(search.tasks[0].labels) == 64 and len(np.unique(search.bias.units)) == 24
    assert not digests(search.tasks[0].images) & digests(held_out.tasks[0].images)
    assert not digests(search.bias.images) & digests(held_out.bias.images)
    assert search.bias.queries == held_out.bias.queries


@pytest.fixture
def manifest(tmp_path):
    """40 images of 20 identities (2 each), 2 groups."""
    rng = np.random.default_rng(0)
    rows = ["path,group,identity"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i // 2 % 2]},person{i // 2}")
    (tmp_path / "bias.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "queries.txt").write_text("a doctor\na nurse\n")
    return tmp_path


def test_files_split_keeps_each_identity_on_one_side_reproducibly(manifest):
    from surgeon.validate import ValidationSuite

    bias = bias_set(manifest / "bias.csv", manifest / "queries.txt", k=5, split_by="identity")
    suite = ValidationSuite([], bias, "files", "bias.csv")
    search, held_out = suite.split_for_search(seed=0)
    ids = [{p.stem for p in side.bias.images} for side in (search, held_out)]
    identity = {str(i): i // 2 for i in range(40)}
    assert not {identity[p] for p in ids[0]} & {identity[p] for p in ids[1]}
    assert len(ids[0]) + len(ids[1]) == 40 and "held-out half" in held_out.description
    again, _ = suite.split_for_search(seed=0)
    assert [p.name for p in again.bias.images] == [p.name for p in search.bias.images]


def test_bad_or_too_small_splits_are_refused(manifest):
    from surgeon.validate import ValidationSuite

    with pytest.raises(InvalidInput, match="not a column of bias.csv"):
        bias_set(manifest / "bias.csv", manifest / "queries.txt", split_by="face")
    bias = bias_set(manifest / "bias.csv", manifest / "queries.txt", k=15, split_by="identity")
    with pytest.raises(InvalidInput, match="too small to split"):
        ValidationSuite([], bias, "files", "bias.csv").split_for_search()


def test_a_huge_split_column_is_refused_before_any_work(capsys):
    from tests.test_hardening_bounds import run_cli

    code, err = run_cli("prune", "--bias-split-by", "x" * 100_000, capsys=capsys)
    assert code == 2 and "bias_split_by is 100,000 characters long" in err and len(err) < 2_000
