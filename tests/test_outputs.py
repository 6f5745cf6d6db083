"""Outputs: verified before use (surgery.json hashes, the ONNX manifest), written atomically (disk full, racing
writers, failed replaces, umask modes), temporary folders of killed writers never inputs and cleaned up, a
truncated statistics cache entry recomputed, a cancel right before publishing keeping the previous output."""

from __future__ import annotations

import errno
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

from surgeon.core.errors import CorruptInput, PreconditionFailed, StorageError
from surgeon.core.integrity import MANIFEST, write_manifest
from surgeon.core.options import RankMethod
from surgeon.core.paths import atomic_dir, is_temporary, publish_check, remove_stale_temporaries
from surgeon.exporting.export import export_existing_run
from surgeon.inputs.images import folder_images
from surgeon.model.load import load_model
from surgeon.pruning.prune import prune
from surgeon.ranking.rank import Ranking, rank_heads
from surgeon.runtime.session import ExportedModel
from surgeon.selection.policies import PolicyOptions
from tests.conftest import TAXONOMY, offline_hub_cache, run_cli, synthetic_suite


def test_disk_full_while_writing_safetensors_is_a_storage_error(tmp_path, monkeypatch, tiny_default_dir):
    """safetensors reports ENOSPC as its own SafetensorError (message from a real 1 MB tmpfs), not an OSError."""
    from safetensors import SafetensorError

    from surgeon.core.paths import atomic_dir
    from surgeon.model.checkpoint import write_local_dir

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("surgeon.model.checkpoint.save_file", full)
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    with pytest.raises(StorageError, match="No space left on device"):
        with atomic_dir(tmp_path / "out") as tmp:
            write_local_dir(loaded, tmp)
    assert list(tmp_path.iterdir()) == []
    assert StorageError.exit_code == 8


def test_validate_out_needs_force_to_replace_a_file(tmp_path):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    done = run_cli("validate", "--out", str(existing))
    code, err = done.returncode, done.stderr
    assert code == 5 and "already exists" in err and existing.read_text() == "{}"


def test_disk_full_while_exporting_leaves_nothing(setup, tmp_path, monkeypatch):
    loaded, ranking = setup

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("surgeon.model.checkpoint.save_file", full)
    out = tmp_path / "runs" / "run"
    with pytest.raises(StorageError, match="No space left on device"):
        prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=out)
    assert list((tmp_path / "runs").iterdir()) == []


def test_racing_writers_never_mix_outputs(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(PreconditionFailed, match="created by another process meanwhile"):
        with atomic_dir(final) as first:
            (first / "a.txt").write_text("first")
            with atomic_dir(final) as second:  # started before the first finished, published first
                (second / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers


def test_published_outputs_get_the_umask_modes_not_owner_only(tmp_path, monkeypatch):
    """Temporary folders and files are created 0700/0600; what is published must be readable like a plain write."""
    from surgeon.core.paths import atomic_write_text

    monkeypatch.setattr("surgeon.core.paths._UMASK", 0o022)
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
        (tmp / "sub" / "weights.bin").chmod(0o600)
    atomic_write_text(tmp_path / "card.md", "hello")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "run") == 0o755 and mode(tmp_path / "run" / "sub") == 0o755
    assert mode(tmp_path / "run" / "sub" / "weights.bin") == 0o644 and mode(tmp_path / "card.md") == 0o644


def test_a_failed_replace_keeps_the_previous_output(tmp_path, monkeypatch):
    import os

    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    real_rename = os.rename

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError(18, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr("surgeon.core.paths.os.rename", failing)
    with pytest.raises(PreconditionFailed, match="could not move"):
        with atomic_dir(final, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "old.txt").read_text() == "previous"


def _halve_a_weight(path: Path) -> None:
    """What the issue did: one weight matrix of visual.onnx scaled by 0.5 (a valid model, other numbers)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    onnx.save(model, str(path))


def test_a_tampered_onnx_is_refused_by_infer(onnx_run):

    images = ["--labels", str(onnx_run / "labels.txt")]
    (onnx_run / "labels.txt").write_text("red\nblue\n")  # outside onnx/: not part of the export
    done = run_cli("infer", str(onnx_run), *images)
    code, _ = done.returncode, done.stderr
    assert code == 0
    _halve_a_weight(onnx_run / "onnx" / "visual.onnx")
    done = run_cli("infer", str(onnx_run), *images)
    code, err = done.returncode, done.stderr
    assert code == 4 and "visual.onnx does not match the sha256 recorded in manifest.json" in err
    assert "--no-verify" in err
    done = run_cli("infer", str(onnx_run), *images, "--no-verify")
    code, _ = done.returncode, done.stderr
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


def test_a_run_without_surgery_json_is_still_checked_by_its_onnx_manifest(onnx_run, tmp_path):
    """The issue's case: a copied run, weights halved, surgery.json deleted: infer and serve-model refuse it."""
    run = _copy(onnx_run, tmp_path / "copy")
    (run / "surgery.json").unlink()
    done = run_cli("infer", str(run))
    code, _ = done.returncode, done.stderr
    assert code == 0  # untouched: its onnx/manifest.json vouches for every file
    _halve_a_weight(run / "onnx" / "visual.onnx")
    done = run_cli("infer", str(run))
    code, err = done.returncode, done.stderr
    assert code == 4 and "visual.onnx does not match the sha256 recorded in manifest.json" in err
    code, err = _serve_model(run)
    assert code == 4 and "visual.onnx does not match" in err and "Traceback" not in err
    done = run_cli("infer", str(run), "--no-verify")
    code, _ = done.returncode, done.stderr
    assert code == 0


def test_an_onnx_folder_travels_alone_and_is_still_checked(onnx_run, tmp_path):
    alone = _copy(onnx_run / "onnx", tmp_path / "onnx-alone")
    assert (alone / MANIFEST).is_file() and not (alone.parent / "surgery.json").exists()
    ExportedModel(alone)  # verified against its own manifest
    _halve_a_weight(alone / "visual.onnx")
    with pytest.raises(CorruptInput, match="visual.onnx does not match the sha256 recorded in manifest.json"):
        ExportedModel(alone)
    done = run_cli("infer", str(alone))
    code, err = done.returncode, done.stderr
    assert code == 4 and "--no-verify" in err


def test_a_folder_with_no_record_at_all_needs_the_opt_out(onnx_run, tmp_path):
    run = _copy(onnx_run, tmp_path / "copy")
    (run / "surgery.json").unlink()
    (run / "onnx" / MANIFEST).unlink()
    done = run_cli("infer", str(run))
    code, err = done.returncode, done.stderr
    assert code == 5 and "cannot be verified" in err and "--no-verify" in err
    code, err = _serve_model(run / "onnx")
    assert code == 5 and "cannot be verified" in err
    done = run_cli("infer", str(run), "--no-verify")
    code, _ = done.returncode, done.stderr
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


def test_a_link_out_of_the_export_is_one_error_line(onnx_run, tmp_path):
    """An extra file that links outside the folder was a traceback (relative_to raised ValueError)."""
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not part of the export")
    (onnx_run / "onnx" / "notes.txt").symlink_to(outside)
    with pytest.raises(CorruptInput, match="notes.txt is not listed"):
        ExportedModel(onnx_run)
    result = run_cli("infer", str(onnx_run))
    assert result.returncode == CorruptInput.exit_code and "Traceback" not in result.stderr


def test_a_hub_snapshot_of_an_export_is_verified_through_its_blobs(onnx_run, tmp_path):
    """What `surgeon validate --model hf-hub:...` tells the owner of an ONNX-only repository to run: the snapshot's
    files are links into the repository's blobs/, checked against the recorded hashes like any others."""
    hub = offline_hub_cache(tmp_path / "hub", "someone/onnx-only", onnx_run)
    snapshot = next((hub / "models--someone--onnx-only" / "snapshots").iterdir())
    assert (snapshot / "surgery.json").is_symlink()
    ExportedModel(snapshot)  # verified: no error
    blob = (snapshot / "onnx" / "visual.onnx").resolve()
    blob.chmod(0o644)
    with blob.open("r+b") as handle:  # a changed blob is still caught
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    with pytest.raises(CorruptInput, match="does not match the sha256"):
        ExportedModel(snapshot)


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


def test_a_truncated_statistics_cache_entry_is_recomputed(tiny_default_dir, image_folder, tmp_path):
    from surgeon.core.paths import cache_dir
    from surgeon.inputs.pools import TextPool
    from surgeon.model.load import load_model

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


def test_infer_skips_unreadable_images_with_a_count(onnx_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    (onnx_run / "labels.txt").write_text("red\nblue\n")
    done = run_cli("infer", str(onnx_run), str(folder), "--labels", str(onnx_run / "labels.txt"))
    code, err = done.returncode, done.stderr
    assert code == 0 and "skipped 1 unreadable image(s)" in err
    (folder / "a.png").write_bytes(b"")
    done = run_cli("infer", str(onnx_run), str(folder), "--labels", str(onnx_run / "labels.txt"))
    code, err = done.returncode, done.stderr
    assert code == 4 and "none of the 2 image(s) is readable" in err


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_the_working_folder_is_never_an_output(onnx_run, tmp_path, out):
    """`--out .` was a traceback (Path('.').with_name); with --force it would have replaced the folder the
    shell is in. Refused before any work, the folder untouched."""
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "keep.txt").write_text("mine")
    for args in (["triton-repo", str(onnx_run), "--out", out, "--force"], ["validate", "--out", out, "--force"]):
        result = run_cli(*args, cwd=here)
        assert result.returncode == 2 and "is the working folder or holds it" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and (here / "keep.txt").read_text() == "mine"
