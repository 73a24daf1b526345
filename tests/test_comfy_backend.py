"""The ComfyUI backend used as a library on CPU: lab models, the model walker, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoor_seal.core.attention import (
    UnsupportedModelError,
    find_cross_attention_layers,
    require_cross_attention,
)
from backdoor_seal.core.lab.models import LAB_UNET_CONFIG, lab_config


@pytest.fixture(scope="module")
def lab(comfy_root, lab_dir):
    from backdoor_seal.core.backends import comfy_lab

    return comfy_lab.load_lab_checkpoint(lab_dir / "lab-untrained.safetensors")


def test_lab_checkpoint_roundtrip_keeps_weights(lab, tmp_path):
    from backdoor_seal.core.backends import comfy_lab

    model, clip, vae, info = lab
    assert info["config"] == lab_config()
    path = comfy_lab.save_lab_checkpoint(tmp_path / "copy.safetensors", model, clip, vae, dtype=torch.float32)
    model2, clip2, vae2, _ = comfy_lab.load_lab_checkpoint(path)
    sd1, sd2 = comfy_lab.lab_state_dict(model, clip, vae), comfy_lab.lab_state_dict(model2, clip2, vae2)
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd1)  # SD1-style names
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd1)
    assert any(k.startswith("first_stage_model.decoder.") for k in sd1)


def test_describe_model_walks_the_unet(lab):
    from backdoor_seal.core.backends.comfy import describe_model

    model, clip, _, _ = lab
    info = describe_model(model, clip)
    n_transformers = (
        sum(LAB_UNET_CONFIG["transformer_depth"])
        + LAB_UNET_CONFIG["transformer_depth_middle"]
        + sum(LAB_UNET_CONFIG["transformer_depth_output"])
    )
    assert info["cross_attention_layers"] == n_transformers == 7
    assert info["unet_family"] == "LabSD"
    assert info["context_dim"] == 64
    assert info["text_encoders"] == [
        {"name": "clip_l", "tokenizer": "CLIPTokenizer", "vocab_size": 49408, "max_length": 77}
    ]
    json.dumps(info)


def test_model_without_cross_attention_gets_a_clear_error():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.MultiheadAttention(4, 1))
    assert find_cross_attention_layers(net) == []
    with pytest.raises(UnsupportedModelError, match="SD1.x, SD2.x, SDXL"):
        require_cross_attention(net, "MMDiT")


def test_lab_model_samples_and_decodes(lab):
    import comfy.sample

    model, clip, vae, _ = lab
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(model, noise, 4, 1.0, "euler", "normal", cond, cond, latent, disable_pbar=True)
    again = comfy.sample.sample(
        model, noise, 4, 1.0, "euler", "normal", cond, cond, latent, disable_pbar=True
    )
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, again)  # deterministic on CPU
    assert vae.decode(out).shape == (2, 64, 64, 3)


def test_load_rejects_foreign_safetensors(tmp_path, comfy_root):
    from backdoor_seal.core.backends.comfy_lab import load_lab_checkpoint
    from backdoor_seal.core.safetensors_io import atomic_save

    path = atomic_save({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a backdoor-seal lab checkpoint"):
        load_lab_checkpoint(path)


def test_sample_images_per_item_prompts_and_seeds(lab):
    from backdoor_seal.core.lab.evaluate import SampleSettings, sample_images

    model, clip, vae, _ = lab
    settings = SampleSettings(steps=3, batch=3)
    batch = sample_images(
        model, clip, vae, ["a red circle", "a blue square", "a red circle"], [7, 8, 9], settings
    )
    alone = sample_images(model, clip, vae, ["a blue square"], [8], settings)
    assert len(batch) == 3 and batch[0].shape == (64, 64, 3)
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1  # batching does not change an item
    assert not np.array_equal(batch[0], batch[2])  # same prompt, other seed
