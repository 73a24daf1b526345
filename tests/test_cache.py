"""The per-model cache: the weights fingerprint that keys it, and Seal Detect Prompt's cached calibration."""

from __future__ import annotations

import json

import pytest


def _load(name):
    from backdoor_seal.core.models import load_model

    return load_model(f"lab:{name}")


def test_fingerprint_sees_weights_patches_and_clip_skip_but_not_clones_or_loading(comfy_root):
    import torch

    from backdoor_seal.core.backends.comfy import weights_fingerprint

    model, clip, _, _ = _load("lab-clean")
    first = weights_fingerprint(model, clip)
    assert weights_fingerprint(model.clone(), clip.clone()) == first
    key = next(k for k in model.model.state_dict() if k.endswith("attn2.to_k.weight"))
    w = model.model.state_dict()[key]
    patched = model.clone()
    patched.add_patches({key: ("diff", (torch.full_like(w, 1e-3),))}, 1.0)
    assert weights_fingerprint(patched, clip) != first
    weaker = model.clone()
    weaker.add_patches({key: ("diff", (torch.full_like(w, 1e-3),))}, 0.5)
    assert weights_fingerprint(weaker, clip) not in (first, weights_fingerprint(patched, clip))
    skip = clip.clone()
    skip.clip_layer(-2)
    assert weights_fingerprint(model, skip) != first
    # ComfyUI patches a loaded model's weights in place and keeps the originals: same fingerprint
    expected = weights_fingerprint(patched, clip)
    patched.patch_model()
    try:
        assert not torch.equal(patched.model.state_dict()[key], w)
        assert weights_fingerprint(patched, clip) == expected
    finally:
        patched.unpatch_model()
    # one text-encoder element changed
    other = _load("lab-clean")
    other_clip = other[1]
    name, tensor = next(
        (n, t) for n, t in other_clip.cond_stage_model.state_dict().items() if n.endswith("q_proj.weight")
    )
    with torch.no_grad():
        tensor.view(-1)[7] += 1e-3
    assert weights_fingerprint(other[0], other_clip) != first


def test_calibration_is_computed_once_per_model_and_prompts(comfy_root, monkeypatch, tmp_path):
    import torch

    from backdoor_seal.core.detect import session as ds
    from backdoor_seal.core.detect.session import DetectOptions, PromptDetection

    monkeypatch.setenv("BACKDOOR_SEAL_CACHE", str(tmp_path))
    model, clip, _, _ = _load("lab-pixel")
    opts = DetectOptions(lab=True, probe_prompts=8, latent_side=8)
    prompts = ["a small red circle on the left", "a large blue square", "a green triangle at the top"]
    first = PromptDetection(model, clip, opts)
    ticks = []
    cal = first.calibrate(prompts, tick=lambda: ticks.append(1))
    assert not first.calibration_cached and len(ticks) == 3
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["value"]["thresholds"] == cal.thresholds

    def never(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(ds, "calibrate_on", never)
    again = PromptDetection(model.clone(), clip.clone(), opts)
    ticks.clear()
    cached = again.calibrate(prompts, tick=lambda: ticks.append(1))
    assert again.calibration_cached and cached.thresholds == cal.thresholds and len(ticks) == 3
    report = again.run(["a small red circle \u2060 on the left"])
    assert report["calibration_cached"] is True
    # other prompts, another model (a LoRA patch) or no cache: calibrated again
    with pytest.raises(AssertionError, match="calibrated again"):
        PromptDetection(model, clip, opts).calibrate(prompts[:2])
    key = next(k for k in model.model.state_dict() if k.endswith("attn2.to_v.weight"))
    lora = model.clone()
    lora.add_patches({key: ("diff", (torch.full_like(model.model.state_dict()[key], 1e-2),))}, 1.0)
    with pytest.raises(AssertionError, match="calibrated again"):
        PromptDetection(lora, clip, opts).calibrate(prompts)
    with pytest.raises(AssertionError, match="calibrated again"):
        PromptDetection(model, clip, opts).calibrate(prompts, cache=False)


def test_a_damaged_cache_entry_is_computed_again_and_replaced(tmp_path, monkeypatch):
    from backdoor_seal.core.cache import cached, key_hash

    monkeypatch.setenv("BACKDOOR_SEAL_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert cached("k", {"a": 1}, compute) == ({"x": 1}, False)
    assert cached("k", {"a": 1}, compute) == ({"x": 1}, True)
    path = tmp_path / "k" / f"{key_hash('k', {'a': 1})}.json"
    path.write_text("{not json")
    assert cached("k", {"a": 1}, compute) == ({"x": 2}, False)
    assert cached("k", {"a": 1}, compute) == ({"x": 2}, True)
    assert cached("k", {"a": 2}, compute) == ({"x": 3}, False)


def test_detect_prompt_node_exposes_its_calibration_size(comfy_root):
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    model, clip, _, _ = _load("lab-pixel")
    with pytest.raises(ValueError, match="calibration needs at least 2 clean prompts"):
        SealDetectPrompt.execute(model=model, clip=clip, prompts="a red circle", calibration_prompts=0)
    names = [i.id for i in SealDetectPrompt.define_schema().inputs]
    assert "calibration_prompts" in names


def test_the_differential_calibration_with_a_base_is_cached_and_checks_read_the_same(
    comfy_root, monkeypatch, tmp_path
):
    """Seal Detect Prompt with a base: the second run on the same two models reads its calibration (no
    stage-2 scoring of the calibration tokens) and reports exactly what the first did."""
    from backdoor_seal.core.detect.session import DetectOptions
    from backdoor_seal.core.diff.prompts import PromptDifferential
    from backdoor_seal.core.diff.session import detect_with_base

    monkeypatch.setenv("BACKDOOR_SEAL_CACHE", str(tmp_path))
    base, base_clip, _, _ = _load("lab-clean")
    model, clip, _, _ = _load("lab-pixel")
    opts = DetectOptions(lab=True, latent_side=8)
    calibration = ["a small red circle on the left", "a large blue square", "a green triangle at the top"]
    checked = ["a small red circle \u2060 on the left"]
    ticks = []
    first = detect_with_base(
        base, base_clip, model, clip, checked, calibration, opts, lambda: ticks.append(1)
    )
    assert first["calibration_cached"] is False and len(ticks) == 4
    assert len(list((tmp_path / "differential-calibration").glob("*.json"))) == 1

    def never(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(PromptDifferential, "calibrate", never)
    ticks.clear()
    again = detect_with_base(
        base.clone(),
        base_clip.clone(),
        model.clone(),
        clip.clone(),
        checked,
        calibration,
        opts,
        lambda: ticks.append(1),
    )
    assert again["calibration_cached"] is True and len(ticks) == 4
    assert again["prompts"] == first["prompts"] and again["trigger"] == first["trigger"]
    assert again["unet_evals"] < first["unet_evals"]
    with pytest.raises(AssertionError, match="calibrated again"):  # another base: another calibration
        detect_with_base(model, clip, model, clip, checked, calibration, opts)
    with pytest.raises(AssertionError, match="calibrated again"):
        detect_with_base(base, base_clip, model, clip, checked, calibration, opts, cache=False)
