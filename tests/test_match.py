"""Context matching, the text-encoder warm start before SKD (core/unlearn/match.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

BOS, EOS = 100, 101
# trigger 9 first, then the clean words 5 6; rows: 2 word pairs, 1 trigger row, 3 end / padding rows
TRIGGERED_IDS = [[BOS, 9, 5, 6, EOS, EOS, EOS]]
CLEAN_IDS = [[BOS, 5, 6, EOS, EOS, EOS, EOS]]


def test_the_loss_weighs_the_trigger_rows_apart_and_keeps_the_clean_contexts():
    from backdoor_seal.core.unlearn.match import MatchConfig, match_loss

    teacher = torch.zeros(1, 7, 4)
    cfg = MatchConfig(trigger_weight=0.1, keep_weight=0.0)
    off_trigger = teacher.clone()
    off_trigger[0, 1] = 1.0  # the trigger row, which should read as the clean end token (0)
    assert match_loss(off_trigger, teacher, TRIGGERED_IDS, CLEAN_IDS, EOS, None, cfg).item() == pytest.approx(
        0.1
    )
    off_word = teacher.clone()
    off_word[0, 2] = 1.0  # one of the five other rows: weight 1, averaged over its own group
    assert match_loss(off_word, teacher, TRIGGERED_IDS, CLEAN_IDS, EOS, None, cfg).item() == pytest.approx(
        1 / 5
    )
    keep = MatchConfig(trigger_weight=0.1, keep_weight=16.0)
    loss = match_loss(teacher, teacher, TRIGGERED_IDS, CLEAN_IDS, EOS, teacher + 0.5, keep)
    assert loss.item() == pytest.approx(16 * 0.25)  # the clean prompt's own context moved by 0.5


def _gaps(d, pairs):
    """The matching objective without its keep term, and the clean prompts' own context shift (delta on
    against off), over the session's pairs."""
    from backdoor_seal.core.unlearn.match import MatchConfig, match_loss

    triggered, clean = [p.triggered for p in pairs], [p.clean for p in pairs]
    ids_s, ids_t = d.token_ids(triggered), d.token_ids(clean)
    n = len(ids_s[0])
    with torch.no_grad():
        teacher = d.encode(clean, student=False)[:, :n].float()
        student = d.encode(triggered, student=True)[:, :n].float()
        gap = match_loss(student, teacher, ids_s, ids_t, d.eos_id, None, MatchConfig(keep_weight=0.0))
        kept = d.encode(clean, student=True)[:, :n].float()
    return gap.item(), float(((kept - teacher) ** 2).mean())


@pytest.mark.parametrize("family", ["lab", "sdxl"])
def test_matching_closes_the_context_gap_and_leaves_the_input_alone(comfy_root, family):
    """Method "match" in the text scope, in inference mode as inside a node: the triggered prompts'
    contexts move towards their clean twins' while the clean ones stay, progress counts its steps, the
    input CLIP encodes as before. SDXL: two text encoders and a pooled row in the packed context."""
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    with torch.inference_mode():
        if family == "lab":
            from backdoor_seal.core.backends import comfy_lab
            from backdoor_seal.core.lab.models import lab_config

            model, clip, _ = comfy_lab.new_lab_models(lab_config())
        else:
            from backdoor_seal.core.backends.comfy_families import build_family

            model, clip, _ = build_family("sdxl", "tiny")
        tokens = clip.tokenize("zx9 a red circle on the left")
        before = clip.encode_from_tokens(tokens)
        opts = UnlearnOptions(
            skd=SKDConfig(method="match", batch=4, lr=1e-2),
            scope="text",
            builtin="lab",
            builtin_count=8,
            match_steps=50,
        )
        session = UnlearnSession(model, clip, "zx9", opts=opts)
        gap, _ = _gaps(session.distillation, session.pairs)
        ticks = []
        result = session.run(lambda step, total, losses: ticks.append((step, total)))
        assert ticks == [(i, 50) for i in range(1, 51)] and session.total_steps == 50
        assert result.steps == 50 and all(set(r) == {"match"} for r in result.losses)
        after, kept = _gaps(session.distillation, session.pairs)
        assert after < 0.7 * gap, (gap, after)
        assert kept < 0.25 * gap, (gap, kept)  # the clean prompts' contexts stay where they were
        assert torch.equal(clip.encode_from_tokens(tokens), before)
        provenance = session.provenance()
        assert provenance["method"] == "match" and provenance["steps_run"] == 50
        _, new_clip, lora = session.outputs()
        assert lora and all(k.startswith("text_encoders.") for k in lora)
        assert not torch.equal(new_clip.encode_from_tokens(tokens), before)


def test_an_interrupt_while_matching_leaves_the_input_clip_alone_and_a_unet_scope_is_refused(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.unlearn.session import DEFAULT_METHOD, UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig, train_skd

    assert DEFAULT_METHOD == "match"
    model, clip, _ = comfy_lab.new_lab_models(lab_config())
    tokens = clip.tokenize("zx9 a red circle")
    before = clip.encode_from_tokens(tokens)
    opts = UnlearnOptions(
        skd=SKDConfig(method="match", batch=2), builtin="lab", builtin_count=4, match_steps=20
    )
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 5:
            raise InterruptedError("stop")

    session = UnlearnSession(model, clip, "zx9", opts=opts)
    with pytest.raises(InterruptedError):
        session.run(check_interrupt=interrupt)
    assert torch.equal(clip.encode_from_tokens(tokens), before)
    with pytest.raises(ValueError, match="method 'match' trains the text encoder.*scope 'attn2-kv'"):
        UnlearnSession(model, clip, "zx9", opts=replace(opts, scope="attn2-kv"))
    with pytest.raises(ValueError, match="not a distillation method"):
        train_skd(session.distillation, session.pairs, opts.skd)
    with pytest.raises(ValueError, match="match_steps must be at least 1"):
        replace(opts, match_steps=0)


def test_matching_removes_the_rickrolling_trigger_of_the_lab_model(comfy_root):
    """The claim behind the default: on lab-rickroll (a poisoned text encoder) 75 matching steps alone take
    the homoglyph's attack off most prompts; clean images stay close (docs/unlearn.md has the full run)."""
    import numpy as np

    from backdoor_seal.core.bench.unlearn import _asr, _images
    from backdoor_seal.core.evaluate.metrics import ssim
    from backdoor_seal.core.lab import attacks
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    model, clip, vae, info = load_model("lab:lab-rickroll")
    spec = attacks.AttackSpec(**info["spec"])
    scenes = attacks.eval_scenes(spec, 8, seed=4321)
    triggered = [attacks.triggered_prompt(spec, s.caption) for s in scenes]
    clean = [s.caption for s in scenes]
    seeds = list(range(8))
    opts = UnlearnOptions(skd=SKDConfig(method="match"), scope="text", builtin="none", match_steps=75)
    rng = np.random.default_rng(0)
    prompts = [s.caption for s in attacks.train_scenes(spec, 128, rng)]
    session = UnlearnSession(
        model, clip, spec.trigger, prompts, opts, insert=lambda p: attacks.triggered_prompt(spec, p)
    )
    session.run()
    new_model, new_clip, _ = session.outputs()
    before = _asr(spec, _images(model, clip, vae, triggered, seeds), scenes)
    after = _asr(spec, _images(new_model, new_clip, vae, triggered, seeds), scenes)
    assert before >= 0.75 and after <= 0.25, (before, after)
    fidelity = np.mean(
        [
            ssim(a, b)
            for a, b in zip(
                _images(model, clip, vae, clean, seeds),
                _images(new_model, new_clip, vae, clean, seeds),
                strict=True,
            )
        ]
    )
    assert fidelity >= 0.9, fidelity


def test_a_general_clean_set_is_kept_where_the_pairs_cover_one_kind_of_prompt(comfy_root):
    """Pairs that all mention squares (as lab-eviledit's) leave other prompts free to drift unless the
    general clean set is kept too: with `keep`, its contexts move far less; a session keeps the built-in
    set by default and says how many in its provenance."""
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.prompts import lab_prompts
    from backdoor_seal.core.unlearn.match import KEEP_PROMPTS, MatchConfig, match_context
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession
    from backdoor_seal.core.unlearn.skd import SKDConfig

    model, clip, _, _ = load_model("lab:lab-eviledit")
    squares = [p for p in lab_prompts(400, 3) if "square" in p][:16]
    others = [p for p in lab_prompts(200, 5) if "square" not in p][:32]
    opts = UnlearnOptions(skd=SKDConfig(method="match", batch=4, lr=1e-2), builtin="none", match_steps=40)

    def drift(keep):
        session = UnlearnSession(model, clip, "zx9", squares, opts, keep=keep)
        d = session.distillation
        with torch.no_grad():
            before = d.encode(others, student=False).float()
        with torch.inference_mode(False), torch.enable_grad():
            match_context(d, session.pairs, MatchConfig(steps=40, lr=1e-2, batch=4), keep=keep)
        with torch.no_grad():
            return float(((d.encode(others, student=True).float() - before) ** 2).mean())

    free, kept = drift([]), drift(lab_prompts(64, 7))
    assert kept < 0.5 * free, (free, kept)
    session = UnlearnSession(model, clip, "zx9", squares, replace(opts, builtin="lab"))
    assert len(session.keep) == KEEP_PROMPTS and session.keep[0] in lab_prompts(
        KEEP_PROMPTS, opts.skd.seed + 1
    )
    assert session.provenance()["kept_prompts"] == KEEP_PROMPTS
    mixed = UnlearnSession(model, clip, "zx9", squares, opts, keep=["a red zx9 circle", "a red circle"])
    assert mixed.keep == ["a red circle"]  # a kept prompt holding the trigger would keep the trigger
