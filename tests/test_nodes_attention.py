"""The capture and heatmap nodes as a library: clones, a LoRA in between, stock sampling, labelled grids."""

from __future__ import annotations

import torch

from backdoor_seal.core.lab.models import lab_config


def _lab(comfy_root):
    from backdoor_seal.core.backends import comfy_lab

    return comfy_lab.new_lab_models(lab_config())


def _lora_for(lora_dir) -> dict[str, torch.Tensor]:
    from backdoor_seal.core.safetensors_io import load_checkpoint

    return load_checkpoint(lora_dir / "lab-test-lora.safetensors")[0]


def _sample(model, clip, prompt_cond, seed=0):
    import comfy.sample

    latent = torch.zeros(2, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return comfy.sample.sample(
        model, noise, 4, 1.0, "euler", "normal", prompt_cond, uncond, latent, disable_pbar=True, seed=seed
    )


def test_capture_survives_a_lora_loader_and_leaves_the_input_model_alone(comfy_root, lora_dir):
    import comfy.sd

    from backdoor_seal.nodes.nodes_attention import SealAttentionCapture

    model, clip, _vae = _lab(comfy_root)
    prompt = "\u200b a large red circle on the left"
    before = _sample(model, clip, clip.encode_from_tokens_scheduled(clip.tokenize(prompt)))
    patched, cond, recorder = SealAttentionCapture.execute(
        model=model, clip=clip, text=prompt, resolution=8, layers="", first_step=0, last_step=-1
    ).result
    lora_model, _ = comfy.sd.load_lora_for_models(patched, None, _lora_for(lora_dir), 1.0, 0.0)
    with_lora = _sample(lora_model, clip, cond)
    maps = recorder.maps()
    assert len(maps.per_layer) == 7 and maps.steps == [
        0,
        1,
        2,
        3,
    ]  # the clone made by the LoRA loader still records
    assert maps.labels[0][1] == "<U+200B>"
    assert not torch.equal(with_lora, before)  # the LoRA did apply ...
    plain_lora, _ = comfy.sd.load_lora_for_models(model, None, _lora_for(lora_dir), 1.0, 0.0)
    assert (
        with_lora - _sample(plain_lora, clip, cond)
    ).abs().max() <= 1e-5  # ... and capture changed nothing
    assert torch.equal(_sample(model, clip, cond), before)  # the input MODEL is untouched


def test_heatmap_node_draws_one_labelled_row_per_image(comfy_root):
    from backdoor_seal.nodes.nodes_attention import SealAttentionCapture, SealAttentionHeatmaps

    model, clip, vae = _lab(comfy_root)
    patched, cond, recorder = SealAttentionCapture.execute(
        model=model, clip=clip, text="a blue square", resolution=16, layers="", first_step=0, last_step=-1
    ).result
    images = vae.decode(_sample(patched, clip, cond))
    out = SealAttentionHeatmaps.execute(
        attention=recorder,
        images=images,
        max_tokens=8,
        include_bos_eos=False,
        opacity=0.6,
        colormap="inferno",
    )
    grid = out.result[0]
    tile = 128
    # image + 3 tokens ("a", "blue", "square") per row; 2 rows, each with a label strip
    assert grid.shape == (1, 2 * (tile + tile // 5), 4 * tile, 3)
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    # overlays differ from the plain image tile
    assert not torch.allclose(grid[0, :tile, :tile], grid[0, :tile, tile : 2 * tile])


def test_heatmaps_refuse_mismatched_batches(comfy_root):
    import pytest

    from backdoor_seal.core.attention import AttentionMaps
    from backdoor_seal.core.heatmaps import overlay_grid

    maps = AttentionMaps(
        per_layer={"a": torch.rand(2, 77, 4, 4)}, steps=[0], labels=[["<BOS>", "x"] + ["<EOS>"] * 75] * 2
    )
    with pytest.raises(ValueError, match="3 images but attention for 2"):
        overlay_grid(maps, torch.rand(3, 64, 64, 3))
