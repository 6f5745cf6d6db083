"""Stage 1: resolve what the user named (bundled toy model, open_clip name + tag from the local hub cache,
a checkpoint file, a `local-dir:` folder) into a ready model, offline, with one clear error when the
weights are not here. Checkpoints are read with safetensors or `torch.load(weights_only=True)` only."""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import pickle
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.core import fallback, limits
from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed
from surgeon.core.limits import echo
from surgeon.core.paths import PACKAGE_DATA, read_json_object
from surgeon.model.hooks import embed_dim, encode_text, image_size

TOY_MODEL_DIR = PACKAGE_DATA / "toy_model"
TOY_MODEL_NAME = fallback.TOY
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A CLIP model with everything later stages need to know about where it came from."""

    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str | None
    preprocess_cfg: dict
    model_cfg: dict
    device: torch.device
    weights_hash: str = field(default="")
    pruned_layout: dict = field(default_factory=dict)  # the "surgeon" entry of a hard-pruned export's config
    activation_source: str = "the model's config"  # how the activation was decided (ACTIVATION_SOURCES)

    @property
    def identity(self) -> str:
        return self.name if not self.pretrained else f"{self.name}/{self.pretrained}"

    @property
    def forward_identity(self) -> str:
        """SHA-256 of everything that decides what the image tower computes for an image file: the weights AND
        the architecture config (activation, e.g. QuickGELU for OpenAI's weights; image size; normalisation
        layers), the preprocessing, the parameter precision and a hard-pruned layout. The same weights loaded as
        GELU and as QuickGELU give different statistics, so caches and ranking checks key by this."""
        payload = {
            "weights": self.weights_hash,
            "model_cfg": self.model_cfg,
            "preprocess": self.preprocess_cfg,
            "dtype": str(next(self.model.parameters()).dtype),
            "pruned_layout": self.pruned_layout,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def activation(self) -> str:
        return activation(self.model_cfg)

    def record(self) -> dict:
        """What a ranking or a plan records about the model it was made for (checked by Ranking.check_model)."""
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_hash,
            "forward_sha256": self.forward_identity,
            "activation": self.activation,
            "activation_source": self.activation_source,
        }

    @property
    def is_toy(self) -> bool:
        return fallback.is_toy_model(self.name)

    def encode_text(self, texts: list[str], batch_size: int = 256, advance=None) -> torch.Tensor:
        """L2-normalised text embeddings, batched (the TextSpan pool can hold thousands of lines);
        `advance(n)` is called after each batch (progress bars)."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
                out.append(encode_text(self.model, tokens, normalize=True).float())
                if advance is not None:
                    advance(len(tokens))
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    @property
    def embed_dim(self) -> int:
        return embed_dim(self.model)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, checked against this machine: one clear line for `tpu` or `cuda:9` instead of
    torch's error when the first tensor moves (None: CUDA when present, else the CPU)."""
    if device is None:
        return default_device()
    spec = str(device)
    try:
        parsed = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise InvalidInput(f"unknown device {echo(spec)}", hint="use cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise NotFound(f"device {spec}: this machine has no usable CUDA device", hint="use --device cpu")
        if parsed.index is not None and parsed.index >= available:
            raise NotFound(f"device {spec}: this machine has {available} CUDA device(s), cuda:0..cuda:{available - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise NotFound(f"device {spec}: MPS is not available on this machine", hint="use --device cpu")
    return parsed


def weights_hash(model: torch.nn.Module, keep=None) -> str:
    """SHA-256 over every tensor of the state dict (names and bytes), or over the entries whose name `keep`
    accepts: the identity used by caches. Hashes the tensors' memory in place (no copy of a CPU model)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if keep is not None and not keep(name):
            continue
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without ever executing code from it."""
    if not path.is_file():
        raise NotFound(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CorruptInput(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptInput(f"corrupt safetensors checkpoint {path}: {err}") from None
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise InvalidInput(
            f"unsupported checkpoint type {path.suffix!r}: {path}",
            hint="use .safetensors (preferred), or .bin/.pt/.pth holding a plain state dict",
        )
    from surgeon.model.torchscript import is_torchscript, read_torchscript_state_dict

    if is_torchscript(path):  # OpenAI's own releases: torch.load refuses them, torch.jit.load runs their code
        return read_torchscript_state_dict(path)
    try:
        # mmap: the tensors stay in the page cache instead of a second full copy in memory
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CorruptInput(
            f"refused to load {path}: it is not a plain tensor checkpoint (weights_only load failed)",
            hint=f"convert it to .safetensors on a trusted machine; detail: {str(err).splitlines()[0]}",
        ) from None
    except Exception as err:  # noqa: BLE001 - torch.load of a non-checkpoint raises anything (KeyError for text)
        detail = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        raise CorruptInput(f"corrupt checkpoint {path}: not a tensor checkpoint ({detail})") from None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CorruptInput(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


#: tensors OpenAI's checkpoints carry besides the weights (open_clip drops them too)
NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def load_weights_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a readable mismatch report instead of torch's wall of key names. The checkpoint's
    tensors become the model's (assign: no second copy; a model built by `empty_parameters` needs it),
    cast to the model's dtypes (OpenAI's files are float16)."""
    from open_clip.factory import convert_state_dict

    state_dict = convert_state_dict(model, state_dict)
    own = model.state_dict()
    derived = {name for name, _ in model.named_buffers()} - set(own)  # non-persistent buffers, e.g. attn_mask
    state_dict = {k: v for k, v in state_dict.items() if k not in derived and k not in NON_WEIGHTS}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise PreconditionFailed(
            f"checkpoint {source} does not match the model architecture: {'; '.join(parts)}",
            hint="pass the --model name the checkpoint was trained with",
        )
    check_tensor_values(state_dict, own, source)
    state_dict = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)


def check_tensor_values(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> None:
    """Refuse what a cast would hide: integer or bool tensors where the model holds floats (cast, they load as
    plausible weights) and NaN or infinite weights (a model that validates at chance with exit 0)."""
    for name, tensor in state_dict.items():
        if not own[name].is_floating_point():
            continue
        if not tensor.is_floating_point():
            raise CorruptInput(
                f"checkpoint {source}: {name} holds {str(tensor.dtype).removeprefix('torch.')} values where "
                f"the model has {str(own[name].dtype).removeprefix('torch.')} weights"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise CorruptInput(f"checkpoint {source}: {name} holds NaN or infinite values")


def supported_architectures() -> list[str]:
    """The open_clip architectures whose image tower surgeon decomposes: a VisionTransformer read at the CLS
    token (not a timm or ResNet tower, not CoCa's attention pooling or CLIPA's average pooling). What
    `surgeon models` and ListModels list and what load_model accepts."""
    import open_clip

    return [name for name in open_clip.list_models() if not _unsupported_tower(open_clip.get_model_config(name) or {})]


def _unsupported_tower(model_cfg: dict) -> str | None:
    vision = model_cfg.get("vision_cfg", {})
    if "timm_model_name" in vision:
        return "a timm image tower"
    if isinstance(vision.get("layers"), list | tuple):  # open_clip's ModifiedResNet: stages, not blocks
        return "a ResNet image tower"
    if "multimodal_cfg" in model_cfg or vision.get("attentional_pool"):
        return "an attention-pooled (CoCa) image tower"
    if vision.get("pool_type", "tok") != "tok":  # e.g. CLIPA's average pooling: heads do not write one token
        return f"a {vision['pool_type']}-pooled image tower"
    return None


def cached_pretrained_tags(model_name: str) -> list[str]:
    """The open_clip pretrained tags of an architecture whose weights are in the local caches (no network)."""
    import open_clip

    return [t for t in open_clip.list_pretrained_tags_by_model(model_name) if _find_in_hub_cache(model_name, t)[0]]


def hub_repo(cfg: dict) -> tuple[str, str]:
    """(Hub repo id, weights file name or '') of an open_clip pretrained config ('' repo when it has none)."""
    hub = cfg.get("hf_hub", "")
    if hub.endswith("/"):
        return hub[:-1], ""
    return os.path.split(hub) if hub else ("", "")


def _find_in_hub_cache(model_name: str, tag: str) -> tuple[Path | None, dict]:
    """Look for a pretrained tag's weights in the user's caches without touching the network."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
        raise NotFound(
            f"unknown pretrained tag {tag!r} for {model_name}",
            hint=f"known tags: {', '.join(tags) or 'none'}; or pass a checkpoint file to --pretrained",
        )
    repo_id, filename = hub_repo(cfg)
    if repo_id:
        from huggingface_hub import try_to_load_from_cache

        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found), cfg
    url = cfg.get("url", "")
    if url:
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return cached, cfg
    return None, cfg


def _missing_weights_error(model_name: str, tag: str, cfg: dict) -> NotFound:
    from huggingface_hub import constants

    hub = cfg.get("hf_hub", "").rstrip("/")
    repo = "/".join(hub.split("/")[:2])  # "timm/vit_base_patch32_clip_224.openai/" names the repo, then a file
    cache = constants.HF_HUB_CACHE  # follows HF_HUB_CACHE / HF_HOME like huggingface_hub itself
    fetch = (
        f"run `hf download {repo}` and copy that machine's hub cache into {cache}"
        if hub
        else f"download {cfg.get('url', 'its release file')} into ~/.cache/clip"
    )
    return NotFound(
        f"weights for {model_name} / {tag} are not in the local cache ({cache}) and surgeon works offline",
        hint=f"on a machine with internet {fetch}, or pass the checkpoint file with --pretrained PATH",
    )


def _local_dir(model: str) -> Path | None:
    if model.startswith("local-dir:"):
        return Path(model.removeprefix("local-dir:"))
    path = Path(model)
    if path.is_dir():
        return path
    return None


HF_HUB_PREFIX = "hf-hub:"


def normalised_source(text: str) -> str:
    """A model path as labels and records show it: `//`, `.` and `..` segments resolved (`runs//a/../b` ->
    `runs/b`), absolute when it climbs above the working folder; `local-dir:` kept, other names unchanged."""
    prefix = "local-dir:" if text.startswith("local-dir:") else ""
    raw = text.removeprefix(prefix)
    clean = os.path.normpath(raw)
    return prefix + (os.path.abspath(raw) if clean == os.pardir or clean.startswith(os.pardir + os.sep) else clean)


def hub_snapshot(model: str) -> Path | None:
    """The local Hub cache's folder of `hf-hub:ORG/NAME` (None for other names), read as a local-dir folder:
    every run folder surgeon writes is a Hub repo, hard-pruned ones included (which open_clip's own hf-hub:
    cannot build). Offline: a repo that is not in the cache is one NotFound naming the command that fetches
    it; the cache follows HF_HUB_CACHE / HF_HOME as huggingface_hub does."""
    if not model.startswith(HF_HUB_PREFIX):
        return None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id = model.removeprefix(HF_HUB_PREFIX)
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise InvalidInput(f"{echo(model)} does not name a Hub repository", hint="use hf-hub:ORG/NAME") from None
    except LocalEntryNotFoundError:
        raise NotFound(
            f"{repo_id} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and surgeon works offline",
            hint=f"on a machine with internet run `hf download {repo_id}` and copy its hub cache here",
        ) from None
    if not (folder / "open_clip_config.json").is_file() and (folder / "onnx" / "visual.onnx").is_file():
        raise PreconditionFailed(
            f"{repo_id} holds ONNX graphs only, no PyTorch weights",
            hint=f"run them with `surgeon infer {folder}` or `surgeon serve-model {folder}`",
        )
    return folder


def _read_local_dir_config(folder: Path) -> dict:
    config_path = folder / "open_clip_config.json"
    if not folder.is_dir():
        raise NotFound(f"model folder not found: {folder}")
    if not config_path.is_file():
        raise NotFound(f"{folder} is not an open_clip local-dir folder (no open_clip_config.json)")
    config = read_json_object(config_path, "model config")
    if "model_cfg" not in config:
        raise CorruptInput(f"{config_path} has no 'model_cfg'")
    return config


def load_model(
    model: str | None = None,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    activation: str | None = None,
) -> LoadedModel:
    """The one factory: every entry point (CLI, gRPC, tests) gets its model here. `activation` (gelu or
    quickgelu) overrides what the config, the tag or the checkpoint says: a checkpoint file cannot say it."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from surgeon.model.pruned import rebuild_pruned  # hard-pruned folders carry their own layout

    device = parse_device(device)
    forced = check_activation(activation)
    if pretrained and fallback.is_toy_model(model):
        raise InvalidInput(
            "--pretrained needs --model: the bundled toy model takes no other weights",
            hint="name the architecture, e.g. --model ViT-B-32 --pretrained FILE",
        )
    if pretrained and model is not None and (_local_dir(model) is not None or model.startswith(HF_HUB_PREFIX)):
        raise InvalidInput(
            f"{echo(model)} is a model folder with its own weights; it takes no --pretrained",
            hint="drop --pretrained, or pass an architecture name with --model",
        )
    folder: Path | None
    if fallback.is_toy_model(model):
        if not (TOY_MODEL_DIR / "open_clip_config.json").is_file():
            raise NotFound(
                "the bundled toy model is missing from this installation",
                hint="train it with `surgeon toy train` (or reinstall surgeon)",
            )
        name, folder = TOY_MODEL_NAME, TOY_MODEL_DIR
    else:
        name, folder = model, _local_dir(model) or hub_snapshot(model)

    if folder is not None:
        config = _read_local_dir_config(folder)
        model_cfg = config["model_cfg"]
        preprocess_cfg = check_preprocess_cfg(config.get("preprocess_cfg", {}), model_cfg, folder)
        source = "open_clip_config.json"
        model_cfg, source = _forced_activation(model_cfg, forced, source)
        weights = next((folder / f for f in ("open_clip_model.safetensors",) if (folder / f).is_file()), None)
        if weights is None:
            found = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            if not found:
                raise NotFound(f"no weights file in {folder}")
            weights = found[0]
        with empty_parameters():
            clip = rebuild_pruned(
                build_clip(model_cfg), config.get("surgeon", {}), str(folder / "open_clip_config.json")
            )
        load_weights_strict(clip, read_state_dict(weights), str(weights))
        if name != TOY_MODEL_NAME and not name.startswith(HF_HUB_PREFIX):
            name = normalised_source(f"local-dir:{folder}")
        tokenizer_name = f"local-dir:{folder}"
        pretrained = None
        pruned_layout = config.get("surgeon", {})
    else:
        assert model is not None  # None is the toy model, a folder
        if Path(model).suffix in CHECKPOINT_SUFFIXES and not pretrained:
            raise InvalidInput(
                f"{model} looks like a checkpoint file; --model needs the architecture name",
                hint="use --model ARCH --pretrained PATH, e.g. --model ViT-B-32 --pretrained model.safetensors",
            )
        if model not in open_clip.list_models():
            close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
            raise NotFound(
                f"unknown model {model!r}",
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + "use an open_clip name (`surgeon models`), a local-dir: folder, or omit --model for the toy",
            )
        model_cfg = dict(open_clip.get_model_config(model))
        unsupported = _unsupported_tower(model_cfg)
        if unsupported:
            raise InvalidInput(
                f"{model} has {unsupported}: surgeon decomposes open_clip VisionTransformer towers",
                hint="`surgeon models` lists the architectures it supports",
            )
        preprocess_cfg = {}
        weights_path = None
        source = "the architecture's config"
        if pretrained:
            path = Path(pretrained)
            if path.suffix in CHECKPOINT_SUFFIXES or path.exists():
                weights_path, pretrained = path, normalised_source(pretrained)
            else:
                weights_path, tag_cfg = _find_in_hub_cache(model, pretrained)
                if weights_path is None:
                    raise _missing_weights_error(model, pretrained, tag_cfg)
                preprocess_cfg = {
                    k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
                }
                if tag_cfg.get("quick_gelu"):  # e.g. OpenAI's weights: same parameters, another activation
                    model_cfg["quick_gelu"] = True
                source = f"pretrained tag {pretrained}"  # open_clip's registry knows each tag's activation
        state_dict = read_state_dict(weights_path) if weights_path is not None else None
        if weights_path == Path(pretrained or "") and forced is None:  # a file: it cannot say its activation
            source = _detect_activation(model, weights_path, model_cfg)
        model_cfg, source = _forced_activation(model_cfg, forced, source)
        if weights_path is not None and state_dict is not None:
            with empty_parameters():
                clip = build_clip(model_cfg)
            load_weights_strict(clip, state_dict, str(weights_path))
        else:
            clip = build_clip(model_cfg)
            warnings.warn(f"{model} has no --pretrained weights: using a random initialisation", stacklevel=2)
        tokenizer_name = model
        pruned_layout = {}

    clip = clip.to(device).eval()
    full_pcfg = asdict(PreprocessCfg())
    full_pcfg["size"] = image_size(clip)
    full_pcfg.update(preprocess_cfg)
    set_model_preprocess_cfg(clip, full_pcfg)
    preprocess = image_transform_v2(PreprocessCfg(**_pcfg_fields(full_pcfg)), is_train=False)
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    loaded = LoadedModel(
        model=clip,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        preprocess_cfg=_pcfg_fields(full_pcfg),
        model_cfg=model_cfg,
        device=device,
        pruned_layout=pruned_layout,
        activation_source=source,
    )
    loaded.weights_hash = weights_hash(clip)
    return loaded


_EMPTY = threading.local()
_REGISTER_PARAMETER = torch.nn.Module.register_parameter


def _register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    if param is not None and getattr(_EMPTY, "active", False) and param.device.type != "meta":
        param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _REGISTER_PARAMETER(module, name, param)


@contextmanager
def empty_parameters():
    """Modules built inside take no memory for their parameters (meta device; their random initialisation
    is skipped too) until `load_weights_strict` assigns the checkpoint's tensors: loading never holds a
    random-init model and the checkpoint side by side. Buffers stay real: the non-persistent ones (causal
    masks) are not in any checkpoint. Per thread: the server builds models in several threads at once.
    (accelerate's init_empty_weights does the same globally; not worth the dependency.)"""
    # inert outside this block's thread; mypy refuses assignments to methods, the patch is the point
    torch.nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign, assignment]
    previous, _EMPTY.active = getattr(_EMPTY, "active", False), True
    try:
        yield
    finally:
        _EMPTY.active = previous


def activation(model_cfg: dict) -> str:
    """The MLP activation a config builds (OpenAI-trained weights need QuickGELU; the parameters are the same)."""
    return "QuickGELU" if model_cfg.get("quick_gelu") else "GELU"


#: --activation (CLI, gRPC ModelRef.activation, a study's models[].activation) -> open_clip's quick_gelu
ACTIVATIONS = {"gelu": False, "quickgelu": True}


def check_activation(name: str | None) -> bool | None:
    """open_clip's quick_gelu for an --activation value (None: decided by the model's config, tag or file)."""
    if name is None:
        return None
    if name.lower() not in ACTIVATIONS:
        raise InvalidInput(f"unknown activation {echo(name)}", hint=f"choose {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]


def _forced_activation(model_cfg: dict, quick_gelu: bool | None, source: str) -> tuple[dict, str]:
    """The config with the activation the user named (and that as its source), else as it was."""
    if quick_gelu is None:
        return model_cfg, source
    return {**model_cfg, "quick_gelu": quick_gelu}, "given with --activation"


def _detect_activation(model: str, weights: Path, model_cfg: dict) -> str:
    """A checkpoint file does not record its activation; use what can be known: the architecture's own config
    (a -quickgelu name), the code of a TorchScript archive, or the open_clip_config.json next to a file from a
    Hugging Face snapshot. Otherwise GELU is assumed, and said: a warning every shell shows. Returns how the
    activation was decided (recorded in rankings, plans and the card)."""
    from surgeon.model.torchscript import script_activation

    if model_cfg.get("quick_gelu"):
        return f"the {model} config"
    found = script_activation(weights)
    source = "the TorchScript archive's code"
    sibling = weights.parent / "open_clip_config.json"
    if found is None and sibling.is_file():
        source = f"{sibling.name} next to the checkpoint"
        try:
            found = activation(json.loads(sibling.read_text(encoding="utf-8")).get("model_cfg", {}))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
            found = None
    if found == "QuickGELU":
        model_cfg["quick_gelu"] = True
    if found is not None:
        return source
    warnings.warn(
        f"{weights.name}: GELU assumed (a checkpoint file does not record its activation); weights trained with "
        "QuickGELU, e.g. OpenAI's, need --activation quickgelu",
        stacklevel=3,
    )
    return "assumed: a checkpoint file does not record it"


def _size(cfg: dict, key: str, default: int | float, where: str) -> float:
    """A config dimension as one number (a 2-list of sizes: their product's square root; a list of ResNet
    stages: their sum), refused with its name when it is not a positive number."""
    value = cfg.get(key, default)
    parts = value if isinstance(value, list | tuple) and value else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf") for v in parts):
        raise CorruptInput(f"invalid model configuration: {where}.{key} must be a positive number, got {echo(value)}")
    if key == "layers":
        return float(sum(parts))
    return float(parts[0] * parts[-1]) ** 0.5 if key in ("image_size", "patch_size") else float(parts[0])


def model_size(model_cfg: dict) -> tuple[float, float, float]:
    """(parameters, longest sequence, largest tokens x width of one sample in one block) that a config builds,
    estimated from its numbers alone: a config is checked against limits before anything is allocated."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    embed = _size(model_cfg, "embed_dim", 512, "model_cfg")
    width, layers = _size(vision, "width", 768, "vision_cfg"), _size(vision, "layers", 12, "vision_cfg")
    mlp, patch = _size(vision, "mlp_ratio", 4.0, "vision_cfg"), _size(vision, "patch_size", 16, "vision_cfg")
    tokens = (_size(vision, "image_size", 224, "vision_cfg") / patch) ** 2 + 1
    parameters = layers * (4 + 2 * mlp) * width**2 + (tokens + 3 * patch**2 + embed) * width
    sequence, activation = tokens, tokens * width
    if "hf_model_name" not in text:  # an HF text tower is sized by its own (hub) config
        t_width, t_layers = _size(text, "width", 512, "text_cfg"), _size(text, "layers", 12, "text_cfg")
        context, vocab = _size(text, "context_length", 77, "text_cfg"), _size(text, "vocab_size", 49408, "text_cfg")
        t_mlp = _size(text, "mlp_ratio", 4.0, "text_cfg")
        parameters += t_layers * (4 + 2 * t_mlp) * t_width**2 + (vocab + context + embed) * t_width
        sequence, activation = max(sequence, context), max(activation, context * t_width)
    return parameters, sequence, activation


def check_model_size(model_cfg: dict) -> None:
    """Refuse a config whose model would not fit any machine (a local-dir config with 10,000 layers, or
    context_length 10^8: its causal mask alone is 10^16 floats) before building it."""
    parameters, sequence, activation = model_size(model_cfg)
    for what, value, bound in (
        ("parameters", parameters, limits.MAX_MODEL_PARAMETERS),
        ("tokens in a sequence (image patches + 1, or the text context)", sequence, limits.MAX_SEQUENCE_TOKENS),
        ("activations per sample and block (tokens x width)", activation, limits.MAX_ACTIVATION_ELEMENTS),
    ):
        if value > bound:
            raise InvalidInput(
                f"the model configuration builds about {value:,.0f} {what}; surgeon accepts at most {bound:,}",
                hint="check open_clip_config.json's vision_cfg/text_cfg numbers (layers, width, image_size, "
                "patch_size, context_length, embed_dim)",
            )


def build_clip(model_cfg: dict) -> torch.nn.Module:
    """Build a CLIP from a plain config dict, as open_clip's factory does, with no weights; a config is
    checked against the size limits first."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k, {}), dict) for k in ("vision_cfg", "text_cfg")):
        raise CorruptInput("invalid model configuration: model_cfg, vision_cfg and text_cfg must be JSON objects")
    check_model_size(cfg)
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "multimodal_cfg" in cfg:
        raise InvalidInput(
            "surgeon needs an open_clip VisionTransformer tower (timm and CoCa towers are not supported)"
        )
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    try:
        return (CustomTextCLIP if custom_text else CLIP)(**cfg)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, ZeroDivisionError) as err:
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise CorruptInput(f"invalid model configuration: {detail[:200]}") from None


INTERPOLATIONS = ("bicubic", "bilinear", "random")  # what open_clip's image_transform asserts
RESIZE_MODES = ("shortest", "longest", "squash")


def check_preprocess_cfg(pcfg: object, model_cfg: object, folder: Path) -> dict:
    """A local-dir config's preprocess_cfg, checked when read: its size must be the model's (any other is a
    shape mismatch in the first block, or 60,000 px images that fill memory), mean and std three finite numbers
    (std > 0: it divides), interpolation and resize_mode names open_clip knows (else its assert fires), the
    colour mode RGB (the tower takes three channels) and fill_color a grey level."""
    where = f"{folder / 'open_clip_config.json'}: preprocess_cfg"
    if not isinstance(pcfg, dict):
        raise CorruptInput(f"{where} must be a JSON object, got {echo(pcfg)}")
    vision = model_cfg.get("vision_cfg", {}) if isinstance(model_cfg, dict) else {}
    expected = _pair(vision.get("image_size", 224) if isinstance(vision, dict) else None)
    if "size" in pcfg and expected is not None and _pair(pcfg["size"]) != expected:  # a bad model size: build_clip
        shown = "x".join(map(str, expected))
        raise CorruptInput(f"{where}.size is {echo(pcfg['size'])}; the model takes {shown} px images")
    for key in ("mean", "std"):
        value = pcfg.get(key)
        if key in pcfg and not (
            isinstance(value, list | tuple)
            and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and (key == "mean" or all(v > 0 for v in value))
        ):
            rule = "three finite numbers" + (" above 0" if key == "std" else "")
            raise CorruptInput(f"{where}.{key} must be {rule}, got {echo(value)}")
    for key, names in (("interpolation", INTERPOLATIONS), ("resize_mode", RESIZE_MODES), ("mode", ("RGB",))):
        if pcfg.get(key) is not None and pcfg[key] not in names:
            raise CorruptInput(f"{where}.{key} must be one of {', '.join(names)}, got {echo(pcfg[key])}")
    fill = pcfg.get("fill_color", 0)  # the "longest" mode's padding: one grey level
    if isinstance(fill, bool) or not isinstance(fill, int) or not 0 <= fill <= 255:
        raise CorruptInput(f"{where}.fill_color must be an integer in 0..255, got {echo(fill)}")
    return pcfg


def _pair(size: object) -> tuple[int, int] | None:
    """(height, width) of an image size given as one int or two (None when it is neither)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, list | tuple) and len(size) == 2 and all(type(v) is int for v in size):
        return size[0], size[1]
    return None


def _pcfg_fields(cfg: dict) -> dict:
    keys = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
    out = {k: cfg[k] for k in keys if k in cfg}
    for k in ("mean", "std"):
        if k in out:
            out[k] = tuple(float(v) for v in out[k])
    if isinstance(out.get("size"), list):
        out["size"] = tuple(out["size"])
    return out
