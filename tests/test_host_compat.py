"""Guards for ComfyUI versions after 0.8.0 (#35 item 4, docs/compatibility.md), each tested on the host
at hand by simulating the newer shape: BaseModel.state_dict_for_saving taking the UNet dict first, and a
dynamic-VRAM ModelPatcher that refuses force_patch_weights and merges on request (return_weight)."""

from __future__ import annotations

import pytest
import torch


def _family(family: str):
    from backdoor_seal.core.backends import comfy_families
    from backdoor_seal.core.backends.comfy_train import apply_lora

    model, clip, vae = comfy_families.build_family(
        family, prediction="v" if family == "sd20" else "eps", seed=3
    )
    lora = comfy_families.random_lora(model, clip, "attn2", seed=1, scale=0.3)
    lora |= comfy_families.random_lora(model, clip, "text", seed=2, scale=0.3)
    return model, clip, vae, *apply_lora(model, clip, lora)


def _newer_state_dict_for_saving(self, unet_state_dict, clip_state_dict=None, vae_state_dict=None, **_):
    """BaseModel.state_dict_for_saving as ComfyUI after 0.8 shapes it (the UNet dict comes first)."""
    import comfy.model_base

    extra = []
    if clip_state_dict is not None:
        extra.append(self.model_config.process_clip_state_dict_for_saving(clip_state_dict))
    if vae_state_dict is not None:
        extra.append(self.model_config.process_vae_state_dict_for_saving(vae_state_dict))
    out = self.model_config.process_unet_state_dict_for_saving(unet_state_dict)
    if self.model_type == comfy.model_base.ModelType.V_PREDICTION:
        out["v_pred"] = torch.tensor([])
    for sd in extra:
        out.update(sd)
    return out


def test_a_checkpoint_saves_alike_when_state_dict_for_saving_takes_the_unet_first(
    comfy_root, tmp_path, monkeypatch
):
    """The same bytes for every tensor under either signature; the old call fails on the newer one."""
    import comfy.model_base

    from backdoor_seal.core.safetensors_io import load_checkpoint
    from backdoor_seal.core.unlearn.save import save_sanitized

    _, _, vae, patched, patched_clip = _family("sd20")
    before = save_sanitized(tmp_path / "a.safetensors", patched, patched_clip, vae, dtype=torch.float16)
    monkeypatch.setattr(comfy.model_base.BaseModel, "state_dict_for_saving", _newer_state_dict_for_saving)
    with pytest.raises((TypeError, AttributeError)):  # what the unguarded call did on the newer shape
        patched.model.state_dict_for_saving(None, vae.get_sd(), None)
    after = save_sanitized(tmp_path / "b.safetensors", patched, patched_clip, vae, dtype=torch.float16)
    a, _ = load_checkpoint(before)
    b, _ = load_checkpoint(after)
    assert a.keys() == b.keys() and "v_pred" in b
    assert any(k.startswith("model.diffusion_model.") for k in b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_live_weights_on_a_dynamic_patcher_ask_the_hosts_merge(comfy_root, monkeypatch):
    """A patcher that says is_dynamic() and refuses force_patch_weights (ModelPatcherDynamic.load asserts
    it): live_weights reads each patched weight from patch_weight_to_device(return_weight=True), equal
    to what the force-patched load gives."""
    import comfy.lora
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    from backdoor_seal.core.backends.comfy_checkpoint import live_weights

    model, clip, _, patched, patched_clip = _family("sd15")
    want = {k: v.clone() for k, v in live_weights(patched, patched_clip).items()}
    mm.unload_all_models()  # the modules hold their unpatched weights again
    load, patch = mp.ModelPatcher.load, mp.ModelPatcher.patch_weight_to_device
    calls = []

    def dynamic_load(self, *args, force_patch_weights=False, **kwargs):
        if getattr(self, "is_dynamic", lambda: False)():
            assert not force_patch_weights  # as ModelPatcherDynamic.load
        return load(self, *args, **kwargs)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False):
        if not return_weight:  # a plain load's patching
            return patch(self, key, device_to, inplace_update)
        calls.append(key)
        weight = comfy.model_patcher.get_key_weight(self.model, key)[0]
        return comfy.lora.calculate_weight(self.patches[key], weight.to(torch.float32, copy=True), key)

    monkeypatch.setattr(mp.ModelPatcher, "load", dynamic_load)
    monkeypatch.setattr(mp.ModelPatcher, "patch_weight_to_device", patch_weight_to_device)
    for p in (patched, patched_clip.patcher):
        monkeypatch.setattr(p, "is_dynamic", lambda: True, raising=False)
    with pytest.raises(AssertionError):  # the unguarded force-patched load
        mm.load_models_gpu([patched], force_patch_weights=True)
    mm.unload_all_models()
    got = live_weights(patched, patched_clip)
    assert got.keys() == want.keys()
    assert len(calls) == len(patched.patches) + len(patched_clip.patcher.patches)
    assert all(torch.equal(got[k], want[k]) for k in want)
    unpatched = live_weights(model, clip)  # a plain patcher still takes the force-patched load
    assert any(not torch.equal(unpatched[k], want[k]) for k in want)
