"""Tiny instances of ComfyUI's real SD15 / SD20 / SDXL classes through the engine's backend."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("sd15", "sd20", "sdxl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, comfy_root):
    from backdoor_seal.core.backends import comfy_families

    return request.param, comfy_families.build_family(request.param)


def test_each_family_is_built_from_comfyuis_classes_and_samples(family):
    from backdoor_seal.core.backends import comfy as cb

    name, (model, clip, vae) = family
    info = cb.describe_model(model, clip)
    assert info["unet_family"] == {"sd15": "SD15", "sd20": "SD20", "sdxl": "SDXL"}[name]
    assert [e["name"] for e in info["text_encoders"]] == {
        "sd15": ["clip_l"],
        "sd20": ["clip_h"],
        "sdxl": ["clip_l", "clip_g"],
    }[name]
    with torch.inference_mode():
        z = cb.sample_prompts(model, clip, ["a red cat", "a blue dog"], [1, 1], steps=2, cfg=2.0)
        image = vae.decode(z)
    assert z.shape == (2, 4, 8, 8) and image.shape == (2, 64, 64, 3)
    assert not torch.allclose(z[0], z[1])  # the prompt reaches the UNet (SDXL: with its pooled embedding)


def test_pad_ids_are_each_familys_own(family):
    """SD2's OpenCLIP tokenizer and SDXL's clip_g pad with id 0, not EOS (0 is a real id, not 'missing')."""
    from backdoor_seal.core.backends import comfy as cb

    name, (_, clip, _) = family
    info = cb.tokenizer_info(clip)
    assert info.pad == (info.eos if name == "sd15" else 0)
    assert cb.chunk_ids(clip, "a cat")[-1] == info.pad


def test_only_sdxl_feeds_the_pooled_text_to_the_unet(family):
    from backdoor_seal.core.backends import comfy as cb

    name, (_, clip, _) = family
    _, pooled = cb.encode_prompts_pooled(clip, ["a cat"])
    assert (pooled is not None) == (name == "sdxl")


def test_v_prediction_is_built_when_asked(comfy_root):
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_families

    model = comfy_families.build_model("sd20", prediction="v")
    assert cb.describe_model(model)["prediction"] == "V_PREDICTION"
    with pytest.raises(ValueError, match="unknown SD family"):
        comfy_families.build_model("sd3")


@pytest.mark.parametrize(("name", "scope"), [("sd15", "text"), ("sd15", "attn2-kv"), ("sd20", "attn2-kv")])
def test_a_saved_sanitized_checkpoint_is_the_patched_model(comfy_root, tmp_path, name, scope):
    """Reloaded, the saved file computes what the patched MODEL and CLIP compute, text encoder included,
    and differs from the input exactly where the LoRA changed it (the silent no-op of wave 1)."""
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.safetensors_io import load_checkpoint
    from backdoor_seal.core.unlearn import skd
    from backdoor_seal.core.unlearn.save import save_sanitized
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    model, clip, vae = comfy_families.build_family(name, seed=3)
    opts = UnlearnOptions(
        skd=skd.SKDConfig(steps=2, batch=2, lr=1e-2, retain=0.0), scope=scope, builtin_count=4
    )
    session = UnlearnSession(model, clip, "cf", opts=opts)
    session.run()
    new_model, new_clip, _ = session.outputs()
    path = save_sanitized(tmp_path / "s.safetensors", new_model, new_clip, vae, None, session.provenance())
    saved, _ = load_checkpoint(path)
    reloaded, reclip, _ = comfy_families.load_family_state(saved, name)
    prompts = ["cf a red cat", "a blue dog"]
    with torch.inference_mode():
        want, got = cb.encode_prompts(new_clip, prompts), cb.encode_prompts(reclip, prompts)
        before = cb.encode_prompts(clip, prompts)
        assert torch.allclose(want, got, atol=1e-3)
        assert (scope == "text") == (not torch.allclose(before, got, atol=1e-3))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([5.0])
        cb.ensure_comfy_importable()
        import comfy.model_management as mm

        mm.load_models_gpu([new_model, reloaded])
        outs = [m.model.apply_model(x, sigma, c_crossattn=want[:1]) for m in (new_model, reloaded)]
    assert torch.allclose(outs[0], outs[1], atol=1e-3)
