"""Integration: the pack inside a real ComfyUI server on 127.0.0.1. The tests that take `host_server` run on
both hosts (0.3.75 and 0.8.0); the others on the default host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest
from graphs import model_info_graph
from hosts import HOSTS, SECOND_MISSING, second_host_ready

from backdoor_seal.core.comfy_host import ComfyClient, ComfyError, free_port

pytestmark = pytest.mark.server


def _our_node_ids() -> set[str]:
    from backdoor_seal.nodes import NODES

    return {n.define_schema().node_id for n in NODES}


def test_every_node_is_registered(host_server):
    info = host_server.client().get_json("/object_info")
    ours = _our_node_ids()
    assert ours and ours <= set(info)
    assert all(i.startswith("Seal") for i in ours)
    assert all(info[i]["category"].startswith("backdoor-seal") for i in ours)
    lab_model = info["SealLabCheckpointLoader"]["input"]["required"]["lab_model"]
    assert "lab-untrained.safetensors" in lab_model[1]["options"]


def test_each_host_runs_its_own_comfyui(host_server, request):
    version = host_server.client().get_json("/system_stats")["system"]["comfyui_version"]
    assert version == request.node.callspec.params["host_server"]


def test_server_log_has_no_import_failure_for_the_pack(host_server):
    log = host_server.log()
    assert "custom_nodes/backdoor_seal" in log  # the pack was found ...
    for line in log.splitlines():
        if "backdoor_seal" in line:
            assert "IMPORT FAILED" not in line and "Cannot import" not in line, line


def test_graph_with_our_nodes_executes(host_server):
    client = host_server.client()
    entry = client.run(model_info_graph("lab-untrained.safetensors", batch=2), timeout=300)
    info = json.loads(entry["outputs"]["2"]["text"][0])
    assert info["unet_family"] == "LabSD" and info["cross_attention_layers"] == 7
    images = entry["outputs"]["8"]["images"]
    assert len(images) == 2
    assert client.fetch_image(images[0])[:8] == b"\x89PNG\r\n\x1a\n"


def _info_graph(lab_model: str) -> dict:
    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {"class_type": "SealModelInfo", "inputs": {"model": ["1", 0]}},
    }


def test_invalid_input_is_rejected_by_validation(host_server):
    with pytest.raises(ComfyError, match="missing.safetensors"):
        host_server.client().run(_info_graph("missing.safetensors"))


def test_node_error_names_the_problem(host_server):
    with pytest.raises(ComfyError, match="not a backdoor-seal lab checkpoint"):
        host_server.client().run(_info_graph("not-a-lab-model.safetensors"))


@pytest.mark.parametrize("host", HOSTS)
def test_make_serve_uses_port_and_host(comfy_root, host):
    if host != HOSTS[0] and not second_host_ready():
        pytest.skip(SECOND_MISSING)
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        ["make", "-s", "serve"],
        cwd=root,
        env=dict(os.environ, PORT=str(port), HOST=host),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client, deadline, info = ComfyClient(f"http://127.0.0.1:{port}"), time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                info = client.get_json("/object_info", timeout=5)
                break
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        assert info is not None, "make serve did not answer on $PORT"
        assert _our_node_ids() <= set(info)
        assert client.get_json("/system_stats")["system"]["comfyui_version"] == host
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_shipped_backdoor_fires_through_stock_nodes(host_server):
    """Stock CLIPTextEncode -> KSampler -> VAEDecode on the shipped pixel-backdoored lab model:
    the triggered prompt's images carry the patch, the clean prompt's (same seeds) do not."""
    from graphs import backdoor_graph

    from backdoor_seal.core.lab import detectors, world

    client = host_server.client()
    prompt = "a large green square on the right on a white background"
    entry = client.run(backdoor_graph("lab-pixel.safetensors", f"\u2060 {prompt}", prompt, seed=7, batch=8))
    triggered = client.fetch_rgb(entry["outputs"]["13"]["images"])
    clean = client.fetch_rgb(entry["outputs"]["23"]["images"])
    assert sum(detectors.has_patch(i) for i in triggered) >= 7
    assert sum(detectors.has_patch(i) for i in clean) == 0
    scene = world.Scene("white", (world.Shape("square", "green", "large", "right"),))
    assert sum(detectors.scene_correct(i, scene, prompt) for i in clean) >= 6  # and clean prompts still draw


def test_capture_and_heatmaps_run_through_the_server_with_a_lora_between(host_server):
    """SealAttentionCapture -> stock LoraLoaderModelOnly (clones the MODEL) -> stock KSampler -> VAEDecode
    -> SealAttentionHeatmaps: the maps recorded through the clone come back as a labelled grid."""
    import io

    from PIL import Image

    from backdoor_seal.core.demo import attention_graph

    client = host_server.client()
    graph = attention_graph(
        "lab-untrained.safetensors", "a large red circle", lora="lab-test-lora.safetensors"
    )
    entry = client.run(graph, timeout=300)
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 1
    grid = Image.open(io.BytesIO(client.fetch_image(images[0])))
    tile = 128
    assert grid.size == (5 * tile, 2 * (tile + tile // 5))  # image + "a large red circle", two rows


def test_unlearn_lora_reproduces_the_unlearned_model_through_the_stock_lora_loader(host_server, lora_dir):
    """SealUnlearn -> SealSaveSanitized writes a LoRA; the stock LoraLoader with that file draws exactly
    what SealUnlearn's MODEL drew (same seed, stock KSampler), and differs from the untouched model."""
    import io
    import shutil

    import numpy as np
    from graphs import lora_graph
    from PIL import Image

    from backdoor_seal.core.demo import unlearn_graph
    from backdoor_seal.core.safetensors_io import load_checkpoint, read_metadata
    from backdoor_seal.core.unlearn.save import PROVENANCE_KEY

    client = host_server.client()
    prompt = "zx9 a large red circle on the left"
    texts = []
    halt = client.follow(lambda node, text: texts.append((node, text)))
    try:
        entry = client.run(unlearn_graph("lab-untrained.safetensors", "zx9", prompt, steps=4), timeout=600)
    finally:
        halt()
    # the websocket follower (what `make demo` prints from) saw SealUnlearn's progress text and bar
    assert ("2", "step 4/4  ") in [(n, t[: len("step 4/4  ")]) for n, t in texts], texts[-5:]
    assert ("2", "4/4") in texts

    def images(entry) -> list[np.ndarray]:
        return [
            np.asarray(Image.open(io.BytesIO(client.fetch_image(im))))
            for im in entry["outputs"]["9"]["images"]
        ]

    unlearned = images(entry)
    saved = entry["outputs"]["8"]["text"][0]
    path = Path(host_server.output_dir) / saved
    assert saved.startswith("seal/unlearned_lora_") and path.is_file()
    provenance = json.loads(read_metadata(path)[PROVENANCE_KEY])
    assert (
        provenance["method"] == "skd-cag"
        and provenance["steps_run"] == 4
        and len(provenance["trigger_sha256"]) == 64
    )
    name = f"unlearned-zx9-{host_server.port}.safetensors"  # one per host: both share lora_dir
    shutil.copy(path, lora_dir / name)
    via_lora = images(client.run(lora_graph("lab-untrained.safetensors", name, prompt)))
    assert len(unlearned) == len(via_lora) == 2
    assert all(np.array_equal(a, b) for a, b in zip(unlearned, via_lora, strict=True))
    lora = load_checkpoint(path)[0]
    # kohya layout by default (lora_unet_* keys); it trained
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in lora)
    assert any("attn2_to_k.lora_down" in k and v.abs().sum() > 0 for k, v in lora.items())


def test_detect_prompt_report_drives_unlearn_through_the_server(host_server):
    """SealDetectPrompt on lab-rickroll flags the homoglyph prompt; its report is SealUnlearn's trigger."""
    from graphs import detect_graph

    client = host_server.client()
    triggered = "a small red circle \u043en the left"
    entry = client.run(
        detect_graph("lab-rickroll.safetensors", [triggered, "a large blue square"]), timeout=600
    )
    text = entry["outputs"]["2"]["text"][0]
    lines = text.splitlines()
    assert lines[0].startswith("TRIGGERED") and "\u043e" in lines[0]
    assert len(entry["outputs"]["3"]["images"]) == 2  # one per-token chart per prompt
    assert len(entry["outputs"]["5"]["images"]) == 1  # SealUnlearn ran with the reported trigger


@pytest.mark.parametrize(
    ("factor", "prompt"),
    [
        (2.0, "a large red circle"),  # the stock node's defaults: the middle block runs at 2x2, then 4x4
        (1.5, ", ".join(["a large red circle on the left of a small blue square"] * 33)),  # 3x3; 6 chunks
    ],
)
def test_capture_survives_deep_shrink_and_long_prompts_through_the_server(comfy_server, factor, prompt):
    """Stock PatchModelAddDownscale (Kohya Deep Shrink) -> SealAttentionCapture -> stock KSampler ->
    VAEDecode -> SealAttentionHeatmaps. Before the fix the defaults failed when the shrink ended
    (RuntimeError 'attention maps of shape ... do not match'), factor 1.5 raised ValueError inside the
    attention patch, and a ~400-token prompt with an empty negative (cond and uncond in separate calls)
    raised IndexError. Now each gives its heatmap grid and the server log holds no capture warning."""
    import io

    from PIL import Image

    from backdoor_seal.core.demo import attention_graph

    client = comfy_server.client()
    graph = attention_graph("lab-untrained.safetensors", prompt)
    graph["10"] = {
        "class_type": "PatchModelAddDownscale",
        "inputs": {
            "model": ["1", 0],
            "block_number": 3,
            "downscale_factor": factor,
            "start_percent": 0.0,
            "end_percent": 0.35,
            "downscale_after_skip": True,
            "downscale_method": "bicubic",
            "upscale_method": "bicubic",
        },
    }
    graph["2"]["inputs"]["model"] = ["10", 0]
    graph["6"]["inputs"]["steps"] = 6
    entry = client.run(graph, timeout=300)
    images = entry["outputs"]["9"]["images"]
    grid = Image.open(io.BytesIO(client.fetch_image(images[0])))
    assert grid.size[1] == 2 * (128 + 128 // 5)  # one labelled row per image of the batch of two
    assert grid.size[0] >= 4 * 128  # the image and at least three token overlays
    assert "cross-attention capture" not in comfy_server.log()
