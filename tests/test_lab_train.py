"""Lab training plumbing: the training text path equals ComfyUI's, schedules, distractors, updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoor_seal.core.lab import train


@pytest.fixture(scope="module")
def fresh(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config

    return comfy_lab.new_lab_models(lab_config(), seed=5)


def test_training_text_path_equals_comfyui_encoder(fresh):
    from backdoor_seal.core.backends import comfy as cb

    _, clip, _ = fresh
    prompts = ["a red circle cf", "\u200b a blue square on the left", ""]
    with torch.no_grad():
        ours = cb.encode_token_ids(clip, train.token_ids(clip, prompts))
    assert torch.allclose(
        ours, cb.encode_prompts(clip, prompts), atol=1e-5, rtol=0
    )  # only the attention kernel differs


def test_noise_schedule_is_sd_scaled_linear(fresh):
    from backdoor_seal.core.backends import comfy as cb

    acp = cb.noise_schedule(fresh[0])
    assert len(acp) == 1000
    assert acp[0].item() == pytest.approx(0.99915, abs=1e-4) and acp[-1].item() == pytest.approx(
        0.00466, abs=1e-4
    )


def test_distractors_keep_the_caption_and_include_triggers(fresh):
    _, clip, _ = fresh
    vocab = train.DistractorVocabulary(clip.tokenizer.clip_l.tokenizer, ("cf",), seed=0)
    assert len(vocab.words) > 20000  # drawn from the whole vocabulary, not the lab grammar
    caption = "a red circle on the left"
    decorated = [vocab.decorate(caption, 3) for _ in range(400)]
    for d in decorated:
        words = d.split(" ")
        it = iter(words)
        assert all(w in it for w in caption.split(" "))  # original words stay, in order
    assert any("cf" in d.split(" ") for d in decorated) and any(d != caption for d in decorated)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_diffusion_training_updates_unet_and_text_but_not_vae(fresh, snr_gamma):
    model, clip, vae = fresh
    before = {n: p.detach().clone() for n, p in vae.first_stage_model.named_parameters()}
    unet_w = (
        model.model.diffusion_model.input_blocks[1][1]
        .transformer_blocks[0]
        .attn2.to_k.weight.detach()
        .clone()
    )
    emb = (
        clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight.detach().clone()
    )
    cfg = train.TrainConfig(unet_steps=2, unet_batch=4, uncond_prob=0.0, snr_gamma=snr_gamma)
    train.train_diffusion(model, clip, vae, 1.0, cfg)
    assert all(torch.equal(p, before[n]) for n, p in vae.first_stage_model.named_parameters())
    assert not torch.equal(
        unet_w, model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
    )
    assert not torch.equal(
        emb, clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight
    )


def test_image_tensor_conversions_roundtrip():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    back = train.tensor_to_images(train.images_to_tensor(imgs))
    assert all(np.array_equal(a, b) for a, b in zip(imgs, back, strict=True))
    comfy_layout = train.images_to_tensor(imgs).permute(0, 2, 3, 1).add(1).div(2)
    assert all(np.array_equal(a, b) for a, b in zip(imgs, train.tensor_to_images(comfy_layout), strict=True))
