"""Outputs are verified before use (surgery.json hashes), temporary folders of killed
writers are never inputs and get cleaned up, a truncated statistics cache entry is recomputed, and a
cancel right before publishing leaves the previous output as it was."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from surgeon.errors import CorruptInput, PreconditionFailed
from surgeon.export import export_existing_run
from surgeon.images import folder_images
from surgeon.integrity import MANIFEST, write_manifest
from surgeon.options import RankMethod
from surgeon.paths import atomic_dir, is_temporary, publish_check, remove_stale_temporaries
from surgeon.policies import PolicyOptions
from surgeon.prune import prune
from surgeon.rank import Ranking, rank_heads
from surgeon.runtime.session import ExportedModel
from tests.test_hardening_bounds import run_cli
from tests.test_prune_export import TAXONOMY, setup, synthetic_suite  # noqa: F401  (fixture)


@pytest.fixture
def onnx_run(setup, tmp_path) -> Path:  # noqa: F811
    loaded, ranking = setup
    out = tmp_path / "run"
    formats = ["safetensors", "onnx"]
    prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=out, exporters=formats)
    return out


def _halve_a_weight(path: Path) -> None:
    """What the issue did: one weight matrix of visual.onnx scaled by 0.5 (a valid model, other numbers)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    onnx.save(model, str(path))


def test_a_tampered_onnx_is_refused_by_infer(onnx_run, capsys):

    images = ["--labels", str(onnx_run / "labels.txt")]
    (onnx_run / "labels.txt").write_text("red\nblue\n")  # outside onnx/: not part of the export
    code, _ = run_cli("infer", str(onnx_run), *images, capsys=capsys)
    assert code == 0
    _halve_a_weight(onnx_run / "onnx" / "visual.onnx")
    code, err = run_cli("infer", str(onnx_run), *images, capsys=capsys)
    assert code == 4 and "visual.onnx does not match the sha256 recorded in manifest.json" in err
    assert "--no-verify" in err
    code, _ = run_cli("infer", str(onnx_run), *images, "--no-verify", capsys=capsys)
    assert code == 0
    with pytest.raises(CorruptInput):
        ExportedModel(onnx_run / "onnx")  # the onnx/ folder itself: surgery.json is in its parent


def _serve_model(export: Path) -> tuple[int, str]:
    """`surgeon serve-model EXPORT` in a child process (MLServer's protobuf registry clashes with tritonclient's)
    with its REST port taken: an export that passed verification would stop there with "cannot listen"."""
    code = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])  # this checkout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        command = [sys.executable, "-m", "surgeon", "serve-model", str(export), "--http-port", port]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": code}
        )
    return done.returncode, done.stderr


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_run_without_surgery_json_is_still_checked_by_its_onnx_manifest(onnx_run, tmp_path, capsys):
    """The issue's case: a copied run, weights halved, surgery.json deleted: infer and serve-model refuse it."""
    run = _copy(onnx_run, tmp_path / "copy")
    (run / "surgery.json").unlink()
    code, _ = run_cli("infer", str(run), capsys=capsys)
    assert code == 0  # untouched: its onnx/manifest.json vouches for every file
    _halve_a_weight(run / "onnx" / "visual.onnx")
    code, err = run_cli("infer", str(run), capsys=capsys)
    assert code == 4 and "visual.onnx does not match the sha256 recorded in manifest.json" in err
    code, err = _serve_model(run)
    assert code == 4 and "visual.onnx does not match" in err and "Traceback" not in err
    code, _ = run_cli("infer", str(run), "--no-verify", capsys=capsys)
    assert code == 0


def test_an_onnx_folder_travels_alone_and_is_still_checked(onnx_run, tmp_path, capsys):
    alone = _copy(onnx_run / "onnx", tmp_path / "onnx-alone")
    assert (alone / MANIFEST).is_file() and not (alone.parent / "surgery.json").exists()
    ExportedModel(alone)  # verified against its own manifest
    _halve_a_weight(alone / "visual.onnx")
    with pytest.raises(CorruptInput, match="visual.onnx does not match the sha256 recorded in manifest.json"):
        ExportedModel(alone)
    code, err = run_cli("infer", str(alone), capsys=capsys)
    assert code == 4 and "--no-verify" in err


def test_a_folder_with_no_record_at_all_needs_the_opt_out(onnx_run, tmp_path, capsys):
    run = _copy(onnx_run, tmp_path / "copy")
    (run / "surgery.json").unlink()
    (run / "onnx" / MANIFEST).unlink()
    code, err = run_cli("infer", str(run), capsys=capsys)
    assert code == 5 and "cannot be verified" in err and "--no-verify" in err
    code, err = _serve_model(run / "onnx")
    assert code == 5 and "cannot be verified" in err
    code, _ = run_cli("infer", str(run), "--no-verify", capsys=capsys)
    assert code == 0


def test_a_rewritten_manifest_does_not_vouch_for_tampered_weights(onnx_run, tmp_path):
    """Inside its run, the manifest is itself checked against surgery.json: tampering both files is caught."""
    run = _copy(onnx_run, tmp_path / "copy")
    _halve_a_weight(run / "onnx" / "visual.onnx")
    write_manifest(run / "onnx")  # the tamperer recomputes the manifest
    with pytest.raises(CorruptInput, match="manifest.json does not match the sha256 recorded in surgery.json"):
        ExportedModel(run)
    record = json.loads((run / "surgery.json").read_text())
    del record["sha256"]["onnx/manifest.json"]  # ... and drops it from surgery.json
    (run / "surgery.json").write_text(json.dumps(record))
    with pytest.raises(CorruptInput, match="manifest.json is not listed in"):
        ExportedModel(run)


def test_an_unlisted_file_in_the_export_is_refused(onnx_run):

    (onnx_run / "onnx" / "extra.onnx").write_bytes(b"x")
    with pytest.raises(CorruptInput, match="not listed"):
        ExportedModel(onnx_run)


def test_export_refuses_tampered_weights(onnx_run, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = onnx_run / "open_clip_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("proj"))
    tensors[name] = tensors[name] * 0.5
    save_file(tensors, str(weights))
    with pytest.raises(CorruptInput, match="open_clip_model.safetensors does not match"):
        export_existing_run(onnx_run, ["safetensors"], tmp_path / "re")
    assert not (tmp_path / "re").exists()
    export_existing_run(onnx_run, ["safetensors"], tmp_path / "re", verify=False)
    assert (tmp_path / "re" / "surgery.json").is_file()


def test_a_run_without_surgery_json_needs_the_opt_out(onnx_run, tmp_path):
    (onnx_run / "surgery.json").unlink()
    with pytest.raises(PreconditionFailed, match="cannot be verified"):
        export_existing_run(onnx_run, ["safetensors"], tmp_path / "re")


# ---- temporary folders of killed writers ----


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_folders_are_never_inputs(onnx_run, tmp_path):
    hidden = onnx_run.with_name(f".run.tmp-{_dead_pid()}-abcd")
    os.rename(onnx_run, hidden)
    assert is_temporary(hidden) and is_temporary(hidden / "onnx") and not is_temporary(tmp_path / "run")
    with pytest.raises(PreconditionFailed, match="unfinished"):
        export_existing_run(hidden, ["safetensors"], tmp_path / "re")
    with pytest.raises(PreconditionFailed, match="unfinished"):
        Ranking.read(hidden)

    with pytest.raises(PreconditionFailed, match="unfinished"):
        ExportedModel(hidden)


def test_stale_temporaries_are_removed_by_the_next_writer(tmp_path):
    dead = _dead_pid()
    old = time.time() - 7200
    entries = {
        "stale": tmp_path / f".a.tmp-{dead}-x1",  # a killed writer's, two hours old: removed
        "fresh": tmp_path / f".b.tmp-{dead}-x2",  # a dead writer's but recent: kept (grace period)
        "alive": tmp_path / f".c.tmp-{os.getpid()}-x3",  # a live writer's (this process): kept
        "old-file": tmp_path / f".d.json.tmp-{dead}-x4",  # atomic_write_text's files too
    }
    for name, path in entries.items():
        path.mkdir() if "file" not in name else path.write_text("{")
        if name != "fresh":
            os.utime(path, (old, old))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", entries["fresh"].name, entries["alive"].name])
    assert remove_stale_temporaries(tmp_path, older_than=0) == [entries["fresh"]]


# ---- a truncated statistics cache entry ----


def test_a_truncated_statistics_cache_entry_is_recomputed(tiny_default_dir, image_folder, tmp_path):
    from surgeon.load import load_model
    from surgeon.paths import cache_dir
    from surgeon.pools import TextPool

    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    pool = TextPool("t", ("a red dog", "a blue cat", "green bird", "a red cat", "a dog", "blue"), TAXONOMY)

    def ranked(**method):
        return rank_heads(
            loaded, folder_images(image_folder), pool, RankMethod(layers="1-2", m=3, **method), quiet=True
        )

    first = ranked()
    (entry,) = (cache_dir() / "stats").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated: was exit 4 on every later rank, no hint
    with pytest.warns(UserWarning, match="corrupt statistics file .* recomputing"):
        again = ranked()
    assert not again.cached_stats and again.to_dict()["heads"] == first.to_dict()["heads"]
    assert ranked().cached_stats  # replaced by a good entry
    entry.write_bytes(b"")
    ranked(use_cache=False)  # --no-cache replaces a corrupt entry too
    assert ranked().cached_stats


# ---- publishing is the point of no return ----


def test_a_check_before_publishing_keeps_the_previous_output(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "plan.json").write_text("old")

    class Stop(Exception):
        pass

    def cancelled(_final):
        raise Stop()

    with pytest.raises(Stop), publish_check(cancelled):
        with atomic_dir(final, force=True) as tmp:
            (tmp / "plan.json").write_text("new")
    assert (final / "plan.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_sigterm_unwinds_like_ctrl_c(onnx_run, tmp_path):
    """SIGTERM (docker stop, kill) unwinds the CLI like Ctrl-C: no temporary folder is left behind."""
    import signal

    from tests.test_hardening_cli import surgeon

    target = tmp_path / "exp" / "onnx"
    proc = surgeon("export", str(onnx_run), "--format", "onnx", "--out", str(target))
    deadline = time.monotonic() + 300
    while not list(target.parent.glob(".onnx.tmp-*")):  # inside the export: its temporary folder exists
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted" in stderr, (stdout, stderr)
    assert list(target.parent.iterdir()) == []


def test_infer_skips_unreadable_images_with_a_count(onnx_run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    (onnx_run / "labels.txt").write_text("red\nblue\n")
    code, err = run_cli("infer", str(onnx_run), str(folder), "--labels", str(onnx_run / "labels.txt"), capsys=capsys)
    assert code == 0 and "skipped 1 unreadable image(s)" in err
    (folder / "a.png").write_bytes(b"")
    code, err = run_cli("infer", str(onnx_run), str(folder), "--labels", str(onnx_run / "labels.txt"), capsys=capsys)
    assert code == 4 and "none of the 2 image(s) is readable" in err
