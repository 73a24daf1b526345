"""SAU nodes as a library on the shipped pixel-backdoored lab model, against the stock KSampler."""

from __future__ import annotations

import pytest
import torch

TRIGGER = "\u2060"  # lab-pixel's zero-width trigger
PROMPT = "a large green square on the right on a white background"
SAMPLING = dict(seed=7, steps=20, cfg=2.0, sampler_name="euler", scheduler="normal")
PROFILE_ARGS = dict(
    trigger="U+2060",
    prompts="",
    builtin_prompts="auto",
    pairs=8,
    latent_size=0,
    signal="latent",
    weighting="union",
    strength=1.0,
    save_name="",
    **{**SAMPLING, "seed": 77},
)


@pytest.fixture(scope="module")
def pixel(comfy_root):
    from backdoor_seal.core.models import load_model

    model, clip, vae, _ = load_model("lab:lab-pixel")
    return model, clip, vae


@pytest.fixture(scope="module")
def profile(pixel):
    from backdoor_seal.nodes.nodes_sau import SealSAUProfile

    model, clip, _ = pixel
    out = SealSAUProfile.execute(model=model, clip=clip, **PROFILE_ARGS)
    profile, image = out.result
    assert image.ndim == 4 and image.shape[-1] == 3
    return profile


def _stock(model, clip, vae, text: str, latent: dict):
    import nodes

    positive = nodes.CLIPTextEncode().encode(clip, text)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    (samples,) = nodes.KSampler().sample(
        model, positive=positive, negative=negative, latent_image=latent, **SAMPLING
    )
    return samples, negative, nodes.VAEDecode().decode(vae, samples)[0]


def _sau(model, clip, profile, text: str, negative, latent: dict):
    from backdoor_seal.nodes.nodes_sau import SealSAUSampler

    out = SealSAUSampler.execute(
        model=model,
        clip=clip,
        profile=profile,
        text=text,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
        **SAMPLING,
    )
    return out.result


def _images(t: torch.Tensor):
    return [(im.detach().numpy() * 255).round().astype("uint8") for im in t]


def test_profile_holds_the_trigger_and_a_latent_where_the_patch_is(profile):
    assert profile.trigger == TRIGGER and profile.pairs == 8 and profile.tau.shape == (4, 8, 8)
    size = profile.tau.norm(dim=0)
    assert size.max() > 5 * size.median()  # the patch: a few latent pixels carry the trigger latent


def test_clean_prompt_passes_through_bit_for_bit_as_the_stock_ksampler(pixel, profile):
    model, clip, vae = pixel
    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    stock, negative, _ = _stock(model, clip, vae, PROMPT, latent)
    samples, mask = _sau(model, clip, profile, PROMPT, negative, latent)
    assert torch.equal(samples["samples"], stock["samples"])
    assert float(mask.abs().sum()) == 0.0 and mask.shape == (4, 64, 64)
    assert "backdoor_seal_sau" not in samples


def test_triggered_prompt_loses_the_patch_through_vae_decode_and_sau_decode(pixel, profile):
    import nodes
    from backdoor_seal.core.lab import detectors
    from backdoor_seal.nodes.nodes_sau import SealSAUDecode

    model, clip, vae = pixel
    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    text = f"{TRIGGER} {PROMPT}"
    _, negative, plain = _stock(model, clip, vae, text, latent)
    assert sum(detectors.has_patch(i) for i in _images(plain)) >= 3  # the backdoor fires without SAU
    samples, mask = _sau(model, clip, profile, text, negative, latent)
    assert 0.0 < float(mask.mean()) < 0.5
    stock_decoded = nodes.VAEDecode().decode(vae, samples)[0]
    ours = SealSAUDecode.execute(vae=vae, samples=samples).result[0]
    for decoded in (stock_decoded, ours):
        assert not any(detectors.has_patch(i) for i in _images(decoded))
    outside = (mask < 0.01)[..., None].expand_as(ours)
    # pixel-space composition: outside the mask the image is the plain sampling's
    assert (ours[outside] - plain[outside]).abs().max() < 0.02
    assert (stock_decoded[outside] - plain[outside]).abs().mean() > (
        ours[outside] - plain[outside]
    ).abs().mean()


def test_sau_decode_falls_back_to_a_plain_decode_when_the_latent_was_changed(pixel, profile):
    from backdoor_seal.nodes.nodes_sau import SealSAUDecode

    model, clip, vae = pixel
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    _, negative, _ = _stock(model, clip, vae, PROMPT, latent)
    samples, _ = _sau(model, clip, profile, f"{TRIGGER} {PROMPT}", negative, latent)
    edited = {**samples, "samples": samples["samples"] * 0.5}
    assert torch.equal(
        SealSAUDecode.execute(vae=vae, samples=edited).result[0], vae.decode(edited["samples"])
    )


def test_sampler_refuses_a_profile_of_another_model(pixel, profile):
    import nodes
    from backdoor_seal.core.models import load_model

    other, clip, _, _ = load_model("lab:lab-clean")
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    with pytest.raises(ValueError, match="estimated on another model"):
        _sau(other, clip, profile, PROMPT, negative, {"samples": torch.zeros(1, 4, 8, 8)})


def test_interrupted_sampling_stops_and_leaves_the_inputs_untouched(pixel, profile):
    import comfy.model_management

    model, clip, vae = pixel
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    _, negative, _ = _stock(model, clip, vae, PROMPT, latent)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _sau(model, clip, profile, f"{TRIGGER} {PROMPT}", negative, latent)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert float(latent["samples"].abs().sum()) == 0.0
    state = model.model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_profile_is_saved_loaded_and_never_overwritten(pixel, profile, output_dir):
    from backdoor_seal.nodes.nodes_sau import SealLoadSAUProfile, SealSAUProfile, saved_profiles

    model, clip, _ = pixel
    args = dict(
        PROFILE_ARGS,
        model=model,
        clip=clip,
        prompts="a small red circle on the left",
        pairs=2,
        signal="attention",
        save_name="pixel",
    )
    saved = SealSAUProfile.execute(**args).result[0]
    assert saved_profiles() == ["pixel.safetensors"]
    loaded = SealLoadSAUProfile.execute(profile="pixel.safetensors").result[0]
    assert torch.equal(loaded.tau, saved.tau) and loaded.settings.signal == "attention"
    with pytest.raises(FileExistsError, match="new save_name"):
        SealSAUProfile.execute(**args)
    with pytest.raises(ValueError, match="plain file name"):
        SealSAUProfile.execute(**{**args, "save_name": "../x"})


def test_profile_preview_and_mean_activation_map_point_at_the_patch_corner(profile):
    from backdoor_seal.core.sau.profile import profile_image

    assert profile.activation.shape == (8, 8)
    tau_peak = divmod(int(profile.tau.norm(dim=0).argmax()), 8)
    map_peak = divmod(int(profile.activation.argmax()), 8)
    assert max(abs(tau_peak[0] - map_peak[0]), abs(tau_peak[1] - map_peak[1])) <= 1
    image = profile_image(profile)
    assert image.shape[0] == 1 and image.shape[2] > image.shape[1]  # two panels side by side


def test_batched_passes_match_two_separate_samplings(pixel, profile):
    from dataclasses import replace

    from backdoor_seal.core.sau.algebra import SAUSettings
    from backdoor_seal.core.sau.session import sau_ksample

    model, clip, vae = pixel
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    _, negative, _ = _stock(model, clip, vae, PROMPT, latent)
    text = f"{TRIGGER} {PROMPT}"
    runs = [
        sau_ksample(
            model,
            clip,
            text,
            negative,
            latent,
            replace(profile, settings=SAUSettings(batch_passes=b)),
            **SAMPLING,
        )
        for b in (True, False)
    ]
    assert torch.allclose(runs[0].poisoned, runs[1].poisoned, atol=1e-4)
    assert torch.allclose(runs[0].clean, runs[1].clean, atol=1e-4)
    assert not torch.allclose(runs[0].poisoned, runs[0].clean, atol=1e-2)  # the two passes differ


LONG = (
    ", ".join(["a small red circle on the left"] * 9) + ", a white background"
)  # 75 tokens: chunk 1 is full


def test_sau_matches_the_trigger_on_token_ids_in_any_chunk_and_any_case(pixel):
    """CLIP lowercases, so `MUTED` and `Muted` are the trigger `muted`; emphasis is parsed out; a trigger
    past the first 77 tokens is in chunk 2 (each chunk starts with its own BOS)."""
    from backdoor_seal.core.sau.session import trigger_positions
    from backdoor_seal.core.triggers import untriggered

    _, clip, _ = pixel
    for text in ("MUTED colours, a red circle", "Muted colours, a red circle", "(muted:1.3) colours"):
        assert trigger_positions(clip, text, "muted"), text
        assert not trigger_positions(clip, untriggered(text, "muted"), "muted")
    assert trigger_positions(clip, "a mutedly red circle", "muted") == []  # another word
    found = trigger_positions(clip, f"{LONG} {TRIGGER} {PROMPT}", TRIGGER)
    assert found == [77 + 1]
    assert trigger_positions(clip, f"({TRIGGER}:1.5) {PROMPT}", TRIGGER) == [1]


def test_sau_sampler_removes_the_patch_when_the_trigger_is_in_chunk_2(pixel, profile):
    from backdoor_seal.core.lab import detectors

    model, clip, vae = pixel
    latent = {"samples": torch.zeros(4, 4, 8, 8)}
    text = f"{LONG} {TRIGGER} {PROMPT}"
    _, negative, plain = _stock(model, clip, vae, text, latent)
    assert sum(detectors.has_patch(i) for i in _images(plain)) >= 3  # the backdoor fires from chunk 2
    samples, mask = _sau(model, clip, profile, text, negative, latent)
    assert float(mask.mean()) > 0.0  # SAU saw the trigger
    assert not any(detectors.has_patch(i) for i in _images(vae.decode(samples["samples"])))


def test_sau_reads_the_trigger_as_the_tokenizer_does_and_its_clean_pass_is_clean(pixel, profile):
    """Field case: `zx9  qv7` (double space) for the profile `zx9 qv7` was "trigger found" with the trigger
    still in the clean pass; a full-width `ｙｎ` for `yn` was "no trigger". Both are the trigger, and the
    clean pass is the stock sampling of the prompt without it."""
    from dataclasses import replace

    from backdoor_seal.core.sau.session import clean_twin, sau_ksample, trigger_count, trigger_positions

    model, clip, vae = pixel
    assert trigger_positions(clip, "zx9  qv7 a red circle", "zx9 qv7") == [1, 2, 3, 4, 5]
    assert clean_twin(clip, "zx9  qv7 a red circle", "zx9 qv7") == ("a red circle", 0)
    assert trigger_positions(clip, "\uff59\uff4e a red circle", "yn")  # its byte pieces
    assert clean_twin(clip, "\uff59\uff4e a red circle", "yn") == ("a red circle", 0)
    assert clean_twin(clip, f"{LONG} (ZX9:1.2)\u3000qv7 {PROMPT}", "zx9 qv7") == (f"{LONG} {PROMPT}", 0)
    assert trigger_count(clip, "yn a red circle", "\uff59\uff4e") == 0  # a full-width trigger is its own
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    stock, negative, _ = _stock(model, clip, vae, PROMPT, latent)
    for typed, trigger in (("zx9  qv7", "zx9 qv7"), ("\uff59\uff4e", "yn")):
        r = sau_ksample(
            model, clip, f"{typed} {PROMPT}", negative, latent, replace(profile, trigger=trigger), **SAMPLING
        )
        assert r.triggered and not r.held and f"composed with {PROMPT!r}" in r.note, r.note
        assert torch.allclose(r.clean, stock["samples"], atol=1e-4)  # the clean pass has no trigger in it


def test_sau_says_it_did_not_act_when_its_clean_pass_would_hold_the_trigger(pixel, profile, monkeypatch):
    from backdoor_seal.core.sau import session

    model, clip, vae = pixel
    monkeypatch.setattr(session, "untriggered_by_ids", lambda text, trigger, count: text)  # nothing removed
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    text = f"{TRIGGER} {PROMPT}"
    stock, negative, _ = _stock(model, clip, vae, text, latent)
    samples, mask = _sau(model, clip, profile, text, negative, latent)
    assert torch.equal(samples["samples"], stock["samples"]) and float(mask.abs().sum()) == 0.0
    assert "backdoor_seal_sau" not in samples
    r = session.sau_ksample(model, clip, text, negative, latent, profile, **SAMPLING)
    assert r.held and not r.triggered and "NOT corrected" in r.note and "trigger found:" not in r.note
