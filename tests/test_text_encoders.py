"""The differentiable text-encoder walk and packed conditioning, against ComfyUI's own encoder, per family."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("sd15", "sd20", "sdxl")
PROMPTS = ["a red cat on the left", "a blue dog"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, comfy_root):
    from backdoor_seal.core.backends import comfy_families

    return request.param, comfy_families.build_family(request.param)


def _comfy_encode(clip, prompts):
    from backdoor_seal.core.backends import comfy as cb

    return cb.encode_prompts_pooled(clip, prompts)


def _with_layer(clip, skip):
    """A clone of the CLIP, set as CLIPSetLastLayer(skip) sets it (None: as loaded)."""
    clip = clip.clone()
    if skip is not None:
        clip.clip_layer(skip)
    return clip


@pytest.mark.parametrize("skip", [None, -2])
def test_walk_matches_comfyuis_encoder_with_and_without_clip_skip(family, skip):
    """SD1.5 fine-tunes are used with CLIPSetLastLayer(-2); training must encode as sampling does."""
    from backdoor_seal.core.backends import comfy as cb

    name, (_, clip, _) = family
    clip = _with_layer(clip, skip)
    ids = torch.tensor([cb.chunk_ids(clip, p) for p in PROMPTS])
    with torch.no_grad():
        ours, ours_pooled = cb.encode_token_ids_pooled(clip, ids)
        theirs, theirs_pooled = _comfy_encode(clip, PROMPTS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours_pooled is None) == (theirs_pooled is None) == (name != "sdxl")
    if ours_pooled is not None:
        torch.testing.assert_close(ours_pooled, theirs_pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [None, -2])
def test_a_prefix_encodes_as_the_first_rows_of_comfyuis_chunk(family, skip):
    """CLIP's attention is causal: the contexts of the first L ids alone are the full chunk's first L rows
    (the comparison with the base encodes whole vocabularies this way, L positions per token)."""
    from backdoor_seal.core.backends import comfy as cb

    _, (_, clip, _) = family
    clip = _with_layer(clip, skip)
    ids = torch.tensor([cb.chunk_ids(clip, p) for p in PROMPTS])
    with torch.no_grad():
        theirs, _ = _comfy_encode(clip, PROMPTS)
    for length in (1, 4):
        torch.testing.assert_close(
            cb.encode_prefix_ids(clip, ids[:, :length]), theirs[:, :length], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="1 to 77"):
        cb.encode_prefix_ids(clip, ids[:, :0])


def test_clip_skip_changes_the_context(family):
    """The check above is not vacuous: the last-layer setting changes what the walk returns."""
    from backdoor_seal.core.backends import comfy as cb

    name, (_, clip, _) = family
    ids = torch.tensor([cb.chunk_ids(clip, PROMPTS[0])])
    skipped = clip.clone()
    skipped.clip_layer(-1 if name != "sd15" else -2)  # SD2 and SDXL already default to the penultimate layer
    with torch.no_grad():
        assert not torch.allclose(cb.encode_token_ids(clip, ids), cb.encode_token_ids(skipped, ids))


def test_packed_conditioning_gives_the_samplers_unet_inputs(family):
    """SDXL's pooled text rides with its context; the UNet gets the ADM vector ComfyUI's sampler builds."""
    from backdoor_seal.core.backends import comfy as cb

    name, (model, clip, _) = family
    context, pooled = _comfy_encode(clip, PROMPTS)
    packed = cb.pack_pooled(context, pooled)
    inputs = cb.unet_conditioning(model, packed, (8, 8))
    torch.testing.assert_close(inputs["c_crossattn"], context)
    if name != "sdxl":
        assert set(inputs) == {"c_crossattn"} and packed.shape == context.shape
        return
    assert packed.shape[1] == context.shape[1] + 1
    expected = model.model.encode_adm(pooled_output=pooled, width=64, height=64, device="cpu")
    torch.testing.assert_close(inputs["y"], expected)


def test_families_the_pack_does_not_handle_get_one_clear_error(comfy_root):
    from backdoor_seal.core.attention import UnsupportedModelError
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_families

    model = comfy_families.build_model("sd15")
    assert cb.supported_family(model) == "SD15"
    import comfy.model_base

    model.model.__class__ = comfy.model_base.SD21UNCLIP  # an unCLIP model: extra image conditioning
    with pytest.raises(UnsupportedModelError, match=r"SD15 \(SD21UNCLIP\) is not a model family"):
        cb.supported_family(model)


def test_a_clip_skip_past_the_encoders_depth_is_refused(family):
    """ComfyUI's CLIPSetLastLayer falls back to the last layer silently; the engine says so instead."""
    from backdoor_seal.core.backends import comfy as cb

    _, (_, clip, _) = family
    layers = min(len(e.transformer.text_model.encoder.layers) for _, e in cb.text_encoders(clip))
    assert cb.clip_skip(cb.with_clip_skip(clip, layers)) is not None
    with pytest.raises(ValueError, match=f"has {layers} layers"):
        cb.with_clip_skip(clip, layers + 1)
