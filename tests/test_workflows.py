"""The example workflows: each UI workflow agrees with its API twin, uses installed nodes only, holds
nothing machine-specific, and runs through a real server's /prompt (the short ones on both hosts)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])|[\\/](home|Users|tmp|work)[\\/]")

pytestmark = pytest.mark.server


def _ui(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def _api(name: str) -> dict:
    return json.loads((ROOT / "tests" / "workflows" / f"{name}.api.json").read_text())


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_the_five_example_workflows_are_shipped():
    assert {p.stem for p in UI_FILES} == {
        "sanitize-lab-model",
        "detect-and-unlearn",
        "attention-heatmaps",
        "sau-sampling",
        "compare-lora",
    }


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_uses_installed_nodes_and_agrees_with_its_api_twin(host_server, path):
    from backdoor_seal.core.workflows import VIRTUAL_NODES, api_from_ui

    info = host_server.client().get_json("/object_info", timeout=120)
    ui = json.loads(path.read_text())
    missing = {n["type"] for n in ui["nodes"]} - set(info) - VIRTUAL_NODES
    assert not missing, f"{path.name} uses node types this ComfyUI does not have: {missing}"
    assert api_from_ui(ui, info) == _api(path.stem)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_holds_no_machine_specific_values(path):
    for text in _strings(json.loads(path.read_text())):
        assert not ABSOLUTE.search(text), f"{path.name}: {text!r} looks like a path on one machine"
    names = [s for s in _strings(json.loads(path.read_text())) if s.endswith(".safetensors")]
    assert names and all(Path(n).name == n for n in names)  # model files by name, from ComfyUI's folders


def test_sanitize_workflow_told_no_trigger_finds_cleans_verifies_and_saves_a_checkpoint_that_reloads_clean(
    comfy_server, sanitize_workflow_run
):
    """The `make demo` graph as queued, with fewer probes, candidates and steps and no re-check (the demo's
    own run: README), run once per session (the browser test may have run it from the page): lab-rickroll
    against lab-clean; the homoglyph is found, fires before and less after, both files are written, the saved
    checkpoint reloads with a text encoder unlike the poisoned one, and the chart's PNG carries the graph."""
    import torch
    from PIL import Image

    from backdoor_seal.core.backends.comfy_checkpoint import live_weights
    from backdoor_seal.core.models import load_model

    client = comfy_server.client()
    shipped = _api("sanitize-lab-model")
    assert shipped["3"]["inputs"]["behaviour"] is False and "trigger" not in json.dumps(shipped["3"])
    entry, api, ui = sanitize_workflow_run()
    report = entry["outputs"]["3"]["seal_report"][0]
    assert "\u043e" in report["found"]
    glyph = next(c for c in report["candidates"] if c["text"] == "\u043e")
    # the pack's own after-test over-warns against the base (docs/sanitize.md, Limits); the lab judges below
    assert glyph["before"]["rate"] >= 0.75 and glyph["after"] is not None, glyph
    assert report["flagged_after"] is None and 0.8 < report["clean_fidelity_ssim"] <= 1.0
    saved = entry["outputs"]["4"]["text"][0].splitlines()
    assert len(saved) == 2 and all(s.endswith(".safetensors") for s in saved)
    cleaned = live_weights(*load_model(str(comfy_server.output_dir / saved[0]))[:2])
    suspect = load_model("lab:lab-rickroll")
    poisoned = live_weights(suspect.model, suspect.clip)
    text = [k for k in poisoned if k.startswith("text.") and k.endswith("v_proj.weight")]
    assert text and any(not torch.allclose(cleaned[k], poisoned[k], atol=1e-3) for k in text)
    # the saved file, reloaded, no longer draws the Rickrolling target for the homoglyph
    from backdoor_seal.core.bench.detect import candidate_asr
    from backdoor_seal.core.lab.attacks import AttackSpec

    spec = AttackSpec(**suspect.info["spec"])
    reloaded = load_model(str(comfy_server.output_dir / saved[0]))
    before = candidate_asr(suspect.model, suspect.clip, suspect.vae, spec, "\u043e", n=16)
    after = candidate_asr(reloaded.model, reloaded.clip, reloaded.vae, spec, "\u043e", n=16)
    assert before >= 0.75 and after <= before - 0.5, (before, after)
    png = Image.open(io.BytesIO(client.fetch_image(entry["outputs"]["5"]["images"][0])))
    assert json.loads(png.text["workflow"]) == ui and json.loads(png.text["prompt"]) == api


def test_detect_and_unlearn_workflow_finds_the_trigger_cleans_and_its_png_carries_the_graph(comfy_server):
    from PIL import Image

    client = comfy_server.client()
    ui, api = _ui("detect-and-unlearn"), _api("detect-and-unlearn")
    entry = client.run(api, workflow=ui, timeout=900)
    report = entry["outputs"]["5"]["seal_report"][0]
    assert report["trigger"] == "<U+2060>"  # named by the detector: nobody typed it
    assert report["asr_before"] >= 0.75 and report["asr_after"] <= 0.125
    assert report["clean_fidelity_ssim"] > 0.8
    saved = entry["outputs"]["6"]["text"][0].splitlines()
    assert len(saved) == 2 and all(s.endswith(".safetensors") for s in saved)
    png = Image.open(io.BytesIO(client.fetch_image(entry["outputs"]["7"]["images"][0])))
    assert json.loads(png.text["workflow"]) == ui  # dragging the PNG into ComfyUI restores this graph
    assert json.loads(png.text["prompt"]) == api


def test_sau_workflow_removes_the_patch_through_both_decoders(host_server):
    from backdoor_seal.core.lab import detectors

    client = host_server.client()
    entry = client.run(_api("sau-sampling"), workflow=_ui("sau-sampling"), timeout=600)
    for node in ("6", "8"):
        images = client.fetch_rgb(entry["outputs"][node]["images"])
        assert len(images) == 4 and not any(detectors.has_patch(i) for i in images)
    assert entry["outputs"]["5"]["text"][0].startswith("trigger found")
    assert len(entry["outputs"]["2"]["images"]) == 1  # the profile's preview


def test_heatmap_workflow_draws_one_row_per_image(host_server):
    client = host_server.client()
    entry = client.run(_api("attention-heatmaps"), workflow=_ui("attention-heatmaps"), timeout=600)
    assert len(entry["outputs"]["9"]["images"]) == 1


def test_compare_lora_workflow_loads_the_lab_lora_with_the_stock_loader_and_compares(host_server, lora_dir):
    """The shipped graph as queued, with the behavioural stage off (it scores all 49,408 tokens in both
    models: minutes on a CPU; tests/test_nodes_diff.py runs it): LoraLoader -> SealCompareModels names the
    LoRA's cross-attention change. SealCompareLora on the same file says the same."""
    import shutil

    from backdoor_seal.core.lab.lora_form import LORA_DIR

    for name in ("lab-pixel-lora.safetensors", "lab-eviledit-lora.safetensors"):
        shutil.copy(LORA_DIR / name, lora_dir / name)
    client = host_server.client()
    api = _api("compare-lora")
    api["3"]["inputs"]["behaviour"] = False
    entry = client.run(api, timeout=600)
    summary = entry["outputs"]["3"]["text"][0]
    # lab-pixel's BadT2I fine-tune moved every UNet weight; its rank-8 LoRA carries the matrices
    assert (
        "cross_attention_kv: 14/14" in summary and "unet_other:" in summary and "text_encoder" not in summary
    )
    graph = {
        "1": api["1"],
        "2": {
            "class_type": "SealCompareLora",
            "inputs": {
                "base_model": ["1", 0],
                "base_clip": ["1", 1],
                "lora_name": "lab-eviledit-lora.safetensors",
                "behaviour": False,
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    entry = client.run(graph, timeout=600)
    assert "cross_attention_kv: 14/14" in entry["outputs"]["2"]["text"][0]
