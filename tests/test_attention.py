"""Cross-attention capture: the maps' maths, the recorder, and parity in both backends on tiny SD1/SD2/SDXL."""

from __future__ import annotations

import copy

import pytest
import torch
from sd_tiny import comfy_conditioning, comfy_model, diffusers_backend

from backdoor_seal.core import attention
from backdoor_seal.core.attention import CaptureSettings, CrossAttentionRecorder


def _naive_maps(q, k, heads):
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    return ((qh @ kh.transpose(-1, -2)) / d**0.5).softmax(-1).mean(1)


def test_probabilities_match_softmax_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 50, 32, generator=g), torch.randn(3, 77, 32, generator=g)
    want = _naive_maps(q, k, heads=4)
    for chunk in (7, 50, 1024):
        got = attention.cross_attention_probabilities(q, k, heads=4, query_chunk=chunk)
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(want.sum(-1), torch.ones(3, 50), atol=1e-5)


def test_spatial_shape_handles_odd_latents():
    assert attention.spatial_shape(64, (8, 8)) == (8, 8)
    assert attention.spatial_shape(16, (8, 8)) == (4, 4)
    assert attention.spatial_shape(12, (5, 7)) == (3, 4)  # stride-2 convs round up
    with pytest.raises(ValueError):
        attention.spatial_shape(10, (8, 8))


def test_recorder_survives_deepcopy_and_selects_layers_and_steps():
    rec = CrossAttentionRecorder(CaptureSettings(layers=("output",), first_step=1, last_step=3, resolution=4))
    assert copy.deepcopy({"r": rec})["r"] is rec
    q, k = torch.randn(2, 16, 8), torch.randn(2, 77, 8)
    schedule = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    for sigma in schedule[:-1]:
        step = rec.step_of(schedule, torch.tensor([sigma, sigma]))
        rec.record("input_blocks.1.attn2", q, k, 2, (4, 4), step)
        rec.record("output_blocks.1.attn2", q, k, 2, (4, 4), step)
    maps = rec.maps()
    assert list(maps.per_layer) == ["output_blocks.1.attn2"] and maps.steps == [1, 2]
    assert maps.per_layer["output_blocks.1.attn2"].shape == (2, 77, 4, 4)
    rec.step_of(schedule.clone(), 10.0)  # a new sampling run starts afresh
    assert rec.maps().per_layer == {}


def test_per_step_series_and_memory_independent_of_steps():
    q, k = torch.randn(1, 16, 8), torch.randn(1, 77, 8)
    few, many = CrossAttentionRecorder(), CrossAttentionRecorder(CaptureSettings(keep_steps=True))
    for step in range(30):
        for rec in (few, many):
            rec.record("a.attn2", q, k, 2, (4, 4), step)
    assert len(few.maps().per_step) == 0 and len(few.maps().per_layer) == 1
    assert sorted(many.maps().per_step) == list(range(30))


def test_conditional_rows_only():
    q, k = torch.randn(4, 16, 8), torch.randn(4, 77, 8)
    rec = CrossAttentionRecorder(CaptureSettings(resolution=4))
    rec.record("a.attn2", q, k, 2, (4, 4), rows=torch.tensor([2, 3]))
    want = _naive_maps(q[2:], k[2:], 2).transpose(1, 2).reshape(2, 77, 4, 4)
    assert torch.allclose(rec.maps().per_layer["a.attn2"], want, atol=1e-6)


def test_differentiable_mode_keeps_the_graph():
    w = torch.nn.Parameter(torch.randn(8, 8))
    rec = CrossAttentionRecorder(CaptureSettings(differentiable=True, resolution=4))
    x, k = torch.randn(1, 16, 8), torch.randn(1, 77, 8)
    rec.record("a.attn2", x @ w, k, 2, (4, 4))
    maps = rec.pop_live()["a.attn2"]
    (maps[..., 1, :, :] ** 2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert rec.live == {}


def test_unsupported_model_names_the_families():
    with pytest.raises(attention.UnsupportedModelError, match="SD1.x, SD2.x, SDXL"):
        attention.require_cross_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), "FluxLike")


# --- comfy backend -----------------------------------------------------------------------------


def _comfy_sample(model, family, recorder=None, cfg=3.0, steps=3):
    from backdoor_seal.core.backends import comfy as cb

    if recorder is not None:
        model = cb.attach_attention_recorder(model, recorder)
    cond, uncond, extra = comfy_conditioning(family, batch=2)
    latent = torch.zeros(2, 4, 8, 8)
    noise = cb.seeded_noise(latent, [1, 2])
    return cb.sample(model, noise, latent, cond, uncond, steps, cfg, cond_extra=extra, seed=1)


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_comfy_capture_parity_and_maps(comfy_root, family):

    model = comfy_model(family)
    plain = _comfy_sample(model, family)
    rec = CrossAttentionRecorder(CaptureSettings(resolution=8))
    captured = _comfy_sample(model, family, rec)
    assert (captured - plain).abs().max().item() <= 1e-5
    layers = attention.find_cross_attention_layers(model.model.diffusion_model)
    maps = rec.maps()
    assert set(maps.per_layer) == {n for n, _ in layers} and maps.steps == [0, 1, 2]
    for m in maps.per_layer.values():
        assert m.shape == (2, 77, 8, 8) and m.dtype == torch.float32 and m.device.type == "cpu"
        assert torch.allclose(m.sum(1), torch.ones(2, 8, 8), atol=1e-4)  # a distribution over tokens
    # the input MODEL carries no patch: capture lives on a clone
    assert "attn2" not in model.model_options.get("transformer_options", {}).get("patches_replace", {})


def test_comfy_capture_records_the_conditional_half(comfy_root):
    """At step 0 the UNet input does not depend on CFG, so the cond-half maps must not either."""

    model = comfy_model("sd15")
    maps = []
    for cfg in (1.0, 5.0):  # cfg 1 skips the unconditional pass altogether
        rec = CrossAttentionRecorder(CaptureSettings(resolution=8, last_step=1))
        _comfy_sample(model, "sd15", rec, cfg=cfg, steps=2)
        maps.append(rec.maps().combined())
    assert torch.allclose(maps[0], maps[1], atol=1e-5)


def test_comfy_capture_chains_an_existing_attn2_patch(comfy_root):

    model = comfy_model("sd15").clone()
    calls = []

    def other_patch(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        calls.append(1)
        return optimized_attention(q, k, v * 0.5, extra_options["n_heads"])

    model.set_model_attn2_replace(other_patch, "input", 1, 0)
    plain = _comfy_sample(model, "sd15")
    rec = CrossAttentionRecorder(CaptureSettings(resolution=8))
    captured = _comfy_sample(model, "sd15", rec)
    assert calls and (captured - plain).abs().max().item() <= 1e-5
    assert "input_blocks.1.1.transformer_blocks.0.attn2" in rec.maps().per_layer


def test_comfy_layer_filter_and_unknown_filter(comfy_root):
    from backdoor_seal.core.backends import comfy as cb

    model = comfy_model("sd15")
    rec = CrossAttentionRecorder(CaptureSettings(layers=("output_blocks",), resolution=8))
    _comfy_sample(model, "sd15", rec)
    assert rec.maps().per_layer and all(n.startswith("output_blocks") for n in rec.maps().per_layer)
    with pytest.raises(ValueError, match="no cross-attention layer"):
        cb.attach_attention_recorder(model, CrossAttentionRecorder(CaptureSettings(layers=("nope",))))


def test_comfy_labels_show_trigger_characters(comfy_root):
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config

    _model, clip, _vae = comfy_lab.new_lab_models(lab_config())
    labels = cb.clip_position_labels(clip, "\u200b a mignneko on the left")
    assert len(labels) == 77
    assert labels[:7] == ["<BOS>", "<U+200B>", "a", "mign-", "neko", "on", "the"]
    assert labels[8] == "<EOS>" and set(labels[9:]) == {"<pad>"}


# --- diffusers backend -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_diffusers_capture_parity_and_maps(comfy_root, family):
    backend = diffusers_backend(family, comfy_root)
    prompts, seeds = ["a red circle", "\u200b a blue square"], [3, 4]
    plain = backend.sample(prompts, seeds, steps=3, cfg=3.0)
    latents, maps = attention.capture(
        backend, prompts, seeds, CaptureSettings(resolution=8), steps=3, cfg=3.0
    )
    assert (latents - plain).abs().max().item() <= 1e-5
    layers = attention.find_cross_attention_layers(backend.unet())
    assert set(maps.per_layer) == {n for n, _ in layers} and maps.steps == [0, 1, 2]
    assert all(m.shape == (2, 77, 8, 8) for m in maps.per_layer.values())
    assert maps.labels[1][:3] == ["<BOS>", "<U+200B>", "a"]
    # processors are restored: a later plain run is untouched by the recorder
    assert not any(type(m.processor).__name__ == "RecordingAttnProcessor" for _, m in layers) and torch.equal(
        backend.sample(prompts, seeds, steps=3, cfg=3.0), plain
    )
    if family == "sdxl":
        assert len(backend.text_encoders) == 2 and layers[0][1].to_k.in_features == 64


def test_kernel_probe_on_cpu_falls_back_to_sdpa():
    assert attention.fast_kernel(torch.device("cpu")) == "sdpa"
