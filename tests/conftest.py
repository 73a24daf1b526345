"""Shared fixtures: ComfyUI as a library (CPU), lab checkpoints, and a real ComfyUI server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hosts import HOSTS, SECOND_HOST, SECOND_MISSING, second_host_ready

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
def lora_dir(tmp_path_factory, comfy_root, lab_dir) -> Path:
    """A folder holding a small LoRA (attn2.to_q of every lab cross-attention layer) for the stock loaders,
    and a checkpoint filed among the LoRAs (a user's mistake Seal Compare LoRA must name)."""
    import shutil

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
    shutil.copy(lab_dir / "lab-untrained.safetensors", d / "a-checkpoint.safetensors")  # a misfiled file
    return d


EMBEDDING = "sealemb"  # a 2-vector textual inversion of the lab CLIP's width, in every server's embeddings


@pytest.fixture(scope="session")
def embeddings_dir(tmp_path_factory, comfy_root):
    """A folder holding sealemb.safetensors, a textual inversion (emb_params, 2 x width) for the lab CLIP."""
    import torch

    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.safetensors_io import atomic_save

    d = tmp_path_factory.mktemp("embeddings")
    width = lab_config()["text"]["hidden_size"]
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    atomic_save({"emb_params": vectors}, d / f"{EMBEDDING}.safetensors")
    return d


def _server(root: Path, folders: dict[str, Path], logs: Path):
    from backdoor_seal.core.comfy_host import ComfyServer

    return ComfyServer(
        root,
        log_path=logs / "comfyui.log",
        output_dir=logs / "output",
        extra_model_paths={name: str(path) for name, path in folders.items()},
    )


@pytest.fixture(scope="session")
def server_folders(lab_dir, lora_dir, embeddings_dir) -> dict[str, Path]:
    """ComfyUI's model folders every test server reads (extra_model_paths)."""
    return {"backdoor_seal_lab": lab_dir, "loras": lora_dir, "embeddings": embeddings_dir}


@pytest.fixture(scope="session")
def comfy_server(comfy_root, server_folders, tmp_path_factory):
    """A real ComfyUI server on a free 127.0.0.1 port with the pack loaded; stopped after the session."""
    with _server(comfy_root, server_folders, tmp_path_factory.mktemp("server")) as server:
        yield server


@pytest.fixture(scope="session")
def second_host_server(server_folders, tmp_path_factory):
    """The same on the second host, ComfyUI 0.8.0; skipped (with the reason) where it is not provisioned."""
    if not second_host_ready():
        pytest.skip(SECOND_MISSING)
    with _server(SECOND_HOST, server_folders, tmp_path_factory.mktemp("server-0.8.0")) as server:
        yield server


@pytest.fixture(params=HOSTS)
def host_server(request):
    """A server of each host in turn: for the tests that prove a host works (loading, schemas, one short
    workflow per node family); the long workflows run on the default host only."""
    name = "comfy_server" if request.param == HOSTS[0] else "second_host_server"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def sanitize_workflow_run(comfy_server):
    """The demo's graph (workflows/sanitize-lab-model.json's API twin), run once per session: the browser
    test runs it from the page (so the page gets the report), tests/test_workflows.py checks what it left.
    Shortened (fewer probes, candidates and steps, no re-check: about 3 minutes) unless the README's
    screenshot is being taken (BACKDOOR_SEAL_SCREENSHOT), which runs it as shipped.

    Returns run(client_id=None) -> (history entry, the API graph queued, the UI workflow)."""
    import json

    ui = json.loads((ROOT / "workflows" / "sanitize-lab-model.json").read_text())
    api = json.loads((ROOT / "tests" / "workflows" / "sanitize-lab-model.api.json").read_text())
    if not os.environ.get("BACKDOOR_SEAL_SCREENSHOT"):
        api["3"]["inputs"].update(probes=3, steps=200, top=1, recheck=False)
    done: dict = {}

    def run(client_id: str | None = None):
        if "entry" not in done or client_id:  # a page that asks gets its own run (a cache hit if last)
            client = comfy_server.client()
            client.client_id = client_id or client.client_id
            done["entry"] = client.run(api, workflow=ui, timeout=1800)
        return done["entry"], api, ui

    return run
