"""An SAU profile on disk and as a picture: the trigger latent tau, the mean activation map, the settings and
the model's fingerprint, in one safetensors file (written atomically, never over an existing file)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..plots import figure_to_image, new_figure
from ..safetensors_io import atomic_save, read_metadata
from ..tokens import readable
from .algebra import SAUSettings

PROFILE_KEY = "backdoor_seal.sau_profile"


@dataclass
class SAUProfile:
    """What SAU learns about one model and trigger: tau and the settings, with the model's fingerprint."""

    trigger: str
    tau: torch.Tensor
    model_hash: str
    settings: SAUSettings
    pairs: int
    activation: torch.Tensor | None = (
        None  # H x W: the mean normalised activation map of the estimation pairs
    )

    def save(self, path: str | os.PathLike) -> Path:
        """safetensors, atomic, never over an existing file (the metadata holds trigger, hash and settings)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
        meta = {
            "trigger": self.trigger,
            "model_hash": self.model_hash,
            "settings": asdict(self.settings),
            "pairs": self.pairs,
        }
        tensors = {"tau": self.tau.contiguous().float()}
        if self.activation is not None:
            tensors["activation"] = self.activation.contiguous().float()
        atomic_save(tensors, path, {PROFILE_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SAUProfile:
        """Read a profile written by save() (safetensors only, nothing unpickled)."""
        from safetensors.torch import load_file

        meta = read_metadata(path)
        if PROFILE_KEY not in meta:
            raise ValueError(f"{path}: not an SAU profile (no {PROFILE_KEY} metadata)")
        info = json.loads(meta[PROFILE_KEY])
        tensors = load_file(str(path))
        return cls(
            trigger=info["trigger"],
            tau=tensors["tau"],
            model_hash=info["model_hash"],
            settings=SAUSettings(**info["settings"]),
            pairs=int(info["pairs"]),
            activation=tensors.get("activation"),
        )


def profile_image(profile: SAUProfile) -> torch.Tensor:
    """Where the backdoor writes (|tau| per latent pixel) and where it acts (the mean activation map), as an IMAGE."""
    panels = [("|tau|", profile.tau.float().norm(dim=0))]
    if profile.activation is not None:
        panels.append((f"{profile.settings.signal} map", profile.activation.float()))
    fig = new_figure(3.4 * len(panels), 3.4)
    for i, (title, values) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        shown = ax.imshow(values.numpy(), cmap="magma")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"SAU profile for {readable(profile.trigger)} ({profile.pairs} pairs)", fontsize=10)
    fig.tight_layout()
    return figure_to_image(fig)
