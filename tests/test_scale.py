"""Real checkpoints at real scale: cached text embeddings, per-batch progress, explicit data, presets
without ranking, TorchScript archives, the cache command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from surgeon.core.errors import InvalidInput, NotFound
from surgeon.core.options import OnnxExport
from surgeon.inputs.images import folder_images, resolve_images
from surgeon.inputs.pools import TextPool
from surgeon.inputs.textcache import pool_embeddings, text_cache_path, text_key
from surgeon.model.load import load_model
from surgeon.pruning.prune import prune
from surgeon.ranking import collect, textspan
from surgeon.selection.policies import PolicyOptions, check_paper_preset, debias_bound
from surgeon.validation.validate import build_suite
from tests.conftest import run_cli

POOL = TextPool("t", ("a red dog", "a blue cat", "three birds", "Paris at night", "a green car"), {"concepts": {}})


@pytest.fixture
def tiny(tiny_default_dir):
    return load_model(f"local-dir:{tiny_default_dir}", device="cpu")


def test_text_embeddings_are_cached_and_equal_a_plain_encode(tiny):
    first, cached = pool_embeddings(tiny, POOL, batch_size=2, quiet=True)
    assert not cached and text_cache_path(text_key(tiny, POOL)).is_file()
    with torch.no_grad():
        plain = tiny.model.encode_text(tiny.tokenizer(list(POOL.lines)), normalize=True)
    assert torch.allclose(first, plain, atol=1e-6)
    again, cached = pool_embeddings(tiny, POOL, quiet=True)
    assert cached and torch.equal(again, first)
    _, cached = pool_embeddings(tiny, POOL, quiet=True, use_cache=False)
    assert not cached


def test_text_key_follows_the_text_tower_and_the_pool_only(tiny):
    key = text_key(tiny, POOL)
    with torch.no_grad():
        tiny.model.visual.proj.add_(1.0)  # the image tower does not change a text embedding
    assert text_key(tiny, POOL) == key
    assert text_key(tiny, TextPool("t", POOL.lines[:-1], {})) != key
    tiny.tokenizer.context_length = 8  # another tokenizer setting: other tokens
    assert text_key(tiny, POOL) != key
    tiny.tokenizer.context_length = 16
    assert text_key(tiny, POOL) == key
    with torch.no_grad():
        tiny.model.token_embedding.weight[0, 0] += 1.0
    assert text_key(tiny, POOL) != key
    tiny.model_cfg = {**tiny.model_cfg, "quick_gelu": True}  # same weights, another activation
    assert text_key(tiny, POOL) != key


def test_a_corrupt_text_cache_entry_is_re_encoded(tiny):
    path = text_cache_path(text_key(tiny, POOL))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    embeddings, cached = pool_embeddings(tiny, POOL, quiet=True)
    assert not cached and embeddings.shape[0] == len(POOL.lines)
    assert pool_embeddings(tiny, POOL, quiet=True)[1]


def recording_bar(calls: dict):
    @contextmanager
    def bar(description, total, quiet=False):
        calls[description] = {"total": total, "steps": []}
        yield calls[description]["steps"].append

    return bar


def test_bars_advance_per_batch(tiny, image_folder, monkeypatch):
    calls: dict = {}
    monkeypatch.setattr(collect, "progress_bar", recording_bar(calls))
    monkeypatch.setattr(textspan, "progress_bar", recording_bar(calls))
    import surgeon.inputs.textcache as textcache

    monkeypatch.setattr(textcache, "progress_bar", recording_bar(calls))
    images = folder_images(image_folder)  # 24 images
    # one checkpoint chunk of 3 batches of 5: the bar still moves once per batch
    stats = collect.accumulate(tiny, images, (1, 2), batch_size=5, on_chunk=lambda *_: None, chunk_batches=3)
    steps = [s for s in calls["head statistics"]["steps"] if s]
    assert steps == [5, 5, 5, 5, 4] and calls["head statistics"]["total"] == 24
    pool_embeddings(tiny, POOL, batch_size=2, quiet=True)
    assert calls["text encoding"]["steps"] == [2, 2, 1]
    textspan.textspan_all(stats, torch.randn(5, tiny.embed_dim).double(), m=2, span_rank=4)
    assert calls["TextSpan"] == {"total": 8, "steps": [1] * 8}


def test_validation_and_debias_search_bars(setup, monkeypatch):
    from surgeon.pruning import prune as prune_module
    from surgeon.validation import validate as validate_module
    from tests.conftest import synthetic_suite

    loaded, ranking = setup
    calls: dict = {}
    monkeypatch.setattr(validate_module, "progress_bar", recording_bar(calls))
    monkeypatch.setattr(prune_module, "progress_bar", recording_bar(calls))
    validate_module.validate(loaded, synthetic_suite(), batch_size=16, bar="validation")
    assert calls["validation"] == {"total": 70, "steps": [16, 16, 8, 16, 14]}  # 40 task images, 30 bias images
    suite = synthetic_suite()
    suite.bias.k = 4  # debias splits the suite: 10 bias images per third
    try:
        result = prune(loaded, ranking, suite, "debias", PolicyOptions(k=2, max_acc_drop=100), quiet=False)
    except InvalidInput:  # random weights may hold no head that lowers bias reliably: the search bar still counts
        result = None
    bound = debias_bound(len(ranking.heads), 2, PolicyOptions().candidates)
    search = calls[f"debias search (at most {bound} head sets)"]
    assert search["total"] == bound and set(search["steps"]) == {1} and len(search["steps"]) <= bound
    assert len(search["steps"]) >= 1 + len(ranking.heads)  # the baseline, then every head alone
    if result is not None:  # before/after run on the report split only: 20 task images + 10 bias images
        assert calls["validation before"]["total"] == calls["validation after"]["total"] == 30
        assert sum(calls["validation after"]["steps"]) == 30 and result.plan.heads


def test_real_models_need_their_data_named(tiny_default_dir, tmp_path):
    model = f"local-dir:{tiny_default_dir}"
    with pytest.raises(InvalidInput, match="not the toy model.*\n.*--images FOLDER.*--images toy"):
        resolve_images(None, None, model)
    with pytest.raises(InvalidInput, match="not the toy model.*\n.*--data FOLDER.*--data toy"):
        build_suite(model=model)
    assert resolve_images("toy", 3, model).count == 3  # asked for: fine
    assert resolve_images(None, 3).count == 3 and resolve_images(None, 3, "toy").count == 3
    assert build_suite(Path("toy"), model=model).source == "toy"
    # before loading anything: one line, exit 2, nothing written
    rank = run_cli("rank", "--model", model, "--out", str(tmp_path / "r"))
    assert rank.returncode == 2 and "not the toy model" in rank.stderr and "Traceback" not in rank.stderr
    validate = run_cli("validate", "--model", model)
    assert validate.returncode == 2 and "--data toy" in validate.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_preset_for_a_checkpoint_file_says_what_to_pass(tmp_path):
    with pytest.raises(NotFound, match="checkpoint file .*openai.*\n.*--policy heads --heads L11.H5,L10.H8"):
        check_paper_preset("high", "ViT-B-32", str(tmp_path / "vit.safetensors"))
    with pytest.raises(NotFound, match="no paper preset for toy"):
        check_paper_preset("low", None, None)
    assert check_paper_preset("low", "ViT-B-32", "openai").startswith("L8.H5")
    # the CLI says so before loading the (missing) checkpoint or ranking
    result = run_cli(
        "prune",
        "--model",
        "ViT-B-32",
        "--pretrained",
        str(tmp_path / "vit.safetensors"),
        "--policy",
        "paper-high",
        "--images",
        str(tmp_path),
    )
    assert result.returncode == 3 and "--policy heads --heads L11.H5" in result.stderr, result.stderr


def test_ranking_free_policies_skip_ranking_and_infer_finds_the_exports_labels(tiny, tmp_path, monkeypatch):
    from surgeon.cli import app
    from surgeon.core.paths import cache_dir
    from tests.conftest import synthetic_suite

    labels = tmp_path / "classes.txt"
    labels.write_text("red\nblue\ndog\n")
    out = tmp_path / "run"
    result = prune(
        tiny,
        None,
        synthetic_suite(),
        "heads",
        PolicyOptions(heads="L2.H1,L1.H0"),
        out_dir=out,
        exporters=["safetensors", "onnx"],
        onnx=OnnxExport(labels, 1e-4),
    )
    assert [h.head for h in result.plan.heads] == ["L1.H0", "L2.H1"] and result.plan.ranking_sha256 is None
    assert not (out / "ranking.json").exists() and not (cache_dir() / "stats").exists()  # no ranking happened
    onnx_dir = out / "onnx"  # classifier.onnx reads the visual tower's weights from visual.onnx's data file
    visual_size = sum((onnx_dir / n).stat().st_size for n in ("visual.onnx", "visual.onnx.data"))
    assert (onnx_dir / "classifier.onnx").stat().st_size < 0.2 * visual_size
    for name in ("report.md", "README.md"):  # the measured ONNX parity, where a user reads about the export
        text = (out / name).read_text()
        assert "| visual.onnx |" in text and "| classifier.onnx |" in text and "| 0.0001 |" in text
    with pytest.raises(InvalidInput, match="the top-k policy needs a ranking"):
        prune(tiny, None, synthetic_suite(), "top-k", PolicyOptions(k=1))
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(image)
    monkeypatch.chdir(out)  # `surgeon infer . IMG --labels labels.txt` from the run folder
    shown = CliRunner().invoke(app, ["infer", ".", str(image), "--labels", "labels.txt", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["predictions"][0]["top"][0]["label"] in ("red", "blue", "dog")
    baked = CliRunner().invoke(app, ["infer", ".", str(image), "--json"])  # classifier.onnx + the shared weights
    assert baked.exit_code == 0, baked.output
    assert json.loads(baked.output)["predictions"][0]["top"][0]["label"] in ("red", "blue", "dog")


def test_cli_prints_warnings_as_one_line_and_no_no_no_cache(capsys):
    import warnings

    from surgeon import cli

    cli._show_warning(
        UserWarning("ViT-B-32 has no --pretrained weights: using a random initialisation"), UserWarning, "load.py", 1
    )
    assert capsys.readouterr().err.strip() == (
        "warning: ViT-B-32 has no --pretrained weights: using a random initialisation"
    )
    assert warnings.showwarning is not cli._show_warning  # installed by main() only
    shown = CliRunner().invoke(cli.app, ["rank", "--help"], terminal_width=200)
    assert "--no-cache" in shown.output and "--no-no-cache" not in shown.output


def test_rank_without_a_terminal_prints_the_top_of_the_table(
    tiny_default_dir, image_folder, pool_file, tmp_path, monkeypatch
):
    from surgeon import cli

    monkeypatch.setattr(cli, "NON_TERMINAL_ROWS", 3)
    taxonomy = tmp_path / "tax.json"
    taxonomy.write_text(json.dumps({"concepts": {"animals": {"terms": ["dog", "cat"]}}}))
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
        "--m",
        "2",
        "--out",
        str(tmp_path / "r"),
    ]
    shown = CliRunner().invoke(cli.app, args, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"(top 3 of 8 heads; all of them are in {tmp_path / 'r'}/ranking.csv)" in shown.output
    assert sum(line.startswith("│ L") for line in shown.output.splitlines()) == 3


@pytest.mark.slow  # a child process: the hub reads its cache folder at import
def test_missing_weights_hint_names_hf_download_and_the_real_hub_cache(tmp_path):
    code = (
        "import sys\nfrom surgeon.model.load import load_model\n"
        "try:\n    load_model('ViT-B-32', 'laion2b_s34b_b79k')\nexcept Exception as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    env.pop("HF_HUB_CACHE", None)
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert f"not in the local cache ({tmp_path / 'hf' / 'hub'})" in shown
    assert "`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`" in shown and str(tmp_path / "hf" / "hub") in shown


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_torchscript_archives_load_without_running_their_code(tmp_path, quick_gelu):
    """A traced open_clip model saved with torch.jit.save: the layout of OpenAI's own CLIP files."""
    from surgeon.model.load import build_clip, read_state_dict
    from surgeon.model.torchscript import is_torchscript, script_activation
    from tests.conftest import tiny_config

    config = {**tiny_config(), "quick_gelu": quick_gelu}
    torch.manual_seed(0)
    model = build_clip(config).eval()
    path = tmp_path / "ViT-tiny.pt"
    with torch.no_grad():
        torch.jit.trace(model, (torch.randn(2, 3, 32, 32), torch.randint(0, 99, (2, 16))), strict=False).save(path)
    assert is_torchscript(path) and script_activation(path) == ("QuickGELU" if quick_gelu else "GELU")
    state = read_state_dict(path)
    own = model.state_dict()
    assert all(torch.equal(state[k], own[k]) for k in own)
    # through the loader: the activation is read from the archive's code and recorded
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config()}))
    path.rename(folder / "weights.pt")
    loaded = load_model(f"local-dir:{folder}", device="cpu")
    assert all(torch.equal(v, own[k]) for k, v in loaded.model.state_dict().items())


def test_a_pickle_disguised_as_torchscript_is_refused(tmp_path):
    """The restricted unpickler knows two callables; anything else (here os.system) is refused unexecuted."""
    import pickle
    import zipfile

    path = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/code/__torch__/m.py", "class M: pass")
        archive.writestr("evil/data.pkl", pickle.dumps(Exploit(f"touch {marker}")))
    from surgeon.core.errors import CorruptInput
    from surgeon.model.load import read_state_dict

    with pytest.raises(CorruptInput, match="posix.system is not allowed|os.system is not allowed"):
        read_state_dict(path)
    assert not marker.exists()


class Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cache_command_lists_sizes_clears_and_evicts_least_recently_used(tiny):
    from surgeon.cli import app
    from surgeon.core.cache import parse_size
    from surgeon.core.paths import cache_dir

    pool_embeddings(tiny, POOL, quiet=True)  # a real entry: text/<key>.safetensors
    root = cache_dir()
    for i, (kind, size) in enumerate([("stats", 3000), ("stats", 2000), ("partial", 1000)]):
        path = root / kind / f"{i}.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (1000 + i, 1000 + i))  # used long ago, oldest first
    writing = f".5.safetensors.tmp-{os.getpid()}-ab.safetensors"  # an atomic_file of a writer at work
    (root / "stats" / writing).write_bytes(b"x" * 50)  # never touched
    text_size = sum(p.stat().st_size for p in (root / "text").iterdir())
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "│ stats   │ 2 " in listed.output and "│ text    │ 1 " in listed.output
    sized = runner.invoke(app, ["cache", "size"])
    assert sized.output.startswith(f"{6000 + text_size} bytes")
    evicted = runner.invoke(app, ["cache", "evict", "--max-size", f"{text_size + 1500}B"])
    assert evicted.exit_code == 0 and "deleted 2 file(s)" in evicted.output  # the two oldest: 3000 + 2000 bytes
    assert sorted(p.name for p in (root / "stats").iterdir()) == [writing]
    assert (root / "partial" / "2.safetensors").exists() and pool_embeddings(tiny, POOL, quiet=True)[1]
    cleared = runner.invoke(app, ["cache", "clear", "partial"])
    assert "deleted 1 file(s)" in cleared.output and (root / "text").iterdir()
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0 and not list((root / "text").iterdir())
    assert parse_size("1.5GiB") == 1.5 * 2**30 and parse_size("500MB") == 500_000_000 and parse_size("7") == 7
    bad = runner.invoke(app, ["cache", "evict", "--max-size", "lots"])
    assert isinstance(bad.exception, InvalidInput) and "bad size 'lots'" in str(bad.exception)  # main(): exit 2


def test_a_rank_with_an_empty_shard_says_so(tiny, image_folder, monkeypatch):
    """24 images in batches of 16 are 2 batches: a third rank would get none (the all-reduce is not needed
    to see it, so this rank's view is simulated without a process group)."""
    from surgeon.core.distributed import World

    monkeypatch.setattr(collect, "world", lambda: World(2, 3))
    monkeypatch.setattr(collect, "agree", lambda flag, w: flag)
    monkeypatch.setattr(collect, "all_reduce", lambda stats, w: stats)
    with pytest.warns(UserWarning, match="rank 2 of 3 has no images: 24 image.* batches of 16.*--batch-size"):
        with pytest.raises(InvalidInput, match="only 0 readable image"):
            collect.collect_stats(tiny, folder_images(image_folder), (1,), batch_size=16, quiet=True)


def test_empty_parameters_is_per_thread_and_loading_assigns_every_tensor(tiny_default_dir):
    import threading

    from surgeon.model.load import empty_parameters

    other: list = []
    with empty_parameters():
        inside = torch.nn.Linear(4, 4)
        worker = threading.Thread(target=lambda: other.append(torch.nn.Linear(4, 4)))  # e.g. another server job
        worker.start()
        worker.join()
    assert inside.weight.is_meta and not other[0].weight.is_meta and not torch.nn.Linear(4, 4).weight.is_meta
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    tensors = list(loaded.model.parameters()) + list(loaded.model.buffers())
    assert not any(t.is_meta for t in tensors) and loaded.model.attn_mask.isinf().any()  # the causal mask is real
