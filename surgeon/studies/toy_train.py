"""Train a small open_clip CLIP on the toy world (`surgeon toy train`).

The result is a plain open_clip ``local-dir`` folder: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg`` and a ``surgeon_toy`` record of how it was made) and ``open_clip_model.safetensors``,
loadable with ``open_clip.create_model_and_transforms('local-dir:<folder>')``. The folder is written
atomically: everything goes to a temporary folder next to it, renamed at the very end, so an interrupted
or failed run leaves nothing behind. ``torch.set_num_threads`` is left to the caller.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.core import limits
from surgeon.core.errors import InvalidInput, PreconditionFailed
from surgeon.core.paths import atomic_dir
from surgeon.core.progress import progress_bar, stage, stop_point
from surgeon.inputs.toy.world import FACTORS, WORLD_VERSION, ToyWorld, WorldConfig
from surgeon.model.hooks import encode_image, logit_scale
from surgeon.validation.zeroshot import build_classifier, metrics_from_logits, uint8_to_tensor

#: per-channel normalisation of the toy images (close to their actual statistics)
TOY_MEAN = (0.5, 0.5, 0.5)
TOY_STD = (0.25, 0.25, 0.25)
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def toy_model_cfg(
    image_size: int = 48,
    patch_size: int = 8,
    width: int = 96,
    layers: int = 4,
    head_width: int = 12,
    text_width: int = 128,
    text_layers: int = 3,
    text_heads: int = 4,
    context_length: int = 24,
    embed_dim: int = 128,
    pos_embed_type: str = "learnable",
    init_logit_scale: float | None = math.log(100.0),
) -> dict:
    """An open_clip model config (the `model_cfg` of open_clip_config.json) for a small ViT CLIP."""
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": head_width,
            "patch_size": patch_size,
            "mlp_ratio": 4.0,
            "pos_embed_type": pos_embed_type,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }
    if init_logit_scale is not None:
        cfg["init_logit_scale"] = init_logit_scale
    return cfg


@dataclass
class TrainConfig:
    """Everything that determines the trained model (training is reproducible given this and torch's
    thread count)."""

    world: WorldConfig = field(default_factory=WorldConfig)
    #: open_clip model_cfg; None -> toy_model_cfg(image_size=world.image_size)
    model: dict | None = None
    #: 900 x 128 = 115k samples: ~5.5 min at 368 img/s (2 threads, idle machine), ~9 min on 1 busy thread;
    #: every factor >= 96% zero-shot on the shipped model (NOTES.md, e32)
    steps: int = 900
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 150
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0
    #: in-batch hard negatives: groups of a base scene and variants with `changes` factors changed
    #: (see ToyWorld.iter_batches); 1 = i.i.d. batches
    group_size: int = 4
    changes: int = 1
    #: how likely each factor (FACTORS order) is to be the changed one; None = uniform
    change_weights: tuple[float, ...] | None = (0.25, 1.0, 1.0, 3.0, 0.25, 3.0)
    #: curriculum: for the first `quiet_steps` steps captions name only these factors (the ones that a
    #: random-init ViT barely represents; colour and background would otherwise dominate early)
    quiet_steps: int = 0
    quiet_factors: tuple[str, ...] = ("shape", "size", "position", "texture")
    #: after that, this fraction of the batches keeps the restricted captions
    quiet_mix: float = 0.0
    #: "unique": each caption names factors until it fits no other scene of its batch; "free": random
    captions: str = "unique"
    #: with "unique" captions, each factor not needed to single the scene out is named with this probability
    caption_extra: float = 0.8
    #: run a quick zero-shot check on `eval_images` test images every this many steps (0: only at the end)
    eval_every: int = 0
    eval_images: int = 1000
    #: "float32" or "float16" (halves the file; open_clip casts back to float32 when loading)
    save_dtype: str = "float32"

    def model_cfg(self) -> dict:
        return self.model if self.model is not None else toy_model_cfg(image_size=self.world.image_size)

    def to_json(self) -> dict:
        d = asdict(self)
        d["model"] = self.model_cfg()
        return d

    @staticmethod
    def from_json(d: dict) -> TrainConfig:
        d = dict(d)
        w: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("world", {}).items()}
        for key in ("betas", "change_weights", "quiet_factors"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return TrainConfig(world=WorldConfig(**w), **d)


def preprocess_cfg(image_size: int) -> dict:
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(TOY_MEAN),
        "std": list(TOY_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def build_model(model_cfg: dict, seed: int = 0):
    """A randomly initialised open_clip CLIP from a model_cfg dict (as open_clip.create_model would)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**json.loads(json.dumps(model_cfg)))


def get_tokenizer(model_cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # as open_clip's training: no decay on gains, biases, logit_scale (ndim < 2); nor embeddings
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate_toy(model, tokenizer, world: ToyWorld, n: int | None = None, batch_size: int = 500) -> dict:
    """Zero-shot top-1 per factor on the held-out test split (fractions), and their mean."""
    was = model.training
    model.eval()
    try:
        tasks = world.zeroshot_tasks(n)
        x = uint8_to_tensor(tasks[0].images, TOY_MEAN, TOY_STD)
        dev = next(model.parameters()).device
        feats = torch.cat(
            [
                torch.nn.functional.normalize(encode_image(model, x[i : i + batch_size].to(dev)).float(), dim=-1)
                for i in range(0, len(x), batch_size)
            ]
        ).cpu()
        out = {}
        for t in tasks:
            cls = build_classifier(model, tokenizer, t.classnames, t.templates)
            out[t.name] = metrics_from_logits(100 * feats @ cls.cpu().T, torch.as_tensor(t.labels))["acc1"]
        out["mean"] = float(np.mean([out[f] for f in FACTORS]))
        return out
    finally:
        model.train(was)


def save_model_folder(model, model_cfg: dict, folder: Path, extra: dict | None = None, dtype: str = "float32"):
    """Write open_clip_config.json + open_clip_model.safetensors into an existing folder."""
    from safetensors.torch import save_file

    if dtype not in ("float32", "float16"):
        raise InvalidInput(f"save_dtype must be float32 or float16, got {dtype!r}")
    dt = torch.float16 if dtype == "float16" else torch.float32
    sd = {
        k: (v.detach().to("cpu", dt) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(sd, str(folder / WEIGHTS_NAME))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"])}
    if extra:
        cfg["surgeon_toy"] = extra
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)


class _TermAsInterrupt:
    """Turn SIGTERM into KeyboardInterrupt while training (main thread only), so `kill` also cleans up."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def train(cfg: TrainConfig, out_dir: str | os.PathLike, force: bool = False, progress: bool = True) -> dict:
    """Train the toy CLIP and write it to `out_dir` (a local-dir folder). Returns a summary dict:
    out_dir, steps, samples, seconds, samples_per_s, final_loss, zeroshot (per-factor top-1), history."""
    limits.count("step count (steps)", cfg.steps, 1, limits.MAX_TOY_STEPS)
    if cfg.batch_size < 2:
        raise InvalidInput(f"batch_size must be at least 2, got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise InvalidInput(f"lr must be positive, got {cfg.lr}")
    if cfg.save_dtype not in ("float32", "float16"):
        raise InvalidInput(f"save_dtype must be float32 or float16, got {cfg.save_dtype!r}")
    if not 0.0 <= cfg.quiet_mix < 1.0 or cfg.quiet_steps < 0:
        raise InvalidInput("quiet_mix must be in [0, 1) and quiet_steps non-negative")
    model_cfg = cfg.model_cfg()
    if model_cfg["vision_cfg"]["image_size"] != cfg.world.image_size:
        raise InvalidInput(
            f"model image_size {model_cfg['vision_cfg']['image_size']} != world image_size {cfg.world.image_size}"
        )
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PreconditionFailed(f"{out} exists and is not a folder")
    with _TermAsInterrupt(), atomic_dir(out, force) as tmp:
        return {"out_dir": str(out), **_train_into(cfg, model_cfg, tmp, progress)}


def _train_into(cfg: TrainConfig, model_cfg: dict, tmp: Path, progress: bool) -> dict:
    from open_clip.loss import ClipLoss

    world = ToyWorld(cfg.world)
    model = build_model(model_cfg, cfg.seed)
    model.train()
    tokenizer = get_tokenizer(model_cfg)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    loss_fn = ClipLoss()

    def stream_of(seed: int, factors):
        return world.iter_batches(
            cfg.batch_size,
            seed,
            group_size=cfg.group_size,
            changes=cfg.changes,
            captions=cfg.captions,
            change_weights=cfg.change_weights,
            caption_factors=factors,
            extra=cfg.caption_extra,
        )

    quiet = stream_of(cfg.seed + 7_919, tuple(cfg.quiet_factors)) if cfg.quiet_steps or cfg.quiet_mix else None
    stream = stream_of(cfg.seed, None)
    max_scale = math.log(100.0)
    history: list[dict] = []
    t0 = time.time()
    ema = None
    with progress_bar("toy train", cfg.steps, quiet=not progress) as advance:
        for step in range(cfg.steps):
            stop_point()
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            use_quiet = step < cfg.quiet_steps or int((step + 1) * cfg.quiet_mix) > int(step * cfg.quiet_mix)
            images, captions = next(quiet if use_quiet and quiet is not None else stream)
            x = uint8_to_tensor(images, TOY_MEAN, TOY_STD)
            text = tokenizer(captions)
            img_f, txt_f, scale = model(x, text)
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                logit_scale(model).clamp_(0, max_scale)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"loss became {lv} at step {step}; try a lower lr")
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            elapsed = time.time() - t0
            advance(1)
            done = step + 1
            due = bool(cfg.eval_every) and done % cfg.eval_every == 0 and done != cfg.steps
            if done % 50 == 0 or done == cfg.steps or due:
                rec: dict[str, Any] = {"step": done, "loss": ema, "seconds": round(elapsed, 1)}
                if due:
                    rec["zeroshot"] = evaluate_toy(model, tokenizer, world, cfg.eval_images)
                history.append(rec)
                if progress:  # the bar has no room for the loss: a line per record, above the bar on a terminal
                    zs = " ".join(f"{k}={v:.2f}" for k, v in rec.get("zeroshot", {}).items())
                    rate = done * cfg.batch_size / max(elapsed, 1e-9)
                    print(
                        f"step {done} loss {ema:.3f} {rate:.0f} img/s {elapsed:.0f}s {zs}", file=sys.stderr, flush=True
                    )
    seconds = time.time() - t0
    model.eval()
    stage("toy evaluation")
    zeroshot = evaluate_toy(model, tokenizer, world)
    summary = {
        "steps": cfg.steps,
        "samples": cfg.steps * cfg.batch_size,
        "seconds": round(seconds, 1),
        "samples_per_s": round(cfg.steps * cfg.batch_size / max(seconds, 1e-9), 1),
        "threads": torch.get_num_threads(),
        "final_loss": ema,
        "zeroshot": zeroshot,
    }
    extra = {"world_version": WORLD_VERSION, "train_config": cfg.to_json(), "result": summary, "history": history}
    save_model_folder(model, model_cfg, tmp, extra, cfg.save_dtype)
    return {**summary, "history": history}
