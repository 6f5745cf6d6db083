"""Shared fixtures and the one in-process CLI runner.

Fixtures: tiny real open_clip models (both block types) saved as local-dir folders, image folders, text pools,
the synthetic suite's pruned run, and one gRPC server per test module. `run_cli` runs `surgeon ARGS` in this
process through surgeon.cli.main (each `python -m surgeon` launch paid the torch import, ~3 s); tests keep
subprocesses only where the process itself is under test (signals, torch-free imports, servers, torchrun,
packaging)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from surgeon.core.options import RankMethod
from surgeon.inputs.images import folder_images
from surgeon.inputs.pools import TextPool
from surgeon.model.load import build_clip, load_model
from surgeon.pruning.prune import prune
from surgeon.ranking.rank import rank_heads
from surgeon.selection.policies import PolicyOptions
from surgeon.validation.validate import BiasSet, ClassificationSet, ValidationSuite

#: files with a test of half a minute or more (a whole default pipeline, a pip install, sharded runs), longest
#: first. pytest-xdist hands whole files to its workers in collection order (Makefile: --no-loadscope-reorder),
#: so these start first and no worker is left alone with one of them at the end of the run.
LONGEST_FIRST = (
    "test_toy_cli.py",
    "test_deploy_manifests.py",
    "test_deploy.py",
    "test_interrupts.py",
    "test_hub_loading.py",
    "test_toy_targets.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The LONGEST_FIRST files first, the rest in their collected order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """What surgeon.cli.main changes for the rest of a process (signal handlers, the warning printer, torch's
    thread count), put back, so one in-process run cannot leak into the next test."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    show_warning = warnings.showwarning
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    try:
        with warnings.catch_warnings():
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # an interrupt's deferred timer (cli._on_interrupt) never fires later
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        warnings.showwarning = show_warning
        if torch_threads is not None:
            sys.modules["torch"].set_num_threads(torch_threads)


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None, cwd: Path | str | None) -> Iterator[None]:
    """A subprocess's `env=` (the whole environment, not additions) and `cwd=`, for the length of one run."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


NO_MODEL = ["--model", "local-dir:/nonexistent/surgeon-model"]  # a valid request would fail here with exit 3


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = None
) -> subprocess.CompletedProcess:
    """`surgeon ARGS` in this process: surgeon.cli.main itself (the interrupt flag cleared, every error mapped to
    its one line and exit code), stdout and stderr captured as text, the result shaped like subprocess.run's."""
    from surgeon.cli import main

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="", write_through=True)
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="", write_through=True)
    argv = sys.argv
    sys.argv = ["surgeon", *args]
    code: int | str | None = 0
    try:
        with _environment(env, cwd), _process_state_restored():
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    main()
                except SystemExit as exit_:
                    code = exit_.code
    finally:
        sys.argv = argv
    if not isinstance(code, int):  # sys.exit("message") prints it and exits 1, as the interpreter does
        if code is not None:
            stderr.write(f"{code}\n")
        code = 0 if code is None else 1
    return subprocess.CompletedProcess(
        ["surgeon", *args], code, stdout.buffer.getvalue().decode(), stderr.buffer.getvalue().decode()
    )


def tiny_config(block_type: str = "default", layers: int = 3, heads: int = 4, image_size: int = 32) -> dict:
    vision = {
        "image_size": image_size,
        "patch_size": 8,
        "width": 16 * heads,
        "layers": layers,
        "head_width": 16,
        "mlp_ratio": 2.0,
    }
    if block_type == "custom":
        vision.update(block_type="custom", ls_init_value=0.5, qk_norm=True)
    return {
        "embed_dim": 32,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    }


def tiny_toy_model_cfg() -> dict:
    """The smallest toy CLIP (32 px, one block per tower) for training and zero-shot tests."""
    from surgeon.studies.toy_train import toy_model_cfg

    return toy_model_cfg(
        image_size=32,
        patch_size=16,
        width=32,
        layers=1,
        head_width=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
    )


def save_local_dir(folder: Path, config: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_clip(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Caches and exports of a test never leak into the user's home or the repo."""
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SURGEON_EXPORTS_DIR", str(tmp_path / "exports"))
    # the deprecated TorchScript exporter is ~10x faster on tiny models; tests/test_deploy.py covers dynamo
    monkeypatch.setenv("SURGEON_ONNX_EXPORTER", "torchscript")


@pytest.fixture(scope="session", params=["default", "custom"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_local_dir(tmp_path_factory.mktemp(f"tiny-{request.param}"), tiny_config(request.param))


@pytest.fixture(scope="session")
def tiny_default_dir(tmp_path_factory) -> Path:
    return save_local_dir(tmp_path_factory.mktemp("tiny"), tiny_config("default"))


@pytest.fixture(scope="session")
def vit_file(tmp_path_factory) -> Path:
    """A real open_clip architecture (ViT-S-32, random init, 252 MB) saved as a bare .safetensors checkpoint:
    a file that cannot say its activation, loaded as `--model ViT-S-32 --pretrained FILE`."""
    import warnings

    from surgeon.model.load import load_model

    path = tmp_path_factory.mktemp("ckpt") / "vit-s-32.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using a random initialisation": that is the point
        model = load_model("ViT-S-32", device="cpu").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def pool_file(tmp_path) -> Path:
    lines = [
        "a red circle",
        "a blue square",
        "",
        "a green thing",
        "a dog in a park",
        "a cat on a sofa",
        "the city of Paris",
        "a street in Tokyo",
        "three apples",
        "five birds",
        "a yellow wall",
    ]
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the synthetic suite and a ranked tiny model: the prune pipeline's inputs ----

TAXONOMY = {
    "version": 1,
    "concepts": {
        "colors": {"description": "", "terms": ["red", "blue", "green"], "priority": 0},
        "animals": {"description": "", "terms": ["dog", "cat", "bird"], "priority": 0},
    },
}


def synthetic_suite(seed: int = 0) -> ValidationSuite:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    task = ClassificationSet(
        "synthetic/colors", ["red", "blue", "green", "dog"], ["a {}", "a photo of a {}"], images, rng.integers(0, 4, 40)
    )
    bias = BiasSet(
        "synthetic/bias",
        images[:30],
        np.arange(30) % 2,
        ["a", "b"],
        {"star": ["a star"], "dog": ["a dog", "a photo of a dog"]},
        k=10,
    )
    return ValidationSuite([task], bias, "test")


def ranked_tiny_model(model_dir: Path, images: Path) -> tuple:
    """(the tiny model loaded from `model_dir`, its ranking over `images`, layers 1-2, m=3)."""
    loaded = load_model(f"local-dir:{model_dir}", device="cpu")
    pool = TextPool("t", ("a red dog", "a blue cat", "green bird", "a red cat", "a dog", "blue", "a bird"), TAXONOMY)
    ranking = rank_heads(loaded, folder_images(images), pool, RankMethod(layers="1-2", m=3), quiet=True)
    return loaded, ranking


@pytest.fixture
def setup(tiny_default_dir, image_folder):
    """(the tiny default model, its ranking over `image_folder`): per test, as prune changes the model in place."""
    return ranked_tiny_model(tiny_default_dir, image_folder)


@pytest.fixture
def user_data(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imagefolder"
    rows = ["path,group"]
    for cls in ("red_thing", "blue_thing", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
            rows.append(f"imagefolder/{cls}/{i}.png,{'ab'[i % 2]}")
    (tmp_path / "bias.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "queries.txt").write_text("doctor\nnurse\n")
    (tmp_path / "manifest.csv").write_text(
        "path,label\n"
        + "\n".join(f"imagefolder/{c}/{i}.png,{c}" for c in ("dog", "red_thing") for i in range(4))
        + "\n"
    )
    return tmp_path


def offline_hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face hub cache holding `folder` as the main revision of `repo_id`, laid out as a download leaves
    it: each file's bytes in blobs/, and in the snapshot a relative link to them."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for source in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


@pytest.fixture(scope="session")
def onnx_run_original(tiny_default_dir, image_folder, tmp_path_factory) -> Path:
    """A run folder pruned (top-1) and exported to safetensors and ONNX, built once: tests take copies."""
    base = tmp_path_factory.mktemp("onnx-run")
    with pytest.MonkeyPatch.context() as patch:  # a session fixture: isolated_dirs is not set for it
        patch.setenv("SURGEON_CACHE_DIR", str(base / "cache"))
        patch.setenv("SURGEON_ONNX_EXPORTER", "torchscript")
        loaded, ranking = ranked_tiny_model(tiny_default_dir, image_folder)
        out = base / "run"
        formats = ["safetensors", "onnx"]
        prune(loaded, ranking, synthetic_suite(), "top-k", PolicyOptions(k=1), out_dir=out, exporters=formats)
    return out


@pytest.fixture
def onnx_run(onnx_run_original, tmp_path) -> Path:
    """A test's own copy of the pruned run (tests tamper with it): what `setup` + prune built per test before."""
    return Path(shutil.copytree(onnx_run_original, tmp_path / "run", symlinks=True))


# ---- gRPC: one server per test module, over that module's own world (tests/grpc_helpers.py) ----
# The imports are inside the fixtures: only the gRPC test modules, which skip without grpc, use them.


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from tests.grpc_helpers import make_world

    return make_world(tmp_path_factory.mktemp("grpc").resolve())


@pytest.fixture(scope="module")
def server(world):
    from surgeon.server.main import SurgeonServer

    srv = SurgeonServer(
        port=0,
        exports_root=world["exports"],
        models_root=world["models"],
        data_root=world["data"],
        max_jobs=2,
        queue_size=4,
    ).start()
    yield srv
    srv.stop(grace=5)


@pytest.fixture(scope="module")
def channel(server):
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    from tests.grpc_helpers import Client

    return Client(channel)


@pytest.fixture
def gate(monkeypatch):
    """Hold every job at its ranking step until released (no test waits on timing)."""
    import threading

    import surgeon.server.service as service_module
    from tests.grpc_helpers import RPC_TIMEOUT

    release = threading.Event()
    real = service_module.run_rank

    def gated(*args, **kwargs):
        assert release.wait(RPC_TIMEOUT), "gate never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_rank", gated)
    yield release
    release.set()
