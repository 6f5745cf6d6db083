"""ImageFolder and manifest validation skip unreadable images (0 bytes, truncated, decompression bombs) with a
count, as `rank` does and the README promises, and score the images that remain with their own labels."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from surgeon.core.errors import CorruptInput
from surgeon.model.load import load_model
from surgeon.validation.validate import (
    Evaluator,
    ValidationSuite,
    bias_set,
    classification_set,
    markdown_report,
    validate,
)
from tests.conftest import run_cli

N_IMAGES = 16


def _bomb_png() -> bytes:
    """A 100-byte PNG whose header declares 20000 x 20000 pixels (400 M, over the 64 M limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """(clean ImageFolder of toy shapes, the same folder plus a 0-byte, a truncated and a bomb PNG)."""
    from surgeon.inputs.toy import world

    task = next(t for t in world.zeroshot_tasks(n=N_IMAGES) if t.name == "shape")
    root = tmp_path_factory.mktemp("unreadable")
    clean, dirty = root / "clean", root / "dirty"
    for i, (image, label) in enumerate(zip(task.images, task.labels, strict=True)):
        for folder in (clean, dirty):
            path = folder / task.classnames[label] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    first, second = sorted(p.name for p in dirty.iterdir())[:2]
    (dirty / first / "000-empty.png").write_bytes(b"")
    good = next((dirty / first).glob("0*.png")).read_bytes()
    (dirty / second / "000-truncated.png").write_bytes(good[: len(good) // 2])
    (dirty / second / "001-bomb.png").write_bytes(_bomb_png())
    return clean, dirty


def test_unreadable_images_are_skipped_with_a_count(shapes):
    clean, dirty = shapes
    loaded = load_model(None, device="cpu")
    expected = validate(loaded, ValidationSuite([classification_set(clean)], source="files"))["results"][0]
    for cache in (False, True):  # a one-off validation streams; sweeps and the debias search keep prefixes
        evaluator = Evaluator(loaded, ValidationSuite([classification_set(dirty)], source="files"), cache=cache)
        got = evaluator.evaluate()["results"][0]
        assert got["skipped_images"] == 3 and "dirty" in got["skipped_example"]
        assert got["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)  # the same images, the same labels
    assert "skipped_images" not in expected


def test_the_cli_says_how_many_were_skipped(shapes, tmp_path):
    _, dirty = shapes
    done = run_cli("validate", "--data", str(dirty), "--out", str(tmp_path / "v"))
    code, _ = done.returncode, done.stderr
    report = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert code == 0 and report["results"][0]["skipped_images"] == 3
    lines = markdown_report(report).splitlines()
    assert any(line.startswith("Skipped 3 unreadable image(s) of dirty, e.g. ") for line in lines)


def test_a_bias_manifest_keeps_its_groups_aligned(shapes, tmp_path):
    clean, dirty = shapes
    files = sorted(p.relative_to(dirty).as_posix() for p in dirty.rglob("*.png"))
    rows = ["path,group"] + [f"{f},{'ab'[i % 2]}" for i, f in enumerate(files)]
    (dirty / "bias.csv").write_text("\n".join(rows) + "\n")
    readable = [r for r in rows[1:] if "empty" not in r and "truncated" not in r and "bomb" not in r]
    (dirty / "clean-bias.csv").write_text("\n".join(["path,group", *readable]) + "\n")
    queries = tmp_path / "queries.txt"
    queries.write_text("a photo\na shape\n")
    loaded = load_model(None, device="cpu")
    with_bad = bias_set(dirty / "bias.csv", queries, k=4)
    without = bias_set(dirty / "clean-bias.csv", queries, k=4)
    got = validate(loaded, ValidationSuite([], with_bad, source="files"))["results"][0]
    expected = validate(loaded, ValidationSuite([], without, source="files"))["results"][0]
    assert got["skipped_images"] == 3
    scalars = [k for k, v in expected["metrics"].items() if isinstance(v, float)]
    assert len(scalars) >= 3 and all(
        got["metrics"][k] == pytest.approx(expected["metrics"][k], abs=1e-6) for k in scalars
    )
    assert got["metrics"]["group_share@4_per_query"] == expected["metrics"]["group_share@4_per_query"]


def test_a_set_with_no_readable_image_is_an_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.png").write_bytes(b"")
    loaded = load_model(None, device="cpu")
    with pytest.raises(CorruptInput, match=r"none of the 2 images of (\S+/)?data is readable"):
        validate(loaded, ValidationSuite([classification_set(tmp_path / "data")], source="files"))
    done = run_cli("validate", "--data", str(tmp_path / "data"))
    code, err = done.returncode, done.stderr
    assert code == 4 and "none of the 2 images" in err and "Traceback" not in err
