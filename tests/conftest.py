"""Shared fixtures: ComfyUI as a library (CPU), lab checkpoints, and a real ComfyUI server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# per-model caches (calibrations) of this run go to a fresh folder, never the user's, servers included
os.environ["BACKDOOR_SEAL_CACHE"] = tempfile.mkdtemp(prefix="seal-cache-")


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    """The ComfyUI folder, importable as a library on CPU."""
    from backdoor_seal.core.backends.comfy import ensure_comfy_importable

    return ensure_comfy_importable()


@pytest.fixture
def output_dir(tmp_path, comfy_root):
    """ComfyUI's output folder pointed at a fresh temporary folder for one test."""
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(before)


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory, comfy_root) -> Path:
    """A folder holding an untrained lab checkpoint (trained ones are covered by the lab tests)."""
    import torch
    from graphs import make_untrained_lab_model

    from backdoor_seal.core.safetensors_io import atomic_save

    d = tmp_path_factory.mktemp("lab_models")
    make_untrained_lab_model(d / "lab-untrained.safetensors")
    atomic_save({"w": torch.zeros(1)}, d / "not-a-lab-model.safetensors")  # for error-path tests
    return d


@pytest.fixture
def lab_folder(lab_dir, tmp_path: Path) -> Path:
    """A fresh folder holding the untrained lab model as lab-clean.safetensors (a base to attack)."""
    import shutil

    d = tmp_path / "lab"
    d.mkdir()
    shutil.copy(lab_dir / "lab-untrained.safetensors", d / "lab-clean.safetensors")
    return d


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, comfy_root) -> Path:
    """A folder holding a small LoRA (attn2.to_q of every lab cross-attention layer) for the stock loaders."""
    import torch

    from backdoor_seal.core.attention import find_cross_attention_layers
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.safetensors_io import atomic_save

    d = tmp_path_factory.mktemp("loras")
    model = comfy_lab.build_lab_unet(lab_config())
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, module in find_cross_attention_layers(model.model.diffusion_model):
        key = "lora_unet_" + f"{name}.to_q".replace(".", "_")
        out_f, in_f = module.to_q.weight.shape
        lora[f"{key}.lora_down.weight"] = torch.randn(2, in_f, generator=g)
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.5
        lora[f"{key}.alpha"] = torch.tensor(2.0)
    atomic_save(lora, d / "lab-test-lora.safetensors")
    return d


@pytest.fixture(scope="session")
def comfy_server(comfy_root, lab_dir, lora_dir, tmp_path_factory):
    """A real ComfyUI server on a free 127.0.0.1 port with the pack loaded; stopped after the session."""
    from backdoor_seal.core.comfy_host import ComfyServer

    logs = tmp_path_factory.mktemp("server")
    server = ComfyServer(
        comfy_root,
        log_path=logs / "comfyui.log",
        output_dir=logs / "output",
        extra_model_paths={"backdoor_seal_lab": str(lab_dir), "loras": str(lora_dir)},
    )
    with server:
        yield server
