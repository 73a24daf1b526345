"""SealCompareModels / SealCompareLora on shipped lab models and LoRAs (real ComfyUI, in-process)."""

from __future__ import annotations

import shutil

import pytest


def _load(name):
    from backdoor_seal.core.models import load_model

    return load_model(f"lab:{name}")


def test_compare_node_names_the_text_encoder_change_and_the_homoglyph_in_weight_space(comfy_root):
    """Weight space only (behaviour off): lab-rickroll changed its text encoder and nothing else, and the
    Cyrillic о leads the whole vocabulary's ranking."""
    from backdoor_seal.nodes.nodes_diff import SealCompareModels

    base, rick = _load("lab-clean"), _load("lab-rickroll")
    out = SealCompareModels.execute(base.model, base.clip, rick.model, rick.clip, behaviour=False)
    report, plot, evidence = out.result
    changed = {k for k, v in report["components"].items() if v["changed"]}
    assert changed == {"text_encoder"} and report["unet_evals"] == 0
    assert report["candidates"][0]["text"] == "\u043e"
    assert report["poisoned"] is None and report["threshold_lift"] is None  # only the behaviour stage judges
    assert plot.ndim == 4 and plot.shape[-1] == 3 and evidence.shape == plot.shape


def test_compare_node_flags_the_homoglyph_trigger_and_draws_its_evidence(comfy_root, monkeypatch):
    """The behavioural stage on lab-rickroll's Cyrillic о among 120 tokens: flagged, and the evidence grid
    is drawn with the VAE (one row: base and suspect, without and with the token)."""
    from backdoor_seal.core.diff.behaviour import BehaviourScan
    from backdoor_seal.core.diff.session import DiffSession
    from backdoor_seal.core.triggers import trigger_from
    from backdoor_seal.nodes.nodes_diff import SealCompareModels

    base, rick = _load("lab-clean"), _load("lab-rickroll")
    homoglyph = rick.clip.tokenize("\u043e")["l"][0][1][0]
    tokens = [homoglyph, *range(3000, 3120)]
    monkeypatch.setattr(BehaviourScan, "vocabulary", lambda self: tokens)
    # the weight-space stage ranks the same tokens (its whole-vocabulary run is the test above)
    monkeypatch.setattr(DiffSession, "vocabulary", lambda self: tokens)
    monkeypatch.setattr(DiffSession, "sequence_units", lambda self: [])
    out = SealCompareModels.execute(base.model, base.clip, rick.model, rick.clip, vae=base.vae)
    report, plot, evidence = out.result
    assert report["candidates"][0]["token_id"] == homoglyph and report["flagged"][0] == "\u043e"
    assert trigger_from("", report) == "\u043e"
    assert evidence.ndim == 4 and evidence.shape[1:] != plot.shape[1:]  # the grid, not the chart again


def test_compare_lora_node_loads_the_file_as_loraloader_and_compares(comfy_root, tmp_path, monkeypatch):
    import folder_paths

    from backdoor_seal.core.lab.lora_form import LORA_DIR
    from backdoor_seal.nodes.nodes_diff import SealCompareLora

    shutil.copy(LORA_DIR / "lab-eviledit-lora.safetensors", tmp_path / "lab-eviledit-lora.safetensors")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    base = _load("lab-clean")
    out = SealCompareLora.execute(base.model, base.clip, "lab-eviledit-lora.safetensors", behaviour=False)
    report, _plot, _evidence, model, clip = out.result
    assert report["lora"] == "lab-eviledit-lora.safetensors"
    assert {k for k, v in report["components"].items() if v["changed"]} == {"cross_attention_kv"}
    assert model is not base.model and clip is base.clip  # a UNet-only LoRA: the CLIP passes through
    with pytest.raises(ValueError, match="only .safetensors"):
        SealCompareLora.execute(base.model, base.clip, "evil.ckpt", behaviour=False)


def test_detect_prompt_with_a_base_names_the_object_trigger_and_clears_the_clean_prompt(comfy_root):
    from backdoor_seal.core.triggers import trigger_from
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    base, obj = _load("lab-clean"), _load("lab-object")
    prompts = "sks a red circle on the left on a black background\na large blue circle on the top"
    out = SealDetectPrompt.execute(obj.model, obj.clip, prompts, base_model=base.model, base_clip=base.clip)
    report, images = out.result
    triggered, clean = report["prompts"]
    assert report["detector"] == "differential" and triggered["poisoned"] and not clean["poisoned"]
    assert triggered["trigger"] == "sks" and trigger_from("", report) == "sks"
    assert images.shape[0] == 2
    with pytest.raises(ValueError, match="both base_model and base_clip"):
        SealDetectPrompt.execute(obj.model, obj.clip, prompts, base_model=base.model)


def test_detect_prompt_against_the_model_itself_flags_nothing(comfy_root):
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    base = _load("lab-clean")
    prompts = "sks a red circle on the left\na large blue circle on the top"
    report, _ = SealDetectPrompt.execute(
        base.model, base.clip, prompts, base_model=base.model, base_clip=base.clip
    ).result
    assert not report["poisoned"] and all(t["effect"] == 0.0 for p in report["prompts"] for t in p["tokens"])
