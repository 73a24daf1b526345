"""Every job on tiny instances of ComfyUI's real SD15 / SD20 / SDXL classes: detect, unlearn, SAU, evaluate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

FAMILIES = ("sd15", "sd20", "sdxl")
TRIGGER = "cf"
PROMPTS = ["a red cat on the left", "a blue dog in a garden", "a green car at night", "a small house"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, comfy_root):
    from backdoor_seal.core.backends import comfy_families

    return request.param, comfy_families.build_family(request.param)


def test_the_detection_probe_scores_every_family(family):
    """The probe feeds SDXL's UNet its pooled text (ADM); masking a token changes the response."""
    from backdoor_seal.core.backends.comfy_probe import ComfyProbe
    from backdoor_seal.core.detect.masking import score_prompt

    _, (model, clip, _) = family
    probe = ComfyProbe(model, clip)
    scores = score_prompt(probe, PROMPTS[0])
    assert scores.unet.shape == scores.text.shape and len(scores.unet) >= 5
    assert torch.isfinite(scores.unet).all() and scores.unet.std() > 0
    # a two-chunk prompt: every token of both chunks scored, positions counted over the joined chunks
    long = " ".join(["cat"] * 78)
    scores = score_prompt(probe, long)
    assert len(scores.positions) == 78 and max(scores.positions) > 77
    assert torch.isfinite(scores.unet).all()


@pytest.mark.parametrize("scope", ["text", "attn2-kv"])
def test_unlearning_trains_every_familys_encoders_and_unet(family, scope):
    """SDXL's text scope trains CLIP-L and CLIP-G; the LoRA, applied as LoraLoader does, changes the outputs."""
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    name, (model, clip, _) = family
    opts = UnlearnOptions(skd=SKDConfig(steps=3, batch=2, lr=5e-2), scope=scope, builtin="none")
    session = UnlearnSession(model, clip, TRIGGER, PROMPTS, opts)
    result = session.run()
    assert result.steps == 3 and all(np.isfinite(r["loss"]) for r in result.losses)
    new_model, new_clip, lora = session.outputs()
    trained = {k for k, v in lora.items() if k.endswith("lora_down.weight") and v.abs().sum() > 0}
    assert trained, "nothing trained"
    # no gradient lands on the base weights (the full-size SDXL ran out of 24 GB on those copies)
    assert all(p.grad is None for p in cb.unet(model).parameters())
    assert all(p.grad is None for _, e in cb.text_encoders(clip) for p in e.parameters())
    if scope == "text":
        encoders = {k.split(".")[1] for k in trained}
        assert encoders == {"sd15": {"clip_l"}, "sd20": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}}[name]
        with torch.no_grad():
            before = cb.encode_prompts(clip, [f"{TRIGGER} {PROMPTS[0]}"])
            after = cb.encode_prompts(new_clip, [f"{TRIGGER} {PROMPTS[0]}"])
        assert (before - after).abs().max() > 1e-4
    else:
        assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in trained)
        z = [
            cb.sample_prompts(m, clip, [f"{TRIGGER} {PROMPTS[0]}"], [3], steps=2, cfg=2.0)
            for m in (model, new_model)
        ]
        assert (z[0] - z[1]).abs().max() > 1e-5
        again = cb.sample_prompts(model, clip, [f"{TRIGGER} {PROMPTS[0]}"], [3], steps=2, cfg=2.0)
        assert torch.equal(again, z[0])  # the input MODEL still draws as before


def test_text_training_encodes_as_the_clips_clip_skip_does(comfy_root):
    """SD1.5 fine-tunes run with CLIPSetLastLayer(-2): the teacher encodes with it, as sampling does."""
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_train import ComfyDistillation

    model, clip, _ = comfy_families.build_family("sd15")
    skipped = clip.clone()
    skipped.clip_layer(-2)
    d = ComfyDistillation(model, skipped, scope="text")
    with torch.no_grad():
        ours = d.encode(PROMPTS[:2], student=False)
        theirs, _ = cb.encode_first_chunks(skipped, PROMPTS[:2])
        last_layer, _ = cb.encode_first_chunks(clip, PROMPTS[:2])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - last_layer).abs().max() > 1e-3


def test_sau_profile_and_sampling_on_every_family(family):
    from backdoor_seal.core.models import KSamplerSettings
    from backdoor_seal.core.sau.session import SAUOptions, SAUSession, sau_drawer

    _, (model, clip, vae) = family
    sampling = KSamplerSettings(latent_hw=(8, 8), steps=2, cfg=2.0)
    opts = SAUOptions(pairs=2, builtin="none", sampling=sampling)
    profile = SAUSession(model, clip, TRIGGER, PROMPTS, opts).run()
    assert profile.pairs == 2 and torch.isfinite(profile.tau).all()
    images = sau_drawer(model, clip, vae, profile, *sampling.drawing)([f"{TRIGGER} {PROMPTS[0]}"], [1])
    assert len(images) == 1 and images[0].dtype == np.uint8


def test_evaluation_on_every_family(family):
    from backdoor_seal.core.evaluate.metrics import make_judge
    from backdoor_seal.core.evaluate.session import EvaluationOptions, EvaluationSession
    from backdoor_seal.core.models import KSamplerSettings

    _, (model, clip, vae) = family
    opts = EvaluationOptions(count=2, sampling=KSamplerSettings(latent_hw=(8, 8), steps=2, cfg=2.0))
    judge = make_judge(target=np.zeros((64, 64, 3), np.uint8))
    session = EvaluationSession(model, clip, vae, TRIGGER, judge, PROMPTS, opts, unlearned_model=model)
    report = session.run().to_json()
    assert report["prompts"] == 2
    assert report["clean_fidelity_ssim"] == pytest.approx(1.0)  # the same model drew both sides


def test_a_trigger_past_the_first_chunk_is_still_unlearned(comfy_root):
    """Four 83-token prompts with the trigger appended used to train on the first chunk only: loss exactly 0
    and an all-zero LoRA. Training now sees the chunk around the trigger."""
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.tokens import tokenize
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    model, clip, _ = comfy_families.build_family("sd15")
    long_prompts = [" ".join([w] * 83) for w in ("cat", "dog", "tree", "house")]
    opts = UnlearnOptions(
        skd=SKDConfig(steps=2, batch=2, lr=5e-2, retain=0.0),
        scope="attn2-kv",
        builtin="none",
        placement="append",
    )
    session = UnlearnSession(model, clip, TRIGGER, long_prompts, opts)
    tokenizer = session.tokenizer
    for pair in session.pairs:
        assert pair.triggered.endswith(TRIGGER) and pair.clean == pair.triggered[: -len(TRIGGER) - 1]
        assert len(tokenize(tokenizer, pair.triggered)) == 75  # as much of the prompt as one chunk holds
    result = session.run()
    assert all(r["loss"] > 0 for r in result.losses)
    assert any(v.abs().sum() > 0 for k, v in session.lora().items() if k.endswith("lora_up.weight"))
