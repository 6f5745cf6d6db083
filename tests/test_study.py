"""`surgeon study`: resume, shards + collect, added columns, bad study files (on the toy world and a tiny
random-init open_clip model)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PartialResult, PreconditionFailed
from surgeon.results.bias import chance_skews
from surgeon.studies.study import CellStore, cells, compute_study, parse_study
from tests.conftest import run_cli

TOY = """
name = "toy test"
[rank]
n_images = 200
[[models]]
name = "toy"
[[policies]]
policy = "top-k"
k = 2
[[policies]]
policy = "random"
k = 2
seeds = 2
[[data]]
name = "shape"
path = "toy:shape"
n = 60
[[bias]]
name = "probe"
path = "toy"
n = 20
"""
TOY_CELLS = 2 * (1 + 1 + 2)  # data sets x (baseline, top-k, 2 random seeds)


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy_full(tmp_path_factory):
    """One uninterrupted run of the toy study (shared: the reference the other runs must equal)."""
    tmp = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as patch:  # module scope: isolated_dirs has not run yet
        patch.setenv("SURGEON_CACHE_DIR", str(tmp / "cache"))
        study = parse_study(write(tmp, TOY))
        return study, compute_study(study, tmp / "out")


@pytest.mark.slow  # runs a study on the toy world
def test_one_run_computes_every_cell_and_writes_the_table(toy_full):
    study, run = toy_full
    assert len(run.computed) == TOY_CELLS == len(cells(study)) and not run.reused
    assert {p.name for p in run.files} == {"table.md", "table.csv", "table.json", "study.png"}
    table = json.loads((run.out / "table.json").read_text())
    rows = {r["policy"]: r for r in table["rows"]}
    assert list(rows) == ["none", "top-k", "random"] and rows["top-k"]["heads"] == 2
    random_shape = rows["random"]["cells"]["shape"]
    assert random_shape["seeds"] == 2 and random_shape["value"] == pytest.approx(np.mean(random_shape["values"]))
    assert random_shape["std"] == pytest.approx(np.std(random_shape["values"], ddof=1))
    base = rows["none"]["cells"]["shape"]["value"]
    assert rows["top-k"]["cells"]["shape"]["change"] == pytest.approx(rows["top-k"]["cells"]["shape"]["value"] - base)
    assert "| toy | random | 2 |" in (run.out / "table.md").read_text() and " ± " in (run.out / "table.md").read_text()
    # the bias column's floor: a random ranking of 20 scenes in each outline (results.bias.chance_skews)
    shape, probe = table["columns"]
    floor = chance_skews(np.repeat([0, 1], 20), 2, 10, n_queries=6)["max_skew@10"]
    assert "floor" not in shape and probe["metric"] == "max_skew@10" and probe["floor"] == pytest.approx(floor)
    above = all(r["cells"]["probe"]["value"] > floor for r in table["rows"])  # chance is a floor only under them
    wording = "that column's floor, not 0" if above else "rows below it rank more evenly than chance"
    assert f"scores max_skew@10 {floor:.3f} on probe: {wording}" in (run.out / "table.md").read_text()


@pytest.mark.slow  # runs a study on the toy world
def test_resume_after_an_interrupt_recomputes_no_finished_cell(tmp_path, toy_full, monkeypatch):
    study = parse_study(write(tmp_path, TOY))
    put = CellStore.put
    written = []

    def interrupted(self, key, record):
        if len(written) == 3:
            raise KeyboardInterrupt
        put(self, key, record)
        written.append(self.path(key))

    monkeypatch.setattr(CellStore, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_study(study, tmp_path / "out")
    monkeypatch.setattr(CellStore, "put", put)
    stamps = {p: p.stat().st_mtime_ns for p in written}
    assert sorted((tmp_path / "out" / "cells").iterdir()) == sorted(written)  # no half cell, no temporary
    run = compute_study(study, tmp_path / "out")
    assert len(run.reused) == 3 and len(run.computed) == TOY_CELLS - 3
    assert {p: p.stat().st_mtime_ns for p in written} == stamps
    assert (run.out / "table.json").read_bytes() == (toy_full[1].out / "table.json").read_bytes()


@pytest.mark.slow  # runs a study on the toy world
def test_two_shards_and_collect_equal_one_run(tmp_path, toy_full):
    study = parse_study(write(tmp_path, TOY))
    out = tmp_path / "out"
    first = compute_study(study, out, shard=(0, 2))
    assert first.table is None and len(first.computed) == TOY_CELLS // 2
    with pytest.raises(PreconditionFailed, match=f"{TOY_CELLS // 2} of {TOY_CELLS} cells are not computed"):
        compute_study(study, out, collect=True)
    assert len(compute_study(study, out, shard=(1, 2)).computed) == TOY_CELLS // 2
    collected = compute_study(study, out, collect=True)
    assert not collected.computed and len(collected.reused) == TOY_CELLS
    assert (out / "table.json").read_bytes() == (toy_full[1].out / "table.json").read_bytes()
    assert (out / "table.csv").read_bytes() == (toy_full[1].out / "table.csv").read_bytes()


@pytest.mark.slow  # runs a study on the toy world
def test_an_added_column_computes_only_that_column(tmp_path, toy_full):
    out = tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    wider = parse_study(write(tmp_path, TOY + '[[data]]\nname = "color"\npath = "toy:color"\nn = 60\n', "wider.toml"))
    run = compute_study(wider, out)
    assert len(run.reused) == TOY_CELLS and len(run.computed) == TOY_CELLS // 2  # one new cell per head set
    table = json.loads((out / "table.json").read_text())
    assert [c["name"] for c in table["columns"]] == ["shape", "color", "probe"]


def _image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_random_init_model_zero_and_hard_modes_and_presets_of_heads(
    tmp_path, tiny_default_dir, image_folder, pool_file
):
    """A real open_clip architecture from a local-dir folder, files as data: hard pruning equals zero ablation."""
    _image_folder(tmp_path / "data")
    text = f"""
modes = ["zero", "hard", "mean"]
[rank]
images = "{image_folder}"
texts = "{pool_file}"
layers = "all"
[[models]]
name = "local-dir:{tiny_default_dir}"
label = "tiny"
[[policies]]
policy = "top-k"
k = 2
[[policies]]
policy = "heads"
heads = "L2.H1,L1.H0"
[[data]]
name = "noise"
path = "data"
"""
    study = parse_study(write(tmp_path, text))
    run = compute_study(study, tmp_path / "out")
    assert len(run.computed) == 1 + 2 * 3
    rows = {(r["policy"], r["mode"]): r for r in run.table["rows"]}
    for policy in ("top-k", "heads"):
        zero, hard = rows[(policy, "zero")]["cells"]["noise"], rows[(policy, "hard")]["cells"]["noise"]
        assert zero["value"] == pytest.approx(hard["value"], abs=1e-6)
        assert rows[(policy, "mean")]["heads"] == 2
    assert "| mode |" in (run.out / "table.md").read_text().splitlines()[2]


BAD = [
    ('[[models]]\nname = "toy"\nflavour = 1\n', "models[0].flavour: unknown key"),
    ('[[models]]\nname = "toy"\npretrained = 3\n', "models[0].pretrained: must be a string, got 3"),
    (
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "random"\nk = 0\n',
        "policies[0].k: must be in 1..10,000, got 0",
    ),
    (
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "random"\nseeds = 1000\n',
        "policies[0].seeds: must be in 1..100",
    ),
    (
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\nseeds = 3\n',
        "policies[0].seeds: high is deterministic",
    ),
    ('[[models]]\nname = "toy"\n[[policies]]\npolicy = "sometimes"\n', "policies[0].policy: unknown policy"),
    ('[[models]]\nname = "toy"\n[[policies]]\nk = 2\n', "policies[0].policy: is required"),
    ("[[policies]]\npolicy = 'high'\n", "models: is required"),
    ('modes = ["zero", "slice"]\n[[models]]\nname = "toy"\n', "modes[1]: unknown mode 'slice'"),
    ('[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n', "data: a study needs at least one data set"),
    (
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n[[data]]\nname = "x"\npath = "$NO_SUCH_VAR_17/c"\n',
        "data[0].path: environment variable NO_SUCH_VAR_17 is not set",
    ),  # fmt: skip
    (
        '[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n[[bias]]\nname = "b"\npath = "b.csv"\n',
        "bias[0].queries: a bias manifest needs its neutral queries file",
    ),  # fmt: skip
    (
        '[rank]\nn_images = true\n[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n',
        "rank.n_images: must be an integer, got True",
    ),
    (
        '[rank]\nspan_rank = 0\n[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n',
        "rank.span_rank: must be in 1..4,096, got 0",
    ),
    (
        '[rank]\nm = 100000000000\n[[models]]\nname = "toy"\n[[policies]]\npolicy = "high"\n',
        "rank.m: must be in 1..100, got 100000000000",
    ),
    ("name = [", "is not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_study_file_names_the_field(tmp_path, text, message):
    with pytest.raises(InvalidInput) as caught:
        parse_study(write(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_bad_study_file_is_one_line_and_exit_2(tmp_path):
    path = write(tmp_path, '[[models]]\nname = "toy"\nflavour = 1\n')
    result = run_cli("study", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "models[0].flavour: unknown key" in result.stderr and not (tmp_path / "o").exists()


def test_missing_study_file_and_bad_shard(tmp_path):
    from surgeon.core import limits

    with pytest.raises(NotFound):
        parse_study(tmp_path / "nope.toml")
    for spec in ("2/2", "1/0", "a/b", "-1/3"):
        with pytest.raises(InvalidInput):
            limits.shard(spec)
    assert limits.shard("3/4") == (3, 4)


def test_shipped_study_files_parse(monkeypatch):
    """paper.toml: the six checkpoints of METHOD.md §5, data paths from environment variables."""
    studies = Path(__file__).resolve().parents[1] / "studies"
    monkeypatch.setenv("SURGEON_DATA", "/data")
    monkeypatch.setenv("SURGEON_BIAS", "/bias")
    monkeypatch.setenv("SURGEON_VIDEO", "/video")
    monkeypatch.setenv("SURGEON_RANK_IMAGES", "/rank")
    paper = parse_study(studies / "paper.toml")
    assert len(paper.models) == 6 and [p.policy for p in paper.policies][:3] == [
        "paper-high",
        "paper-low",
        "paper-random",
    ]
    assert paper.data[0].path == "/data/cifar10" and [d.kind for d in paper.data].count("retrieval") == 3
    assert paper.data[7].kind == "bias" and paper.data[-1].frames == 32 and len(paper.tables) == 7
    # per model: 14 baselines; high and low on 14 sets (4 of them bias: FairFace and SocialCounterfactuals, race
    # and gender); random (5 seeds) on 6; equal budgets (5 seeds) on 3 each; each concept on 2 -- only the cells
    # some table shows
    assert len(cells(paper)) == 6 * (14 + 14 + 14 + 5 * 6 + 5 * 3 * 2 + 2 * 2)
    assert [d.within for d in paper.data if d.kind == "bias"] == [None, None, "occupation", "occupation"]
    assert len(cells(parse_study(studies / "toy.toml"))) == 6 * (1 + 1 + 1 + 1 + 5)


@pytest.mark.slow  # runs a study on the toy world
def test_cli_shards_then_collect_json(tmp_path, toy_full):
    from typer.testing import CliRunner

    from surgeon.cli import app

    path, out = write(tmp_path, TOY), tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    next(iter(sorted((out / "cells").iterdir()))).unlink()  # one cell lost: the shard holding it recomputes it
    runner = CliRunner()
    for i in range(2):
        result = runner.invoke(app, ["study", str(path), "--out", str(out), "--shard", f"{i}/2", "--quiet"])
        assert result.exit_code == 0, result.output
    assert not (out / "table.json").exists()  # shards leave the table to --collect
    result = runner.invoke(app, ["study", str(path), "--out", str(out), "--collect", "--json"])
    document = json.loads(result.stdout)
    assert document["command"] == "study" and document["summary"] == {"computed": 0, "reused": TOY_CELLS}
    assert (out / "table.json").read_bytes() == (toy_full[1].out / "table.json").read_bytes()


# ---- issue 22.6 / 23.4 / 23.6: bounds, failed cells, interrupts, kept rankings ----------------------------------


def test_a_grid_bomb_is_counted_and_refused_before_any_cell_is_built(tmp_path, monkeypatch):
    """1000 policies x 100 seeds x 3 modes x 1000 data sets (3 x 10^8 cells, a ~100 kB file): before, cells()
    built the list (twice) before the bound, a MemoryError traceback after 84 s."""
    import time

    import surgeon.studies.study as study_module

    policies = "".join(f'[[policies]]\npolicy = "random"\nlabel = "r{i}"\nk = 1\nseeds = 100\n' for i in range(1000))
    data = "".join(f'[[data]]\nname = "d{i}"\npath = "toy:shape"\n' for i in range(1000))
    path = write(tmp_path, 'modes = ["zero", "mean", "hard"]\n[[models]]\nname = "toy"\n' + policies + data)

    def built(study):
        raise AssertionError("the cells were built before the bound was checked")

    monkeypatch.setattr(study_module, "cells", built)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"300,001,000 cells; at most 100,000"):
        parse_study(path)
    assert time.monotonic() - started < 10


def test_count_cells_equals_the_cells_built(tmp_path):
    from surgeon.studies.study import count_cells

    study = parse_study(
        write(
            tmp_path,
            TOY.replace(
                '[[models]]\nname = "toy"', '[[models]]\nname = "toy"\n[[models]]\nname = "toy"\nlabel = "again"'
            ),
        )
    )
    assert count_cells(study) == len(cells(study)) == 2 * TOY_CELLS


@pytest.mark.slow  # runs a study on the toy world
def test_collect_refuses_a_cell_file_that_is_not_a_cell_in_one_line(tmp_path, toy_full):
    """Before: a cell file holding {"x": 1} gave a KeyError traceback, exit 1."""
    from typer.testing import CliRunner

    from surgeon.cli import app

    path, out = write(tmp_path, TOY), tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    shutil.copytree(toy_full[1].out / "rankings", out / "rankings")
    foreign = next(iter(sorted((out / "cells").iterdir())))
    foreign.write_text('{"x": 1}')
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--collect"])
    assert isinstance(result.exception, CorruptInput) and result.exception.exit_code == 4  # main(): one line, exit 4
    assert f"{foreign} is not a surgeon.studies.study-cell/1 cell" in str(result.exception)
    # a run without --collect computes that cell again: nothing else
    run = compute_study(parse_study(path), out)
    assert len(run.computed) == 1 and len(run.reused) == TOY_CELLS - 1


def test_a_cell_copied_under_another_cells_name_is_not_taken_for_it(tmp_path, toy_full):
    """Before: --collect put the copied cell's numbers in the other cell's place (100.0 (+7.0) for 92.7 (-0.3)),
    and a plain rerun reused it."""
    from typer.testing import CliRunner

    from surgeon.cli import app

    path, out = write(tmp_path, TOY), tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    shutil.copytree(toy_full[1].out / "rankings", out / "rankings")
    first, second = sorted((out / "cells").iterdir())[:2]
    shutil.copyfile(second, first)
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--collect"])
    assert isinstance(result.exception, CorruptInput) and f"{first} holds another cell" in str(result.exception)
    run = compute_study(parse_study(path), out)
    assert len(run.computed) == 1 and len(run.reused) == TOY_CELLS - 1


def test_an_interrupted_study_says_its_finished_cells_are_kept(tmp_path, monkeypatch):
    """Before: "interrupted: nothing was written" although the finished cells were kept and reused."""
    from surgeon.core.progress import kept_after_interrupt

    study = parse_study(write(tmp_path, TOY))
    put, written = CellStore.put, []

    def interrupted(self, key, record):
        if len(written) == 2:
            raise KeyboardInterrupt
        put(self, key, record)
        written.append(key)

    monkeypatch.setattr(CellStore, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compute_study(study, tmp_path / "out")
    assert kept_after_interrupt() == (
        f"2 finished cell(s) are kept in {tmp_path / 'out' / 'cells'}; run the same command to resume"
    )


@pytest.mark.slow  # runs a study on the toy world
def test_a_resumed_study_reads_its_kept_ranking_instead_of_ranking_again(tmp_path, toy_full, monkeypatch):
    """Before: the ranking lived in memory only, so a resume re-ran TextSpan for the cells left."""
    import surgeon.ranking.rank as rank_module

    out = tmp_path / "out"
    shutil.copytree(toy_full[1].out, out)
    assert len(list((out / "rankings").glob("*.json"))) == 1
    for cell in sorted((out / "cells").iterdir())[:3]:
        cell.unlink()

    def ranked_again(*args, **kwargs):
        raise AssertionError("ranked again")

    monkeypatch.setattr(rank_module, "rank_heads", ranked_again)
    run = compute_study(parse_study(write(tmp_path, TOY)), out)
    assert len(run.computed) == 3
    assert (out / "table.json").read_bytes() == (toy_full[1].out / "table.json").read_bytes()


@pytest.mark.slow  # runs a study on the toy world
def test_a_cell_that_cannot_be_computed_is_recorded_and_the_others_go_on(tmp_path, toy_full):
    """Before: one policy that could not select (here: a concept no head carries) stopped the whole study."""
    from typer.testing import CliRunner

    from surgeon.cli import app

    out = tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    shutil.copytree(toy_full[1].out / "rankings", out / "rankings")
    text = TOY.replace("[[data]]", '[[policies]]\npolicy = "concept"\nconcept = "no-such-concept"\n\n[[data]]', 1)
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--quiet"])
    assert isinstance(result.exception, PartialResult) and result.exception.exit_code == 9, result.output
    assert "2 cell(s) could not be computed" in str(result.exception)
    table = json.loads((out / "table.json").read_text())
    rows = {r["policy"]: r for r in table["rows"]}
    assert rows["concept"]["cells"]["shape"]["value"] is None
    assert "no head is labelled 'no-such-concept'" in rows["concept"]["cells"]["shape"]["error"]
    assert rows["top-k"]["cells"]["shape"]["value"] is not None  # the others were computed
    markdown = (out / "table.md").read_text()
    assert "| toy | concept | | failed | failed |" in markdown.replace("  ", " ")
    assert "no head is labelled 'no-such-concept'" in markdown
    assert "no-such-concept" in (out / "table.csv").read_text()
    # a rerun tries only the failed cells again (they fail again: same exit code)
    rerun = compute_study(parse_study(path), out)
    assert len(rerun.computed) == 2 and len(rerun.failed) == 2 and len(rerun.reused) == TOY_CELLS


@pytest.mark.slow  # runs a study on the toy world
def test_collect_lists_every_file_it_wrote_the_plot_included(tmp_path, toy_full):
    from typer.testing import CliRunner

    from surgeon.cli import app

    path, out = write(tmp_path, TOY), tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(out), "--collect"])
    assert result.exit_code == 0, result.output
    assert "table.md, table.csv, table.json, study.png" in result.stdout.replace("\n", "")


@pytest.mark.slow  # runs a study on the toy world
def test_the_cli_says_the_finished_cells_are_kept_when_a_study_is_interrupted(tmp_path, toy_full, monkeypatch, capfd):
    """Through the CLI's entry point: before, "interrupted: nothing was written" (and exit 130)."""
    import os
    import signal
    import threading
    import warnings

    from surgeon import cli

    out = tmp_path / "out"
    shutil.copytree(toy_full[1].out / "cells", out / "cells")
    for cell in sorted((out / "cells").iterdir())[:2]:
        cell.unlink()

    def interrupted(self, key, record):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, through the CLI's handler

    monkeypatch.setattr(CellStore, "put", interrupted)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    monkeypatch.setattr(cli, "_interrupted", threading.Event())  # set by the Ctrl-C below: not for later tests
    monkeypatch.setattr(sys, "argv", ["surgeon", "study", str(write(tmp_path, TOY)), "--out", str(out), "-q"])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert exited.value.code == 130
    error = capfd.readouterr().err
    assert f"interrupted: {TOY_CELLS - 2} finished cell(s) are kept in {out / 'cells'}" in error.replace("\n", "")
    assert "nothing was written" not in error


def test_a_studys_data_sets_are_read_before_any_model_loads(tmp_path, monkeypatch):
    import surgeon.model.load

    def refused(*args, **kwargs):
        raise AssertionError("a model was loaded before the data sets were read")

    monkeypatch.setattr(surgeon.model.load, "load_model", refused)
    study = parse_study(write(tmp_path, TOY.replace('path = "toy"\nn = 20', 'path = "missing.csv"\nqueries = "q.txt"')))
    with pytest.raises(NotFound, match="manifest not found"):
        compute_study(study, tmp_path / "out")
