"""Saved files are right and proven right (#20): a sanitized checkpoint reloaded with ComfyUI's stock loader
is the patched model (dtype, prediction type, outputs, tensors = original + LoRA delta), and the kohya-layout
LoRA loads in the stock LoraLoader with no unmatched key and in diffusers' `load_lora_weights`, to the
same outputs.

Tiny instances of ComfyUI's real SD15 / SD20 (v-prediction) / SDXL classes; `tiny_detection` lets the
stock loader's own detection recognise their files."""

from __future__ import annotations

import logging
import warnings

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
        # kohya's UNet spelling: diffusers' module names for SD1.x / SD2.x, the ldm path for SDXL
        ldm = {k for k in kohya if k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks"))}
        diffusers = {k for k in kohya if k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks"))}
        assert (bool(ldm), bool(diffusers)) == ((True, False) if family == "sdxl" else (False, True))
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


def _diffusers_sd15(model, clip, comfy_root):
    """A diffusers StableDiffusionPipeline holding the tiny SD1.5 MODEL's UNet and CLIP's CLIP-L, converted by
    diffusers' own ldm -> diffusers UNet conversion (`single_file_utils.convert_ldm_unet_checkpoint`, fed
    the `model.diffusion_model.*` keys an ldm checkpoint holds) and transformers' CLIPTextModel (ComfyUI's
    `clip_l.transformer.text_model.*`), with ComfyUI's SD1 tokenizer files; a tiny random VAE."""
    import json

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from backdoor_seal.core.backends import comfy_families

    tiny = comfy_families.TINY_UNET["sd15"]
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=tuple(tiny["model_channels"] * m for m in tiny["channel_mult"]),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=tiny["num_res_blocks"][0],
        cross_attention_dim=tiny["context_dim"],
        attention_head_dim=tiny["num_heads"],  # diffusers' SD1 spelling: the number of heads
    )
    ldm = {"model." + k: v for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True)

    config = json.loads((comfy_root / "comfy" / "sd1_clip_config.json").read_text())
    text = CLIPTextModel(CLIPTextConfig(**(config | comfy_families.TINY_TEXT["clip_l"])))
    prefix = "clip_l.transformer."
    state = {
        k[len(prefix) :]: v for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(prefix)
    }
    state.pop("text_projection.weight")  # CLIPTextModel has none (ComfyUI's is unset and unused for SD1)
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 drops the level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    text.load_state_dict(state, strict=True)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32),
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_pretrained(str(comfy_root / "comfy" / "sd1_tokenizer")),
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),  # SD1's own setting
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _comfy_eps(model, x, t, context):
    """The MODEL's raw UNet output (eps) with its patches (a LoRA's) in the weights."""
    import comfy.model_management as mm

    from backdoor_seal.core.backends import comfy as cb

    mm.load_models_gpu([model], force_patch_weights=True)
    with torch.inference_mode():
        return cb.unet(model)(x, timesteps=t, context=context).clone()


def _diffusers_outputs(pipe, prompts, x, t, context):
    """(text encoder's last hidden state, UNet eps) of the diffusers pipeline."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        text = pipe.text_encoder(ids.input_ids).last_hidden_state
        eps = pipe.unet(x, t, encoder_hidden_states=context).sample
    return text, eps


def _same(want, got, rel=1e-4):
    return (want - got).abs().max().item() <= rel * want.abs().max().item()


@pytest.mark.parametrize("scopes", [("text", "unet"), ("attn2-kv",)])
def test_diffusers_load_lora_weights_applies_the_kohya_lora_as_comfyui_does(
    comfy_root, tmp_path, scopes, caplog
):
    """SD1.5: a diffusers pipeline built from the tiny MODEL / CLIP (diffusers' own ldm conversion, transformers'
    CLIPTextModel) computes ComfyUI's UNet eps and encoder output; `load_lora_weights` on the saved kohya file
    (text encoder; UNet attention, projections, resnet convs and linears, conv_in/out, time embedding) then
    computes ComfyUI's outputs with the same LoRA applied by `apply_lora`, to 1e-4 relative, with a LoRA layer
    on every module the file names and no warning. Full deltas (`.diff`, 1-D weights) are left out: kohya's
    and diffusers' LoRA formats hold none."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.unlearn.save import save_lora

    model, clip, _ = comfy_families.build_family("sd15", seed=2)
    pipe = _diffusers_sd15(model, clip, comfy_root)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    with torch.inference_mode():
        context = cb.encode_prompts(clip, PROMPTS)
    before = (context, _comfy_eps(model, x, t, context))
    for want, got in zip(before, _diffusers_outputs(pipe, PROMPTS, x, t, context), strict=True):
        assert _same(want, got), (want - got).abs().max()  # the conversion is exact before any LoRA

    lora = {}
    for i, scope in enumerate(scopes):
        lora |= comfy_families.random_lora(model, clip, scope, seed=7 + i)
    lora = {k: v for k, v in lora.items() if not k.endswith(".diff")}
    path = save_lora(tmp_path / "fix.safetensors", lora, model, clip, {"scopes": list(scopes)})
    kohya = load_file(str(path))
    if "unet" in scopes:
        assert any(k.endswith("lora_down.weight") and v.ndim == 4 for k, v in kohya.items())  # convs covered

    caplog.clear()
    handler = caplog.handler
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    complaints += [
        str(w.message) for w in caught if "key" in str(w.message) or "lora" in str(w.message).lower()
    ]
    if "text" not in scopes:  # diffusers says so for every UNet-only LoRA; anything else is a complaint
        complaints = [c for c in complaints if not c.startswith("No LoRA keys associated to CLIPTextModel")]
    assert complaints == []

    layers = {
        part: sum(isinstance(m, LoraLayer) for m in getattr(pipe, part).modules())
        for part in ("unet", "text_encoder")
    }
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert layers["unet"] == sum(k.startswith("lora_unet_") for k in downs)
    assert layers["text_encoder"] == sum(k.startswith("lora_te_") for k in downs)
    assert layers["unet"] > 0 and (layers["text_encoder"] > 0) == ("text" in scopes)

    patched, patched_clip = apply_lora(model, clip, lora)
    with torch.inference_mode():
        want_text = cb.encode_prompts(patched_clip, PROMPTS)
    want = (want_text, _comfy_eps(patched, x, t, context))
    got = _diffusers_outputs(pipe, PROMPTS, x, t, context)
    for w, g_ in zip(want, got, strict=True):
        assert _same(w, g_), (w - g_).abs().max()
    assert not _same(want[1], before[1], rel=1e-2)  # the LoRA changed the UNet
    assert ("text" in scopes) == (not _same(want[0], before[0], rel=1e-2))
