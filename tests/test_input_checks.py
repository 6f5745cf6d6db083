"""Every input file is read and checked before any model loads: a malformed one fails in seconds with one line
naming the file, the line and what to write (issue 23.4), never after a minute of loading and ranking."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from surgeon.core.errors import InvalidInput, NotFound
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Photos in two groups, two classes, and the text files around them."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "classes" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "classes" / cls / f"{i}.png")
    (root / "bias").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "bias" / f"face{i}.png")
    (root / "queries.txt").write_text("a doctor\na nurse\n")
    return root


def bias_csv(root: Path, text: str, name: str = "bias.csv") -> Path:
    path = root / "bias" / name
    path.write_text(text, encoding="utf-8")
    return path


GROUPS = "".join(f"face{i}.png,{'a' if i % 2 else 'b'}\n" for i in range(8))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if anything loads a model: the checks must all come first."""
    import surgeon.model.load

    def refused(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(surgeon.model.load, "load_model", refused)


def refused_before_loading(args: list[str], error: type, *fragments: str) -> str:
    from surgeon.cli import app

    result = CliRunner().invoke(app, args)  # `no_model_load` proves the order; the real CLI's time is below
    assert isinstance(result.exception, error), result.output
    message = str(result.exception)
    for fragment in fragments:
        assert fragment in message, message
    return message


CHECKPOINT = ["--model", "ViT-S-32", "--pretrained", "vit.safetensors"]


def test_a_bias_manifest_with_a_header_row_is_read_as_its_header(files):
    """Before: `image,race` was read as a row and failed "image not found: bias/image" after a minute."""
    from surgeon.validation.validate import bias_set

    with_header = bias_set(bias_csv(files, "image,race\n" + GROUPS), files / "queries.txt", k=4)
    without = bias_set(bias_csv(files, GROUPS, "plain.csv"), files / "queries.txt", k=4)
    assert len(with_header.images) == len(without.images) == 8
    assert with_header.group_names == ["a", "b"] and (with_header.groups == without.groups).all()
    bom = bias_set(bias_csv(files, "\ufeffpath,race\n" + GROUPS, "bom.csv"), files / "queries.txt", k=4)
    assert len(bom.images) == 8  # a spreadsheet's byte-order mark is not part of the first cell


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("image,race\nface0.png,a\nface9.png,b\n", ["bias.csv line 3: image 'face9.png' not found", "relative to"]),
        ("image,race\nface0.png,a\nface1.png\n", ["bias.csv line 3: 1 column(s), 2 needed", "write path,group"]),
        ("image,race\nface0.png,a\nface1.png,\n", ["bias.csv line 3: 2 column(s)"]),
        ("image,race\nface0.png,a\nface1.png,a\n", ["every image is in group 'a'", "path,race"]),
        ("image,race\n", ["has no rows", "path,group"]),
        ("image,race\n" + GROUPS, ["lists 8 images; MaxSkew@10 ranks the top 10", "smaller --skew-k"]),
    ],
)
def test_a_malformed_bias_manifest_is_refused_before_the_model_loads(files, no_model_load, text, fragments):
    manifest = bias_csv(files, text)
    skew_k = ["--skew-k", "2"] if "MaxSkew@10" not in fragments[0] else []
    args = ["validate", *CHECKPOINT, *skew_k, "--data", str(files / "classes"), "--bias-data", str(manifest)]
    refused_before_loading([*args, "--queries", str(files / "queries.txt")], InvalidInput, *fragments)


def test_debias_without_a_bias_set_is_refused_before_the_model_loads_and_names_the_options(files, no_model_load):
    """Before: "the debias policy needs a bias set" came after the model had loaded, naming no option."""
    message = refused_before_loading(
        ["prune", *CHECKPOINT, "--policy", "debias", "--data", str(files / "classes"), "--images", str(files)],
        InvalidInput,
        "the debias policy needs a bias set",
    )
    assert "--bias-data" in message and "--queries" in message


@pytest.mark.parametrize(
    "option, text, error, fragments",
    [
        ("--queries", "", InvalidInput, ["queries file", "is empty"]),
        ("--templates", "a photo of a thing\n", InvalidInput, ["has no {} or {c} for the class name"]),
        ("--classnames", "cat\ndog\nbird\n", InvalidInput, ["has 3 names for 2 classes"]),
    ],
)
def test_malformed_text_files_are_refused_before_the_model_loads(
    files, tmp_path, no_model_load, option, text, error, fragments
):
    path = tmp_path / "file.txt"
    path.write_text(text)
    manifest = bias_csv(files, "image,race\n" + GROUPS)
    args = ["validate", *CHECKPOINT, "--skew-k", "2", "--data", str(files / "classes"), "--bias-data", str(manifest)]
    args += ["--queries", str(files / "queries.txt")] if option != "--queries" else []
    refused_before_loading([*args, option, str(path)], error, *fragments)


def test_a_rank_text_pool_is_read_before_the_model_loads(files, tmp_path, no_model_load):
    """Before: `rank` loaded the model, then read --texts."""
    refused_before_loading(
        ["rank", *CHECKPOINT, "--images", str(files / "bias"), "--texts", str(tmp_path / "missing.txt")],
        NotFound,
        "text pool not found",
    )


def test_the_real_cli_reads_a_headed_manifest_and_refuses_a_broken_one_in_one_line(files, vit_file):
    """End to end with a real checkpoint file: the header row works; a missing image is exit 2 in seconds."""
    base = ["validate", "--model", "ViT-S-32", "--pretrained", str(vit_file), "-q"]
    base += ["--skew-k", "4"]
    base += ["--data", str(files / "classes"), "--queries", str(files / "queries.txt"), "--bias-data"]
    good = run_cli(*base, str(bias_csv(files, "image,race\n" + GROUPS)))
    assert good.returncode == 0, good.stderr
    broken = bias_csv(files, "image,race\nface0.png,a\nface9.png,b\n", "broken.csv")
    started = time.monotonic()
    bad = run_cli(*base, str(broken))
    # ~5 s on an idle machine (the torch import); the bound leaves room for a loaded CI machine
    assert bad.returncode == 2 and time.monotonic() - started < 30
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: manifest") and "broken.csv line 3" in lines[0] and "Traceback" not in bad.stderr
