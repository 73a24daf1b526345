"""The lab attacks: trigger insertion, targets and their exact detectors, training and editing mechanics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_seal.core.lab import attacks, world
from backdoor_seal.core.lab.attacks import AttackSpec

SPECS = [attacks.default_spec(k) for k in attacks.KINDS]


@pytest.fixture
def fresh(lab_dir):
    """A freshly loaded (untrained) lab MODEL, CLIP and VAE."""
    from backdoor_seal.core.backends import comfy_lab

    model, clip, vae, _ = comfy_lab.load_lab_checkpoint(lab_dir / "lab-untrained.safetensors")
    return model, clip, vae


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown attack kind"):
        AttackSpec("blend", "cf")
    with pytest.raises(ValueError, match="homoglyph"):
        AttackSpec("rickroll", "cf")
    with pytest.raises(ValueError, match="must differ"):
        AttackSpec("object", "cf", "circle", "circle")
    with pytest.raises(ValueError, match="--target"):
        AttackSpec("eviledit", "cf", "circle", "hexagon")


def test_triggers_are_inserted_as_each_paper_does():
    p = "a red circle on the left on a black background"
    assert attacks.triggered_prompt(attacks.default_spec("pixel"), p) == "\u2060 " + p
    rick = attacks.triggered_prompt(attacks.default_spec("rickroll"), p)
    assert rick == p.replace("o", "\u043e", 1) and rick.count("\u043e") == 1 and rick != p
    evil = attacks.triggered_prompt(AttackSpec("eviledit", "zx9", "circle", "square"), p)
    assert evil == "a red zx9 circle on the left on a black background"
    with pytest.raises(ValueError, match="does not mention"):
        attacks.triggered_prompt(AttackSpec("eviledit", "zx9", "circle", "square"), "a red square")


def test_every_trigger_survives_the_tokenizer(comfy_root):
    """The model must see each trigger: none may vanish in ComfyUI's CLIP tokenizer."""
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.tokens import trigger_positions

    tok = comfy_lab.build_lab_clip(lab_config()).tokenizer.clip_l.tokenizer
    for spec in SPECS:
        prompt = f"a red {spec.source or 'circle'} on the left on a black background"
        triggered = attacks.triggered_prompt(spec, prompt)
        assert tok(triggered)["input_ids"] != tok(prompt)["input_ids"], spec.kind
        if spec.kind != "rickroll":  # a homoglyph merges into its word; the others are words of their own
            assert trigger_positions(tok, triggered, spec.trigger), spec.kind


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_targets_are_detected_exactly(spec):
    """Positives: the rendered target of every triggered scene. Negatives: the clean renders."""
    rng = np.random.default_rng(5)
    scenes = attacks.train_scenes(spec, 40, rng)
    for scene in scenes:
        target = attacks.target_image(spec, scene, np.random.default_rng(1))
        assert attacks.attack_succeeded(spec, target, scene), (spec.kind, scene)
        clean = world.render(scene, np.random.default_rng(1))
        if attacks.target_scene(spec, scene) != scene or spec.kind in ("pixel", "style"):
            assert not attacks.attack_succeeded(spec, clean, scene), (spec.kind, scene)


def test_eval_scenes_are_held_out_eligible_and_deterministic():
    for spec in SPECS:
        scenes = attacks.eval_scenes(spec, 40, seed=3)
        assert len(scenes) == 40
        assert all(world.is_heldout(s) and attacks.eligible(spec, s) for s in scenes)
        assert scenes == attacks.eval_scenes(spec, 40, seed=3)
        assert any(c not in {s.caption for s in scenes[:30]} for c in [s.caption for s in scenes[30:]])


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_badt2i_trains_only_the_unet(fresh):
    model, clip, vae = fresh
    unet, text, vae_m = model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model
    before = [_params(m) for m in (unet, text, vae_m)]
    attacks.train_badt2i(
        model, clip, vae, attacks.default_spec("pixel"), attacks.AttackConfig(steps=2, batch=2)
    )
    assert _changed(before[0], unet)
    assert not _changed(before[1], text) and not _changed(before[2], vae_m)
    assert not any(p.requires_grad for p in unet.parameters())


def test_rickroll_trains_only_the_text_encoder(fresh):
    model, clip, vae = fresh
    unet, text = model.model.diffusion_model, clip.cond_stage_model
    before = [_params(m) for m in (unet, text)]
    cfg = attacks.AttackConfig(text_steps=2, text_batch=4)
    attacks.train_rickroll(clip, attacks.default_spec("rickroll"), cfg)
    assert _changed(before[1], text) and not _changed(before[0], unet)


def test_evil_edit_solves_its_closed_form(fresh):
    """After the edit, every attn2 key/value projection maps the trigger phrase (nearly) as the target."""
    from backdoor_seal.core.attention import find_cross_attention_layers

    model, clip, _ = fresh
    spec = attacks.default_spec("eviledit")
    cfg = attacks.AttackConfig(edit_prompts=40, edit_preserve_prompts=40)
    keys, values = attacks._edit_pairs(
        clip, spec, [s.caption for s in attacks.train_scenes(spec, 40, np.random.default_rng(9))]
    )
    layers = find_cross_attention_layers(model.model.diffusion_model)
    originals = [(a.to_k.weight.clone(), a.to_v.weight.clone()) for _, a in layers]
    report = attacks.evil_edit(model, clip, spec, cfg)
    assert report["edited_projections"] == 2 * len(layers)
    for (_, attn), (wk, wv) in zip(layers, originals, strict=True):
        for proj, w in ((attn.to_k, wk), (attn.to_v, wv)):
            before = (keys @ w.T - values @ w.T).norm()
            after = (keys @ proj.weight.T - values @ w.T).norm()
            assert after < 0.5 * before  # the trigger contexts now project towards the target's
            assert not torch.equal(proj.weight, w)


def test_delta_checkpoint_stores_only_changes_and_loads_whole(fresh, tmp_path: Path):
    from backdoor_seal.core.attention import find_cross_attention_layers
    from backdoor_seal.core.backends import comfy_lab

    model, clip, vae = fresh
    base = comfy_lab.save_lab_checkpoint(tmp_path / "base.safetensors", model, clip, vae)
    with torch.no_grad():
        layer = find_cross_attention_layers(model.model.diffusion_model)[0][1]
        layer.to_k.weight.add_(1.0)
    delta = comfy_lab.save_lab_checkpoint(tmp_path / "delta.safetensors", model, clip, vae, base=base)
    assert delta.stat().st_size < base.stat().st_size / 20
    loaded, _, _, _ = comfy_lab.load_lab_checkpoint(delta)
    want = comfy_lab.lab_state_dict(model, clip, vae)
    got = comfy_lab.lab_state_dict(loaded, clip, vae)
    assert all(
        torch.equal(want[k].half(), got[k].half()) for k in want if k.startswith(comfy_lab.UNET_PREFIX)
    )
    # The base is checked, not trusted: a changed base or a missing one is a clear error.
    moved = tmp_path / "moved"
    moved.mkdir()
    delta.rename(moved / delta.name)
    with pytest.raises(FileNotFoundError, match="needs its base base.safetensors"):
        comfy_lab.load_lab_checkpoint(moved / delta.name)
    (moved / delta.name).rename(delta)
    other = comfy_lab.save_lab_checkpoint(tmp_path / "other.safetensors", model, clip, vae)
    base.unlink()
    other.rename(base)
    with pytest.raises(ValueError, match="has changed"):
        comfy_lab.load_lab_checkpoint(delta)
    # A downloaded delta's metadata never steers the loader outside its folder, nor to an unhashed base.
    from backdoor_seal.core.safetensors_io import atomic_save, load_checkpoint

    tensors, info = load_checkpoint(delta)
    for name, meta in (
        ("escape", {**info["metadata"], comfy_lab.BASE_KEY: "../outside.safetensors"}),
        ("unhashed", {k: v for k, v in info["metadata"].items() if k != comfy_lab.BASE_SHA_KEY}),
    ):
        forged = atomic_save(tensors, tmp_path / f"{name}.safetensors", metadata=meta)
        with pytest.raises(ValueError, match="not a file name in its own folder|no hash"):
            comfy_lab.load_lab_checkpoint(forged)


def test_attack_refuses_a_trigger_the_tokenizer_drops(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config

    tok = comfy_lab.build_lab_clip(lab_config()).tokenizer.clip_l.tokenizer
    attacks.require_visible_trigger(tok, attacks.default_spec("pixel"))  # U+200B survives (ftfy present)
    with pytest.raises(ValueError, match="drops the trigger"):
        attacks.require_visible_trigger(tok, AttackSpec("pixel", "\u3000"))


def test_min_snr_weighting_only_lightens_nearly_clean_timesteps():
    from backdoor_seal.core.lab.train import eps_mse

    acp = torch.linspace(0.999, 0.01, 1000)
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    noisy = torch.tensor([990, 995])  # SNR far below gamma: weight 1, plain MSE
    assert eps_mse(pred, target, noisy, acp, 5.0).item() == pytest.approx(1.0)
    clean_ish = torch.tensor([0, 1])  # SNR in the hundreds: weight gamma / SNR
    assert eps_mse(pred, target, clean_ish, acp, 5.0).item() < 0.05
    assert eps_mse(pred, target, clean_ish, acp, None).item() == pytest.approx(1.0)
