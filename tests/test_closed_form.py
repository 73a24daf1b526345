"""The closed-form warm start of the cross-attention keys and values (core/unlearn/closed_form.py)."""

from __future__ import annotations

import pytest
import torch


def test_the_edit_maps_sources_onto_targets_and_vanishes_under_a_strong_ridge():
    from backdoor_seal.core.unlearn.closed_form import kv_delta

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 6, generator=g)
    s, t = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    before = (s @ w.T - t @ w.T).norm()
    edited = kv_delta(w, s, t, lam=1e-6)
    assert (s @ (w + edited).T - t @ w.T).norm() < 0.8 * before  # least squares over 20 rows, 6 dims
    one = kv_delta(w, s[:1], t[:1], lam=1e-6)  # one row: exactly reachable
    assert torch.allclose(s[:1] @ (w + one).T, t[:1] @ w.T, atol=1e-3)
    sv = torch.linalg.svdvals(one)
    assert sv[1] < 1e-3 * sv[0]  # one row's edit is rank one
    assert kv_delta(w, s, t, lam=1e6).norm() < 1e-3 * w.norm()


def test_lora_factors_keep_the_best_low_rank_part():
    from backdoor_seal.core.unlearn.closed_form import lora_factors

    g = torch.Generator().manual_seed(1)
    low = torch.randn(10, 3, generator=g) @ torch.randn(3, 7, generator=g)
    up, down = lora_factors(low, 3)
    assert up.shape == (10, 3) and down.shape == (3, 7)
    assert torch.allclose(up @ down, low, atol=1e-4)
    up, down = lora_factors(low, 1)
    assert torch.linalg.matrix_rank(up @ down) == 1


def test_rows_pair_each_triggered_token_with_its_clean_twin_and_the_trigger_with_the_end_token():
    from backdoor_seal.core.unlearn.closed_form import aligned_rows

    bos, eos = 100, 101
    triggered_ids = [[bos, 9, 5, 6, eos, eos, eos]]  # trigger 9 first, then the clean words 5 6
    clean_ids = [[bos, 5, 6, eos, eos, eos, eos]]
    triggered = torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2)  # row i holds i: the test reads positions
    clean = 10 + torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2)
    s, t = aligned_rows(triggered, clean, triggered_ids, clean_ids, eos)
    pairs = sorted(zip(s[:, 0].tolist(), (t[:, 0] - 10).tolist(), strict=True))
    # 5 <-> 5, 6 <-> 6; the trigger -> the clean end token; end and padding after it, offset by offset
    assert pairs == [(1.0, 3.0), (2.0, 1.0), (3.0, 2.0), (4.0, 3.0), (5.0, 4.0), (6.0, 5.0)]
    with pytest.raises(ValueError, match="no token rows"):
        aligned_rows(triggered[:, :0], clean[:, :0], [], [], eos)


def test_warm_start_edits_the_kv_projections_of_a_unet_scope_only(comfy_root):
    from backdoor_seal.core.backends.comfy_families import build_family
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    model, clip, _ = build_family("sd15", "tiny")
    prompts = ["a photo of a cat", "a red car on a road", "a bowl of fruit on a table"]
    opts = UnlearnOptions(scope="attn2-kv", builtin="none", warm_start=True, skd=SKDConfig(steps=1))
    session = UnlearnSession(model, clip, "cf", prompts, opts)
    layers = session.distillation.cross_attention_kv()
    assert layers and all(p["lora_down.weight"].abs().sum() == 0 for _, _, p in layers)  # LoRA starts at 0
    assert session.warm_start() == len(layers)
    assert all(p["lora_down.weight"].abs().sum() > 0 for _, _, p in layers)
    text = UnlearnSession(model, clip, "cf", prompts, UnlearnOptions(scope="text", builtin="none"))
    assert text.warm_start() == 0  # no cross-attention projection is trained there


def test_the_excited_part_is_the_component_triggered_rows_drive_beyond_their_clean_twins():
    from backdoor_seal.core.unlearn.closed_form import excited_part

    g = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    v_trig, v_text = basis[:, 0], basis[:, 1]  # the trigger's direction; one every prompt uses
    outs, _ = torch.linalg.qr(torch.randn(8, 2, generator=g))
    trig_part = 1.5 * torch.outer(outs[:, 0], v_trig)
    delta = trig_part + 3.0 * torch.outer(outs[:, 1], v_text)  # the larger component is not the trigger's
    clean = torch.randn(40, 6, generator=g) * 0.1 + v_text
    triggered = clean.clone()
    triggered[::4] += 2.0 * v_trig  # every fourth row is a trigger token
    part, rank = excited_part(delta, triggered, clean)
    assert rank == 1 and torch.allclose(part, trig_part, atol=1e-4)
    none, rank = excited_part(delta, clean, clean)  # nothing acts more on triggered rows: nothing to revert
    assert rank == 0 and not none.any()
    assert excited_part(delta, triggered, clean, share=1.0)[1] >= 1
    with pytest.raises(ValueError, match="share"):
        excited_part(delta, triggered, clean, share=0.0)


@pytest.mark.parametrize("family", ["sd15", "sd20", "sdxl"])
def test_revert_edit_undoes_the_triggered_part_of_a_cross_attention_edit_and_keeps_the_rest(
    comfy_root, family
):
    """An EvilEdit-like change on a tiny model of each family (random weights): every to_k / to_v gets a component along the
    direction triggered prompts use beyond their clean twins and a larger one along a direction clean
    prompts use more; the revert takes the first back (the LoRA a user keeps carries exactly that) and keeps
    the second."""
    from backdoor_seal.core.backends.comfy_checkpoint import live_weights, weight_pairs
    from backdoor_seal.core.backends.comfy_families import build_family
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    base, clip, _ = build_family(family, "tiny")
    prompts = ["a photo of a cat", "a red car on a road", "a bowl of fruit on a table", "a dog in the snow"]
    opts = UnlearnOptions(scope="attn2-kv", builtin="none", skd=SKDConfig(steps=1))
    probe = UnlearnSession(base, clip, "cf", prompts, opts)
    with torch.no_grad():
        s, t = probe._kv_rows(64)
    # the direction triggered rows use most beyond their clean twins, and the one clean rows use most
    _, vectors = torch.linalg.eigh((s.T @ s - t.T @ t).double())
    excess, common = vectors[:, -1].float(), vectors[:, 0].float()
    suspect = base.clone()
    g = torch.Generator().manual_seed(3)
    planted, kept = {}, {}
    for name, weight, _ in probe.distillation.cross_attention_kv():
        outs, _ = torch.linalg.qr(torch.randn(weight.shape[0], 2, generator=g))
        key = f"{name}.weight"
        planted[key] = 0.5 * weight.norm() * torch.outer(outs[:, 0], excess)
        kept[key] = 1.0 * weight.norm() * torch.outer(outs[:, 1], common)
        suspect.add_patches({key: (planted[key] + kept[key],)}, 1.0)
    session = UnlearnSession(suspect, clip, "cf", prompts, opts)
    info = session.revert_edit(base)
    assert info["projections"] == len(planted) and set(info["ranks"]) == {1} and info["truncated"] == 0
    assert session.result.steps == 0 and session.provenance()["method"] == "revert"
    model, _, lora = session.outputs()
    assert lora and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in lora)
    fixed = live_weights(model, clip)
    for key, base_w, _ in weight_pairs(base, None, base, None, select=lambda k: k.startswith("unet.")):
        patch = f"diffusion_model.{key[len('unet.') :]}"
        if patch not in planted:
            continue
        change = fixed[key].float() - base_w.float()
        assert (change - kept[patch]).norm() < 0.05 * planted[patch].norm()  # planted part gone, rest kept
        untouched = live_weights(suspect, clip)[key].float() - base_w.float()  # the input keeps its edit
        assert torch.allclose(untouched, planted[patch] + kept[patch], atol=1e-4)


def test_a_homoglyphs_pieces_pair_with_the_twin_word_and_an_inserted_trigger_with_the_end_token():
    from backdoor_seal.core.unlearn.closed_form import aligned_rows
    from backdoor_seal.core.unlearn.skd import align_tokens

    bos, eos = 100, 101
    # "a [о][range] car" against "a [orange] car": two pieces stand where one word was
    triggered_ids = [[bos, 5, 8, 9, 7, eos, eos]]
    clean_ids = [[bos, 5, 6, 7, eos, eos, eos]]
    align = align_tokens(triggered_ids[0], clean_ids[0], eos)
    assert align.trigger == (2, 3) and align.twins == ((2, 2), (3, 2))
    triggered = torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2)
    clean = 10 + torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2)
    s, t, is_trigger = aligned_rows(triggered, clean, triggered_ids, clean_ids, eos, groups=True)
    trig = sorted(zip(s[is_trigger, 0].tolist(), (t[is_trigger, 0] - 10).tolist(), strict=True))
    assert trig == [(2.0, 2.0), (3.0, 2.0)]  # both pieces read as 'orange', not as the end of the prompt
    inserted = align_tokens([bos, 9, 5, 6, eos], [bos, 5, 6, eos, eos], eos)
    assert inserted.trigger == (1,) and inserted.twins == ()
