"""Reading user inputs: images in odd modes or truncated, CSV manifests and their labels (integer, named,
negative, with a byte order mark), class-names files, text pools that are FIFOs, JSON files of any content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.inputs.images import open_image
from surgeon.validation.validate import classification_set
from tests.conftest import run_cli


def _manifest(tmp_path: Path, labels: list[str]) -> Path:
    rows = ["path,label"]
    for i, label in enumerate(labels):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{label}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_integer_csv_labels_index_classnames(tmp_path):
    from surgeon.validation.validate import classification_set

    names = [f"class{i}" for i in range(12)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    task = classification_set(_manifest(tmp_path, ["2", "10", "0"]), tmp_path / "names.txt")
    assert task.labels.tolist() == [2, 10, 0]
    assert task.classnames == names


@pytest.mark.parametrize(
    "labels, names, message",
    [
        (["2", "cat"], ["cat", "dog", "x"], "mixes class indices and class names"),
        (["0", "3"], ["cat", "dog"], "label 3"),
        (["0", "1"], None, "integer labels"),
        (["cat", "cow"], ["cat", "dog"], "not in"),
    ],
)
def test_csv_label_mismatches_are_errors(tmp_path, labels, names, message):
    from surgeon.validation.validate import classification_set

    names_file = None
    if names is not None:
        names_file = tmp_path / "names.txt"
        names_file.write_text("\n".join(names) + "\n")
    with pytest.raises(InvalidInput, match=message):
        classification_set(_manifest(tmp_path, labels), names_file)


def test_name_labels_follow_the_classnames_order(tmp_path):
    from surgeon.validation.validate import classification_set

    (tmp_path / "names.txt").write_text("dog\ncat\n")
    task = classification_set(_manifest(tmp_path, ["cat", "dog", "cat"]), tmp_path / "names.txt")
    assert task.classnames == ["dog", "cat"] and task.labels.tolist() == [1, 0, 1]


def test_a_fifo_as_text_pool_is_refused_not_read(tmp_path):
    import os

    fifo = tmp_path / "pool.txt"
    os.mkfifo(fifo)  # reading it would block forever
    done = run_cli("rank", "--texts", str(fifo))
    code, err = done.returncode, done.stderr
    assert code == 2 and "not a regular file" in err


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name)


def test_a_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header is still a header, the first class name still itself."""
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,cat\nb.png,dog\nc.png,cat\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    task = classification_set(manifest)
    assert task.classnames == ["cat", "dog"] and list(task.labels) == [0, 1, 0]
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n", encoding="utf-8-sig")
    manifest.write_text("path,label\na.png,1\nb.png,0\nc.png,1\n", encoding="utf-8-sig")
    task = classification_set(manifest, names)
    assert task.classnames == ["dog", "cat"] and list(task.labels) == [1, 0, 1]


def test_a_negative_manifest_label_says_so(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n")
    manifest = tmp_path / "val.csv"
    manifest.write_text("path,label\na.png,1\nb.png,-1\n")
    with pytest.raises(InvalidInput, match=r"has label -1, but .*names.txt names 2 classes \(indices 0..1\)"):
        classification_set(manifest, names)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("CMYK", ".jpg"), ("L", ".png"), ("I;16", ".png"), ("RGBA", ".png"), ("LA", ".png"), ("P", ".gif"), ("1", ".bmp")],
)
def test_odd_image_modes_are_converted_to_rgb(tmp_path, mode, suffix):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    image = (
        base.convert(mode)
        if mode not in ("I;16",)
        else Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    )
    path = tmp_path / f"img{suffix}"
    image.save(path)
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode == "I;16":  # 16-bit greys are scaled to 8 bits, not clipped to white
        assert 20 < np.asarray(rgb).mean() < 235


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_images_are_refused(tmp_path, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    with pytest.raises(CorruptInput, match="unreadable image"):
        open_image(path)


def test_json_files_are_read_with_one_clear_error_whatever_they_hold(tmp_path):
    """A FIFO is refused before it is opened (reading it would block); nesting and number sizes that Python's
    json refuses are corrupt input, not a RecursionError or ValueError traceback."""
    import os

    from surgeon.core.errors import NotFound
    from surgeon.core.paths import read_json, read_json_object

    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "digits.json").write_text("1" * 5000)
    (tmp_path / "list.json").write_text("[1]")
    for name, error in [("fifo", "not a regular file"), ("deep", "not valid JSON"), ("digits", "not valid JSON")]:
        with pytest.raises(CorruptInput, match=error):
            read_json(tmp_path / f"{name}.json", "plan")
    with pytest.raises(CorruptInput, match="not a JSON object"):
        read_json_object(tmp_path / "list.json", "plan")
    with pytest.raises(NotFound):
        read_json(tmp_path / "missing.json", "plan")
