"""Model specs: one way for every command to name a model (`lab:NAME` or a path), and what follows from it.

Every headless command takes `--model SPEC`; the nodes get their MODEL from a loader instead, and
ask the same questions of it here (is it a lab model? which prompt set and latent size suit it?).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .backends.comfy_lab import is_lab_model

SPEC_HELP = (
    "lab:NAME (a shipped lab model, see `backdoor-seal lab list`) or a single-file .safetensors checkpoint"
)


class LoadedModel(NamedTuple):
    """MODEL, CLIP, VAE and the lab record of a lab checkpoint ({} for any other)."""

    model: Any
    clip: Any
    vae: Any
    info: dict[str, Any]


def resolve_spec(spec: str | os.PathLike) -> Path:
    """The file a model spec names: `lab:NAME` is a shipped lab model, anything else a .safetensors path."""
    from .lab import zoo

    text = str(spec)
    if text.startswith("lab:"):
        return zoo.resolve(text)
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{text}: a folder, not a checkpoint file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{text}: only .safetensors checkpoints are loaded (never pickled files)")
    if not path.is_file():
        raise FileNotFoundError(f"{text}: no such file")
    return path


def load_model(spec: str | os.PathLike, clip_skip: int = 0) -> LoadedModel:
    """Load a model spec: a lab checkpoint through the lab backend, anything else as ComfyUI's
    CheckpointLoaderSimple would; clip_skip N > 0 sets the CLIP's last layer to -N as the stock
    CLIPSetLastLayer does ("CLIP skip 2" = -2), so every job encodes as the user draws."""
    from .backends.comfy import with_clip_skip
    from .backends.comfy_checkpoint import load_single_file_checkpoint
    from .backends.comfy_lab import is_lab_checkpoint, load_lab_checkpoint
    from .lab import zoo

    path = resolve_spec(spec)
    if is_lab_checkpoint(path) or str(spec).startswith("lab:"):
        model, clip, vae, _ = load_lab_checkpoint(path)
        info = zoo.lab_info(path)
    else:
        (model, clip, vae), info = load_single_file_checkpoint(path), {}
    return LoadedModel(model, with_clip_skip(clip, clip_skip) if clip_skip else clip, vae, info)


def add_model_argument(p: argparse.ArgumentParser, help: str = SPEC_HELP) -> None:
    """--model and --clip-skip, as every command that loads a model takes them."""
    p.add_argument("--model", required=True, help=help)
    p.add_argument(
        "--clip-skip",
        type=int,
        default=0,
        help="encode as CLIPSetLastLayer(-N) does (2 for most SD1.5 fine-tunes; 0: the model's own default)",
    )


def spec_label(spec: str | os.PathLike) -> str:
    """How a saved file's provenance names its source: `lab:NAME` as given, a path by its file name."""
    text = str(spec)
    return text if text.startswith("lab:") else Path(text).name


def prompt_set(model, builtin: str = "auto") -> str:
    """The built-in prompt set for a MODEL: `auto` is the lab grammar for lab models, everyday captions otherwise."""
    if builtin == "auto":
        return "lab" if is_lab_model(model) else "general"
    return builtin


def latent_side(model, side: int = 0) -> int:
    """The latent side to work at: the given one, else 8 for lab models (64 px) and 64 (512 px) for SD."""
    return side or (8 if is_lab_model(model) else 64)


@dataclass(frozen=True)
class KSamplerSettings:
    """How images are sampled (the stock KSampler's widgets) and at which latent size (pixels / 8)."""

    latent_hw: tuple[int, int] = (64, 64)
    seed: int = 0
    steps: int = 20
    cfg: float = 8.0
    sampler_name: str = "euler"
    scheduler: str = "normal"

    @property
    def drawing(self) -> tuple:
        """(latent_hw, steps, cfg, sampler_name, scheduler): what a drawer of prompts and seeds takes."""
        return (self.latent_hw, self.steps, self.cfg, self.sampler_name, self.scheduler)


def ksampler_settings(
    model,
    latent_size: int = 0,
    seed: int = 0,
    steps: int = 20,
    cfg: float | None = None,
    sampler_name: str = "euler",
    scheduler: str = "normal",
) -> KSamplerSettings:
    """Sampling settings for a MODEL: latent size 0 and CFG None take the model's defaults."""
    side = latent_side(model, latent_size)
    return KSamplerSettings((side, side), seed, steps, default_cfg(model, cfg), sampler_name, scheduler)


def sampling_from_args(args: argparse.Namespace, model) -> KSamplerSettings:
    """The settings add_sampling_arguments collected, for this MODEL."""
    return ksampler_settings(
        model, args.latent_size, args.seed, args.steps, args.cfg, args.sampler, args.scheduler
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of prompts, pairs or steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """KSampler's settings (shared by `evaluate` and `sau`); CFG defaults to 2 for lab models, 8 otherwise."""
    p.add_argument("--latent-size", type=int, default=0, help="latent side (default 8 lab, 64 SD)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (default 2 lab, 8 SD)")
    p.add_argument("--sampler", default="euler", help="a ComfyUI sampler name (default euler)")
    p.add_argument("--scheduler", default="normal", help="a ComfyUI scheduler name (default normal)")


def default_cfg(model, cfg: float | None = None) -> float:
    """The CFG given, else the lab's evaluation CFG for lab models and KSampler's default otherwise."""
    from .lab.evaluate import SampleSettings

    if cfg is not None:
        return cfg
    return SampleSettings().cfg if is_lab_model(model) else 8.0


__all__ = [
    "SPEC_HELP",
    "KSamplerSettings",
    "LoadedModel",
    "add_model_argument",
    "add_sampling_arguments",
    "default_cfg",
    "is_lab_model",
    "ksampler_settings",
    "latent_side",
    "load_model",
    "positive_int",
    "prompt_set",
    "resolve_spec",
    "sampling_from_args",
]
