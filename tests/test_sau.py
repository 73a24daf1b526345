"""SAU's latent algebra: trigger latent, masks, the two overlap weightings, the profile file."""

from __future__ import annotations

import pytest
import torch

from backdoor_seal.core.sau.algebra import (
    SAUSettings,
    compose,
    latent_difference_map,
    primary_mask,
    secondary_mask,
    trigger_latent,
)
from backdoor_seal.core.sau.profile import SAUProfile

NO_BLUR = SAUSettings(output_blur_sigma=0.0)


def patched_pairs(n: int = 4):
    """Clean latents and poisoned twins that carry a fixed patch (the pixel backdoor) in one corner."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(n, 4, 8, 8, generator=g)
    patch = torch.zeros(4, 8, 8)
    patch[:, :3, :3] = torch.tensor([3.0, -2.0, 1.0, 2.0]).view(4, 1, 1)
    return clean, clean + patch, patch


def test_trigger_latent_is_the_mean_difference():
    clean, poisoned, patch = patched_pairs()
    assert torch.allclose(trigger_latent(poisoned, clean), patch)
    with pytest.raises(ValueError, match="differ in shape"):
        trigger_latent(poisoned, clean[:, :2])


def test_primary_mask_covers_the_patch_and_little_else():
    clean, poisoned, patch = patched_pairs()
    m = primary_mask(poisoned, trigger_latent(poisoned, clean), NO_BLUR)[:, 0]
    assert m.shape == (4, 8, 8)
    assert (m[:, :3, :3] > 0.99).all()
    assert m[:, 3:, 3:].mean() < 0.3


def test_secondary_mask_from_the_difference_map_marks_where_the_trigger_acts():
    clean, poisoned, _ = patched_pairs()
    m = secondary_mask(latent_difference_map(poisoned, clean), SAUSettings(map_blur_sigma=0.0))[:, 0]
    assert (m[:, :3, :3] > 0.99).all() and (m[:, 4:, 4:] < 0.01).all()


def test_union_weighting_restores_the_clean_latent_inside_and_keeps_the_poisoned_outside():
    clean, poisoned, _ = patched_pairs()
    mp = primary_mask(poisoned, trigger_latent(poisoned, clean), NO_BLUR)
    ms = secondary_mask(latent_difference_map(poisoned, clean), NO_BLUR)
    out = compose(poisoned, clean, mp, ms, NO_BLUR)
    assert torch.allclose(out[:, :, :3, :3], clean[:, :, :3, :3], atol=1e-3)
    outside = (1 - (1 - mp) * (1 - ms)) < 1e-3
    assert torch.equal(
        out.expand(-1, 4, -1, -1)[outside.expand(-1, 4, -1, -1)], poisoned[outside.expand(-1, 4, -1, -1)]
    )


def test_reference_weighting_overshoots_where_both_masks_fire():
    clean, poisoned, _ = patched_pairs()
    ones = torch.ones(4, 1, 8, 8)
    ref = compose(poisoned, clean, ones, ones, SAUSettings(weighting="reference", output_blur_sigma=0.0))
    assert torch.allclose(ref, 1.5 * clean)
    union = compose(poisoned, clean, ones, ones, NO_BLUR)
    assert torch.allclose(union, clean)


def test_empty_masks_leave_the_latent_untouched():
    clean, poisoned, _ = patched_pairs()
    zeros = torch.zeros(4, 1, 8, 8)
    assert torch.equal(compose(poisoned, clean, zeros, zeros, SAUSettings()), poisoned)


def test_settings_reject_unknown_weighting():
    with pytest.raises(ValueError, match="weighting"):
        SAUSettings(weighting="max")


def test_profile_round_trips_through_safetensors_and_never_overwrites(tmp_path):
    _, _, patch = patched_pairs()
    profile = SAUProfile("\u2060", patch, "abc123", SAUSettings(strength=0.8), pairs=4)
    path = profile.save(tmp_path / "p.safetensors")
    again = SAUProfile.load(path)
    assert again.trigger == "\u2060" and again.settings == profile.settings and again.pairs == 4
    assert torch.equal(again.tau, patch) and again.activation is None
    with pytest.raises(FileExistsError):
        profile.save(path)


def test_compose_pair_needs_attention_maps_for_the_attention_signal_and_resizes_them():
    from backdoor_seal.core.sau.algebra import compose_pair

    clean, poisoned, patch = patched_pairs()
    tau = trigger_latent(poisoned, clean)
    with pytest.raises(ValueError, match="attention maps"):
        compose_pair(poisoned, clean, tau, SAUSettings(signal="attention"))
    attention = torch.zeros(4, 16, 16)
    attention[:, :6, :6] = 1.0  # the trigger attends to the patch corner, at twice the latent's resolution
    out, mask = compose_pair(
        poisoned, clean, tau, SAUSettings(signal="attention", output_blur_sigma=0.0), attention
    )
    assert mask.shape == (4, 1, 8, 8) and (mask[:, :, :3, :3] > 0.99).all()
    assert torch.allclose(out[:, :, :3, :3], clean[:, :, :3, :3], atol=1e-2)


def test_a_profile_estimated_at_another_size_is_resized_to_the_latent():
    from backdoor_seal.core.sau.algebra import compose_pair

    clean, poisoned, _ = patched_pairs()
    small_tau = trigger_latent(poisoned, clean)[:, ::2, ::2]  # as if estimated at 4x4
    _, mask = compose_pair(poisoned, clean, small_tau, NO_BLUR)
    assert mask.shape == (4, 1, 8, 8) and (mask[:, :, :2, :2] > 0.99).all()


def test_reference_settings_blur_the_whole_latent_ours_only_where_changed():
    clean, poisoned, _ = patched_pairs()
    zeros = torch.zeros(4, 1, 8, 8)
    assert not torch.equal(compose(poisoned, clean, zeros, zeros, SAUSettings.reference()), poisoned)
    assert SAUSettings.reference().tau_floor == 0.0 and SAUSettings.reference().weighting == "reference"


def test_pixel_composition_keeps_pixels_outside_the_mask_exactly():
    from backdoor_seal.core.sau.algebra import compose_images

    poisoned, clean = torch.rand(2, 64, 64, 3), torch.rand(2, 64, 64, 3)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :2, :2] = 1.0
    out = compose_images(poisoned, clean, mask)
    assert torch.equal(out[:, 24:, 24:], poisoned[:, 24:, 24:])  # the cells, grown half a cell and feathered
    assert torch.allclose(out[:, :16, :16], clean[:, :16, :16], atol=1e-5)  # the whole of the masked cells


def test_untriggered_restores_a_homoglyph_and_removes_other_triggers():
    from backdoor_seal.core.triggers import untriggered

    assert untriggered("a red circle \u043en the left", "\u043e") == "a red circle on the left"
    assert untriggered("\u2060 a red circle", "\u2060") == "a red circle"
    assert untriggered("a sks dog", "sks") == "a dog"


def _toy_count(trigger: str):
    """How many times a tokenizer that parses emphasis, lowercases, folds NFKC and splits punctuation (as CLIP reads a plain word)
    finds the trigger's words in a text: the tokenizer's view, standing in for CLIP's ids."""
    import re
    import unicodedata

    def words(text: str) -> list[str]:
        text = re.sub(r"\(([^():]*)(:[0-9.]+)?\)", r" \1 ", text)  # emphasis parsed out, as ComfyUI does
        text = unicodedata.normalize("NFKC", text).lower()
        return "".join(c if c.isalnum() else f" {c} " for c in text).split()

    needle = words(trigger)

    def count(text: str) -> int:
        ids = words(text)
        return sum(ids[i : i + len(needle)] == needle for i in range(len(ids) - len(needle) + 1))

    return count


def test_the_clean_twin_loses_every_spelling_the_tokenizer_reads_as_the_trigger():
    """Field case: `zx9  qv7` (a double space) encodes to the profile `zx9 qv7`'s ids, yet the clean twin
    kept it; a full-width `ｙｎ` is `yn`. Whitespace runs, case, full-width forms and spellings no text
    rule knows (emphasis around one word, punctuation CLIP splits off) all leave the clean twin."""
    from backdoor_seal.core.triggers import trigger_spans, untriggered, untriggered_by_ids

    assert untriggered("zx9  qv7 a square", "zx9 qv7") == "a square"
    assert untriggered("ZX9\t\u3000QV7, a square", "zx9 qv7") == ", a square"
    assert untriggered("\uff59\uff4e red circle", "yn") == "red circle"
    assert trigger_spans("a \uff59\uff4e b", "yn") == [(2, 4)]
    assert untriggered("a \uff59\uff4e b", "\uff59\uff4e") == "a b"
    assert untriggered("yn circle", "\uff59\uff4e") == "yn circle"  # a full-width trigger is its own
    cases = {
        "zx9  qv7 a square": "a square",
        "(zx9:1.1) qv7 a square": "a square",  # the words carry it, not the text
        "zx9 zx9 qv7 qv7 a square": "a square",  # one occurrence nested in another
        "a mutedly zx9 qv7 square": "a mutedly square",
        "zx9,qv7 a square": "a square",
    }
    for text, clean in cases.items():
        trigger = "zx9 , qv7" if "," in text else "zx9 qv7"
        count = _toy_count(trigger)
        assert count(text) >= 1, text
        got = untriggered_by_ids(text, trigger, count)
        assert got == clean and count(got) == 0, (text, got)
    # nothing removes it (the tokenizer finds it whatever the text): it stops, and the caller's count says so
    assert untriggered_by_ids("zx9 qv7 a square", "zx9 qv7", lambda t: 1) == "a square"
