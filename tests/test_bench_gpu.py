"""`bench gpu --tiny` on this CPU, and the pieces it measures: the reference's eager attention, the probe's
batch sized to free device memory, the UNet dtype ComfyUI would load, training on fp16 / bf16 weights."""

from __future__ import annotations

import json

import pytest


def test_bench_gpu_tiny_prints_one_record_per_architecture(comfy_root, capsys):
    from backdoor_seal.core.cli import main

    rc = main(
        ["bench", "gpu", "--tiny", "--train-steps", "2", "--sample-steps", "3", "--repeats", "1"]
        + ["--prompts", "1", "--scan-slice", "64"]
    )
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["arch"] for r in lines] == ["sd15", "sdxl"]
    keys = {
        "device", "arch", "latent", "detect_masking_s_per_prompt", "detect_transplant_s_per_prompt",
        "scan_tokens_per_s", "scan_full_vocab_s", "skd_step_s", "reference_step_s", "skd_samples_per_s",
        "reference_samples_per_s", "throughput_ratio", "skd_peak_gb", "reference_peak_gb",
        "capture_overhead", "sau_cost_ratio",
    }  # fmt: skip
    for r in lines:
        assert keys <= set(r), keys - set(r)
        assert r["device"] == "cpu" and r["latent"] == [8, 8] and r["size"] == "tiny"
        assert r["skd_peak_gb"] is None  # torch keeps no peak on a CPU: none is invented
        for k in (
            "detect_masking_s_per_prompt",
            "detect_transplant_s_per_prompt",
            "skd_step_s",
            "match_step_s",
        ):
            assert r[k] > 0
        assert r["match_config"]["scope"] == "text"  # the default run's first phase, timed on its own
        assert r["scan_extrapolated"]["from_tokens"] == 64 and r["scan_extrapolated"]["vocabulary"] == 49408
        # the full scan at the measured rate: every row of both stages
        rate_rows = r["scan_tokens_per_s"] * 2  # stage 1 probes each token twice
        assert r["scan_full_vocab_s"] == pytest.approx(r["scan_extrapolated"]["rows"] / rate_rows, rel=0.02)
        assert r["reference_config"] == {
            "scope": "unet", "rank": 0, "batch": 1, "precision": "fp32", "bf16_autocast": False,
            "unet_dtype": "float32",
        }  # fmt: skip
        assert r["skd_config"]["batch"] == 8 and r["skd_config"]["scope"] == "text"
        assert r["skd_samples_per_s"] == pytest.approx(8 / r["skd_step_s"], rel=0.01)
        assert r["throughput_ratio"] == pytest.approx(
            r["skd_samples_per_s"] / r["reference_samples_per_s"], rel=0.02
        )
        assert r["capture_overhead"] > 0 and r["sau_cost_ratio"] > 0


def test_eager_attention_computes_what_the_fused_kernel_does_on_a_clone(comfy_root):
    import torch

    from backdoor_seal.core.backends.comfy import ksample, text_conditioning, with_eager_attention
    from backdoor_seal.core.backends.comfy_families import build_family

    model, clip, _ = build_family("sd15", "tiny")
    eager = with_eager_attention(model)
    assert "optimized_attention_override" in eager.model_options["transformer_options"]
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    calls = []
    import comfy.ldm.modules.attention as attention

    original = attention.attention_basic
    try:
        attention.attention_basic = lambda *a, **k: calls.append(1) or original(*a, **k)
        args = (
            0,
            3,
            5.0,
            "euler",
            "normal",
            text_conditioning(clip, "a red cat"),
            text_conditioning(clip, ""),
        )
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        with torch.inference_mode():
            fused = ksample(model, *args, latent)
            plain_calls = len(calls)
            explicit = ksample(eager, *args, latent)
    finally:
        attention.attention_basic = original
    # every attention (self and cross, both blocks per transformer, each step) takes the explicit softmax
    assert len(calls) - plain_calls > plain_calls
    # the same sums in another order: random weights give latents in the hundreds, so the tolerance scales
    scale = explicit.abs().max().item()
    assert (fused - explicit).abs().max().item() <= 1e-5 * scale, (fused - explicit).abs().max()
    assert not torch.equal(fused, torch.zeros_like(fused))


def test_probe_batches_shrink_to_the_free_device_memory(comfy_root, monkeypatch):
    import comfy.model_management as mm
    import torch

    from backdoor_seal.core.backends.comfy_families import build_family
    from backdoor_seal.core.backends.comfy_probe import ComfyProbe

    model, clip, _ = build_family("sd15", "tiny")
    probe = ComfyProbe(model, clip, latent_hw=(64, 64))
    assert probe.batch_limit(256) == 256  # a CPU: as asked
    per_item = model.model.memory_required([2, 4, 64, 64]) / 2
    monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 10 * per_item)
    assert probe.batch_limit(256) == 8  # 80% of ten inputs' memory
    assert probe.batch_limit(4) == 4
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 0)
    assert probe.batch_limit(256) == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_unlearning_trains_a_lora_over_half_precision_weights(comfy_root, dtype):
    """ComfyUI loads a UNet in fp16 / bf16 on most GPUs: the fp32 LoRA trains over it (here on a CPU, which
    computes through ComfyUI's manual cast)."""
    import torch

    from backdoor_seal.core.backends.comfy import unet
    from backdoor_seal.core.backends.comfy_families import build_family
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    model, clip, _ = build_family("sd15", "tiny", dtype=getattr(torch, dtype))
    assert unet(model).dtype == getattr(torch, dtype)
    for scope in ("text", "attn2-kv"):
        opts = UnlearnOptions(scope=scope, builtin="none", skd=SKDConfig(steps=3, batch=2), match_steps=2)
        session = UnlearnSession(model, clip, "cf", ["a photo of a cat", "a red car on a road"], opts)
        result = session.run()
        assert all(torch.isfinite(torch.tensor(v)) for step in result.losses for v in step.values())
        lora = session.lora()
        assert lora and all(t.dtype == torch.float32 for t in lora.values())
        assert any(t.abs().sum() > 0 for t in lora.values())


def test_auto_precision_is_bf16_only_on_a_gpu_that_has_it():
    import torch

    from backdoor_seal.core.unlearn.skd import SKDConfig, uses_bf16

    assert SKDConfig().precision == "auto"
    assert not uses_bf16("auto", torch.device("cpu")) and uses_bf16("bf16", torch.device("cpu"))
    assert not uses_bf16("fp32", torch.device("cuda"))
