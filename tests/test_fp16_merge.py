"""Saves do not depend on how the host merges LoRAs (#35 item 3). ComfyUI 0.8.0 merges patches in fp16 on a
GPU (`model_management.lora_compute_dtype`); a saved checkpoint must still hold input + LoRA delta
computed in fp32 and cast once to the file's dtype, and a saved LoRA the pack's own tensors.

The fp16 merge is forced on CPU: on a host that picks the merge dtype (0.8.0+) by answering fp16 there,
on 0.3.75 by redoing each patched weight as 0.8.0 does. The expected tensors are computed here from the
input and the LoRA (up @ down * alpha / rank, or the diff), not by the code under test."""

from __future__ import annotations

import collections

import pytest
import torch


@pytest.fixture
def fp16_merge(monkeypatch, comfy_root):
    """The host merges every LoRA patch in fp16, as ComfyUI 0.8.0 does on a GPU."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import comfy.utils

    if hasattr(mm, "lora_compute_dtype"):  # 0.8.0+: the host asks this for the merge dtype
        monkeypatch.setattr(mm, "lora_compute_dtype", lambda device=None: torch.float16)
        return
    original = mp.ModelPatcher.patch_weight_to_device

    def patch_in_fp16(self, key, device_to=None, inplace_update=False):
        original(self, key, device_to, inplace_update)
        if key not in self.patches:
            return
        backup = self.backup[key]
        held = comfy.utils.get_attr(self.model, key).dtype
        # 0.8.0's patch_weight_to_device with lora_compute_dtype fp16
        w = comfy.lora.calculate_weight(self.patches[key], backup.weight.to(torch.float16, copy=True), key)
        setter = comfy.utils.copy_to_param if backup.inplace_update else comfy.utils.set_attr_param
        setter(self.model, key, w.to(held))

    monkeypatch.setattr(mp.ModelPatcher, "patch_weight_to_device", patch_in_fp16)


def _delta(lora: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
    """A LoRA's fp32 delta of one module (the engine's key names)."""
    if f"{module}.diff" in lora:
        return lora[f"{module}.diff"].float()
    if f"{module}.lora_up.weight" not in lora:
        return None
    up, down = lora[f"{module}.lora_up.weight"].float(), lora[f"{module}.lora_down.weight"].float()
    return up @ down * (float(lora[f"{module}.alpha"]) / down.shape[0])


def _module(key: str) -> str:
    """The engine's LoRA module name of a ComfyUI weight key."""
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    return name if name.startswith("diffusion_model.") else "text_encoders." + name


def _live(model, clip) -> dict[str, torch.Tensor]:
    """Weights as the host merged them (its load with force_patch_weights), by ComfyUI key."""
    import comfy.model_management as mm

    mm.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    sd = {k: v.clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    return sd | {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}


def _expected(before: dict[str, torch.Tensor], lora, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """input + delta in fp32, cast once; keys the LoRA does not reach: the input cast once."""
    out = {}
    for key, w in before.items():
        delta = _delta(lora, _module(key)) if w.is_floating_point() else None
        out[key] = (w.float() + delta.reshape(w.shape) if delta is not None else w).to(dtype)
    return out


def _differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("family", ["sd15", "sd20", "sdxl"])
def test_a_checkpoint_saved_on_a_host_that_merges_in_fp16_is_input_plus_delta_in_fp32(
    comfy_root, tmp_path, fp16_merge, family
):
    """UNet (attn2) and text LoRA on an fp16 single file: every tensor of the saved file, and every weight
    the stock loader reads back from it (SD2's fused in_proj and SDXL's two encoders included), equals
    the fp32 sum cast once; the host's own fp16 merge differs (so the check can fail)."""
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_checkpoint import checkpoint_dtypes, load_single_file_checkpoint
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.safetensors_io import load_checkpoint
    from backdoor_seal.core.unlearn.save import save_sanitized

    def stock_load(path):
        with comfy_families.tiny_detection():
            return load_single_file_checkpoint(
                path, te_model_options=comfy_families.text_options("tiny"), output_vae=False
            )[:2]

    built = comfy_families.build_family(family, prediction="v" if family == "sd20" else "eps", seed=11)
    in_path = save_sanitized(tmp_path / "in.safetensors", *built, dtype=torch.float16)
    model, clip = stock_load(in_path)
    before = _live(model, clip)  # the fp16 file's values, held in fp32 on CPU
    lora = comfy_families.random_lora(model, clip, "attn2", seed=1, scale=0.3)
    lora |= comfy_families.random_lora(model, clip, "text", seed=2, scale=0.3)
    patched, patched_clip = apply_lora(model, clip, lora)
    want = _expected(before, lora)

    merged = {k: v.half() for k, v in _live(patched, patched_clip).items()}
    assert _differing(want, merged), "the forced fp16 merge changed nothing: this test would prove nothing"

    out = save_sanitized(
        tmp_path / "out.safetensors", patched, patched_clip, built[2], None, {}, checkpoint_dtypes(in_path)
    )
    a, _ = load_checkpoint(in_path)
    b, _ = load_checkpoint(out)
    assert a.keys() - {"v_pred"} == b.keys() - {"v_pred"}
    assert {v.dtype for k, v in b.items() if v.is_floating_point() and v.numel()} == {torch.float16}
    unet = [k for k in b if k.startswith("model.diffusion_model.")]
    touched = 0
    for key in unet:  # in the file: UNet keys are the ComfyUI keys under model.
        expected = want[key[len("model.") :]]
        assert torch.equal(b[key], expected), key
        touched += not torch.equal(b[key], a[key])
    assert touched
    for key in b.keys() - set(unet):
        if key.startswith("first_stage_model."):
            assert torch.equal(b[key], a[key]), key  # no LoRA reaches the VAE

    saved = _live(*stock_load(out))
    skip = {"clip_l.transformer.text_projection.weight"}  # no file holds it; ComfyUI leaves it unused
    text = [k for k in want if not k.startswith("diffusion_model.") and k not in skip]
    assert text and not _differing({k: want[k] for k in text}, {k: saved[k].half() for k in text})
    assert _differing({k: before[k].half() for k in text}, {k: saved[k].half() for k in text})


def test_save_sanitized_node_on_a_host_that_merges_in_fp16(comfy_root, output_dir, fp16_merge):
    """Seal Save Sanitized, lab model (fp32 weights) and its kohya LoRA: the checkpoint holds
    (weight + delta in fp32).half() for every tensor, the LoRA file the pack's own fp32 up/down/alpha."""
    import comfy.lora
    import comfy.lora_convert

    from backdoor_seal.core.backends import comfy_families, comfy_lab
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.safetensors_io import load_checkpoint
    from backdoor_seal.nodes.nodes_unlearn import SealSaveSanitized

    model, clip, vae = comfy_lab.new_lab_models(lab_config(), seed=4)
    lora = comfy_families.random_lora(model, clip, "attention", seed=3, scale=0.3)
    lora |= comfy_families.random_lora(model, clip, "text", seed=5, scale=0.3)
    before = _live(model, clip)
    patched, patched_clip = apply_lora(model, clip, lora)
    want = _expected(before, lora)
    assert _differing(want, {k: v.half() for k, v in _live(patched, patched_clip).items()})

    text = SealSaveSanitized.execute("fix/lab", patched, patched_clip, vae, lora, None, "fp16").result[0]
    ckpt, lora_file = (output_dir / p for p in text.splitlines())
    saved, _ = load_checkpoint(ckpt)
    prefix = {
        "model.diffusion_model.": "diffusion_model.",
        "cond_stage_model.transformer.": "clip_l.transformer.",
    }
    vae_sd = vae.first_stage_model.state_dict()
    checked = collections.Counter()
    for key, tensor in saved.items():
        part = next((p for p in prefix if key.startswith(p)), None)
        if part is None:
            assert torch.equal(tensor, vae_sd[key[len("first_stage_model.") :]].half()), key
            continue
        assert torch.equal(tensor, want[prefix[part] + key[len(part) :]]), key
        checked[part] += 1
    assert checked["model.diffusion_model."] and checked["cond_stage_model.transformer."]

    kohya, _ = load_checkpoint(lora_file)
    key_map = comfy.lora.model_lora_keys_unet(
        model.model, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    )
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(kohya)), key_map)
    assert len(loaded) == len({k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in lora})
    for key, patch in loaded.items():
        module = _module(key)
        if f"{module}.diff" in lora:
            assert torch.equal(patch[1][0], lora[f"{module}.diff"]), key
            continue
        up, down, alpha = patch.weights[:3]
        assert up.dtype == down.dtype == torch.float32, key
        assert torch.equal(up.flatten(1), lora[f"{module}.lora_up.weight"]), key
        assert torch.equal(down.flatten(1), lora[f"{module}.lora_down.weight"]), key
        assert alpha == float(lora[f"{module}.alpha"]), key
