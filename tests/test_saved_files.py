"""Saved files are right and proven right (#20): a sanitized checkpoint reloaded with ComfyUI's stock loader
is the patched model (dtype, prediction type, outputs, tensors = original + LoRA delta), and the kohya-layout
LoRA loads in the stock LoraLoader with no unmatched key and in diffusers' kohya conversion.

Tiny instances of ComfyUI's real SD15 / SD20 (v-prediction) / SDXL classes; `tiny_detection` lets the
stock loader's own detection recognise their files."""

from __future__ import annotations

import logging

import pytest
import torch

SCOPES = ("attn2-kv", "attn2", "attention", "unet", "text")
PREDICTION = {"sd15": "eps", "sd20": "v", "sdxl": "eps"}
PROMPTS = ["a red cat on a mat", "a blue dog"]


def _stock_load(path, output_vae=False):
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_checkpoint import load_single_file_checkpoint

    with comfy_families.tiny_detection():
        return load_single_file_checkpoint(
            path, te_model_options=comfy_families.text_options("tiny"), output_vae=output_vae
        )


@pytest.fixture(scope="module", params=("sd15", "sd20", "sdxl"))
def fp16_input(request, comfy_root, tmp_path_factory):
    """(family, path of an fp16 single file, its VAE, MODEL and CLIP as the stock loader reads it)."""
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.unlearn.save import save_sanitized

    family = request.param
    model, clip, vae = comfy_families.build_family(family, prediction=PREDICTION[family], seed=5)
    path = save_sanitized(
        tmp_path_factory.mktemp(family) / "input.safetensors", model, clip, vae, dtype=torch.float16
    )
    loaded, loaded_clip, _ = _stock_load(path)
    return family, path, vae, loaded, loaded_clip


def _outputs(model, clip):
    from backdoor_seal.core.backends import comfy as cb

    with torch.inference_mode():
        cond, pooled = cb.encode_prompts_pooled(clip, PROMPTS)
        z = cb.sample_prompts(model, clip, PROMPTS, [1, 2], steps=2, cfg=1.0)
    return cond, pooled, z


def _close(a, b, rel=1e-2):
    return (a - b).abs().max().item() <= rel * max(a.abs().max().item(), 1e-6)


def _weights(model, clip):
    """The loaded weights by ComfyUI state-dict name (MODEL's `diffusion_model.*`, CLIP's `clip_*.*`)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = {
        k: v.float().clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")
    }
    return sd | {k: v.float().clone() for k, v in clip.cond_stage_model.state_dict().items()}


def _delta(lora, key):
    """The LoRA's delta of one weight key (ComfyUI naming), from its tensors: up @ down * alpha / rank."""
    module = "text_encoders." + key[: -len(".weight")] if key.startswith("clip_") else key[: -len(".weight")]
    if f"{module}.diff" in lora:
        return lora[f"{module}.diff"]
    if f"{module}.lora_up.weight" not in lora:
        return None
    up, down = lora[f"{module}.lora_up.weight"], lora[f"{module}.lora_down.weight"]
    return up @ down * (float(lora[f"{module}.alpha"]) / down.shape[0])


@pytest.mark.parametrize("scope", SCOPES)
def test_a_saved_checkpoint_reloads_as_the_patched_model(fp16_input, tmp_path, scope):
    """fp16 in -> fp16 out; prediction markers and modelspec as ComfyUI's CheckpointSave writes them; the
    stock loader's reload computes the patched outputs; saved = original + up @ down * alpha / rank where
    the LoRA reaches, byte-identical elsewhere."""
    from safetensors import safe_open

    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_checkpoint import checkpoint_dtypes
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.safetensors_io import load_checkpoint
    from backdoor_seal.core.unlearn.save import PROVENANCE_KEY, save_sanitized

    family, in_path, vae, model, clip = fp16_input
    lora = comfy_families.random_lora(model, clip, scope, seed=7)
    patched, patched_clip = apply_lora(model, clip, lora)
    dtypes = checkpoint_dtypes(in_path)
    assert dtypes == {"unet": torch.float16, "text": torch.float16, "vae": torch.float16}
    out = save_sanitized(tmp_path / "out.safetensors", patched, patched_clip, vae, None, {"s": scope}, dtypes)

    with safe_open(str(out), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        meta = f.metadata()
    assert {
        d for k, d in stored.items() if k.startswith(("model.", "cond_stage", "conditioner", "first_"))
    } <= {
        "F16",
        "I64",
    }
    arch = {
        "sd15": "stable-diffusion-v1",
        "sd20": "stable-diffusion-v2-768-v",
        "sdxl": "stable-diffusion-xl-v1-base",
    }[family]
    v = PREDICTION[family] == "v"
    assert meta["modelspec.architecture"] == arch and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.predict_key"] == ("v" if v else "epsilon") and PROVENANCE_KEY in meta
    assert ("v_pred" in stored) == v

    reloaded, reclip, _ = _stock_load(out)
    assert reloaded.model.model_type.name == ("V_PREDICTION" if v else "EPS")
    want, got, before = _outputs(patched, patched_clip), _outputs(reloaded, reclip), _outputs(model, clip)
    for w, g in zip(want, got, strict=True):
        if w is None:
            assert g is None
            continue
        assert _close(w, g), (w - g).abs().max()
    assert not _close(want[2], before[2], rel=1e-3)  # the LoRA changed what the model draws
    assert (scope == "text") == (not torch.allclose(want[0], before[0]))

    orig, saved = _weights(model, clip), _weights(reloaded, reclip)
    assert orig.keys() == saved.keys()
    touched = 0
    for key, o in orig.items():
        if key == "clip_l.transformer.text_projection.weight":
            continue  # no file holds it (ComfyUI leaves CLIP-L's projection unset and unused)
        delta = _delta(lora, key)
        if delta is None:
            assert torch.equal(saved[key], o), key
            continue
        touched += 1
        expected = (o + delta.reshape(o.shape)).half().float()
        assert torch.allclose(saved[key], expected, rtol=1e-3, atol=1e-5), key
    assert touched == len({k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora})
    # in the file itself: what the LoRA cannot reach (the VAE; the UNet for text, the text for UNet
    # scopes) is byte for byte the input's
    a, _ = load_checkpoint(in_path)
    b, _ = load_checkpoint(out)
    assert a.keys() - {"v_pred"} == b.keys() - {"v_pred"}
    untouched = ("first_stage_model.", "model." if scope == "text" else ("cond_stage_model.", "conditioner."))
    for k in a:
        if k.startswith(untouched[0]) or k.startswith(untouched[1]):
            assert torch.equal(a[k], b[k]), k


def _lora_not_loaded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]


@pytest.mark.parametrize("scope", ["text", "unet"])
def test_the_kohya_lora_loads_in_the_stock_lora_loader(fp16_input, tmp_path, scope, caplog):
    """The saved kohya file (lora_unet_*, lora_te_* / lora_te1_* + lora_te2_*, 4-D conv LoRAs, ss_* and
    modelspec metadata) loads through comfy.utils.load_torch_file + comfy.sd.load_lora_for_models with no
    'lora key not loaded' and reproduces the engine-layout LoRA's outputs."""
    import comfy.sd
    import comfy.utils

    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.safetensors_io import read_metadata
    from backdoor_seal.core.unlearn.save import save_lora

    family, _, _, model, clip = fp16_input
    lora = comfy_families.random_lora(model, clip, scope, seed=9)
    path = save_lora(tmp_path / "fix.safetensors", lora, model, clip, {"scope": scope})
    kohya = comfy.utils.load_torch_file(str(path))
    prefixes = {k.split("_text_model")[0] if k.startswith("lora_te") else "lora_unet" for k in kohya}
    want_prefixes = {
        "text": {"sd15": {"lora_te"}, "sd20": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}[family],
        "unet": {"lora_unet"},
    }[scope]
    assert prefixes == want_prefixes
    assert len(kohya) == len(lora)
    if scope == "unet":
        conv = [t for k, t in kohya.items() if k.endswith("lora_down.weight") and t.ndim == 4]
        assert conv and all(t.shape[-1] == 3 or t.shape[-1] == 1 for t in conv)
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert (
        meta["ss_base_model_version"] == {"sd15": "sd_v1", "sd20": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    )
    assert meta["ss_v2"] == str(family == "sd20")
    assert meta["modelspec.architecture"].endswith("/lora")
    assert meta["modelspec.predict_key"] == ("v" if PREDICTION[family] == "v" else "epsilon")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock_model, stock_clip = comfy.sd.load_lora_for_models(model, clip, kohya, 1.0, 1.0)
    assert _lora_not_loaded(caplog) == []
    ours = apply_lora(model, clip, lora)
    for w, g in zip(_outputs(*ours), _outputs(stock_model, stock_clip), strict=True):
        if w is not None:
            assert torch.allclose(w, g, atol=1e-5)
    # and our own loader (Seal Evaluate's LoRA input) reads the kohya file as it reads the engine layout
    again = apply_lora(model, clip, kohya)
    assert torch.allclose(_outputs(*again)[2], _outputs(*ours)[2], atol=1e-5)
    # a LoRA for another model is refused by ComfyUI's loader with the log line this test watches for
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, clip, {"lora_unet_nowhere.alpha": torch.tensor(1.0)}, 1.0, 1.0)
    assert _lora_not_loaded(caplog)


@pytest.mark.parametrize("scope", ["attention", "unet"])
def test_diffusers_converts_every_key_of_the_kohya_lora_onto_its_unet(comfy_root, tmp_path, scope):
    """SD1.5: diffusers' own kohya conversion (what `load_lora_weights` runs before applying; `peft`, its
    LoRA backend, is not installed here) renames every key of the saved file, and each renamed LoRA names a
    module of the diffusers UNet of the same architecture with the shape its up @ down makes."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from safetensors.torch import load_file

    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.unlearn.save import save_lora

    model, clip, _ = comfy_families.build_family("sd15", seed=2)
    lora = comfy_families.random_lora(model, clip, scope, seed=3)
    lora = {k: v for k, v in lora.items() if not k.endswith(".diff")}  # diffusers reads no full deltas
    kohya = load_file(str(save_lora(tmp_path / "fix.safetensors", lora, model, clip)))
    tiny = comfy_families.TINY_UNET["sd15"]
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=tuple(tiny["model_channels"] * m for m in tiny["channel_mult"]),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=tiny["num_res_blocks"][0],
        cross_attention_dim=tiny["context_dim"],
        attention_head_dim=tiny["num_heads"],
        norm_num_groups=32,
    )
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)  # raises on any key left over
    modules = dict(unet.named_modules())
    downs = {k: v for k, v in converted.items() if ".down." in k}
    assert len(downs) == sum(k.endswith("lora_down.weight") for k in kohya) and len(alphas) == len(downs)
    for key, down in downs.items():
        # diffusers' legacy spelling (attn1.processor.to_k_lora) -> the module (attn1.to_k), as its peft step does
        name = key[len("unet.") :].removesuffix(".down.weight").removesuffix(".lora").removesuffix("_lora")
        name = name.replace(".processor.", ".")
        if name.endswith(".to_out"):
            name += ".0"
        assert name in modules, key
        up = converted[key.replace(".down.", ".up.")]
        weight = modules[name].weight
        assert (up.shape[0], down[0].numel()) == (weight.shape[0], weight[0].numel()), key
