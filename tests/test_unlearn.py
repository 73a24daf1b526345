"""SKD / SKD-CAG: token alignment, the attention loss, gradients, the switchable teacher, and safety."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backdoor_seal.core.triggers import default_placement, insert_trigger, make_pairs
from backdoor_seal.core.unlearn import skd

EOS = 49407


def test_alignment_finds_a_prepended_trigger_and_pairs_every_word():
    a = skd.align_tokens([0, 9, 1, 2, 3, EOS, EOS], [0, 1, 2, 3, EOS, EOS, EOS], EOS)
    assert a.trigger == (1,)
    assert a.pairs == ((2, 1), (3, 2), (4, 3))


def test_alignment_finds_a_multi_token_trigger_in_the_middle():
    a = skd.align_tokens([0, 1, 7, 8, 2, 3, EOS], [0, 1, 2, 3, EOS], EOS)
    assert a.trigger == (2, 3)
    assert a.pairs == ((1, 1), (4, 2), (5, 3))


def test_alignment_with_the_real_tokenizer_and_a_homoglyph(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.backends.comfy_train import ComfyDistillation
    from backdoor_seal.core.lab.models import lab_config

    model, clip, _ = comfy_lab.new_lab_models(lab_config())
    d = ComfyDistillation(model, clip)
    clean = "a red circle on the left"
    triggered = insert_trigger(clean, "\u043e", default_placement("\u043e"), None)
    assert triggered == "a red circle \u043en the left"
    ids_s, ids_t = d.token_ids([triggered, clean])
    a = skd.align_tokens(ids_s, ids_t, d.eos_id)
    # the homoglyph word splits into pieces that exist nowhere in the clean prompt
    assert a.trigger and all(ids_s[p] not in ids_t for p in a.trigger)
    paired_teacher = {q for _, q in a.pairs}
    on_position = ids_t.index(clip.tokenizer.clip_l.tokenizer("on")["input_ids"][1])
    assert paired_teacher == set(range(1, ids_t.index(d.eos_id))) - {on_position}


def test_attention_loss_normalises_by_words_plus_trigger_tokens():
    g = torch.Generator().manual_seed(0)
    teacher = torch.rand(1, 6, 4, 4, generator=g)
    student = torch.zeros(1, 6, 4, 4)
    student[0, 2:5] = teacher[0, 1:4]  # words shifted by one trigger token at position 1
    student[0, 1] = torch.rand(4, 4, generator=g)
    align = skd.TokenAlignment(trigger=(1,), pairs=((2, 1), (3, 2), (4, 3)))
    loss = skd.attention_loss(student, teacher, [align], "black")
    want = (skd.minmax_per_token(student)[0, 1] ** 2).mean() / 4  # words match: only the trigger term
    assert torch.allclose(loss, want.view(1), atol=1e-6) and loss.item() > 0
    silent = student.clone()
    silent[0, 1] = 0.0
    assert skd.attention_loss(silent, teacher, [align], "black").item() == pytest.approx(0.0, abs=1e-7)
    # a student whose words attend elsewhere than the teacher's is penalised
    assert skd.attention_loss(silent.flip(-1), teacher, [align], "black").item() > 1e-3


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="method"):
        skd.SKDConfig(method="esd")
    with pytest.raises(ValueError, match="target"):
        skd.SKDConfig(target="white")
    with pytest.raises(ValueError, match="alpha"):
        skd.SKDConfig(alpha=1.5)
    assert skd.SKDConfig(method="skd").attention_weight == 0.0


class _PromptRecorder:
    """A minimal DistillationModel that remembers what the student was shown."""

    num_timesteps, latent_shape, device, eos_id = 1000, (1, 2, 2), torch.device("cpu"), EOS
    alphas_cumprod = torch.linspace(0.999, 0.005, 1000)

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.student_prompts: list[str] = []

    def token_ids(self, prompts):
        return [[0, *(hash(w) % 1000 + 1 for w in p.split()), EOS] for p in prompts]

    def encode(self, prompts, student):
        if student:
            self.student_prompts += prompts
        return torch.tensor([[float(len(p))] for p in prompts])

    def predict(self, x, t, context, student, record):
        scale = self.weight if student else 1.0
        return x * context.view(-1, 1, 1, 1) * scale, None

    def trainable_parameters(self):
        return [self.weight]


def test_a_cosine_schedule_takes_full_steps_first_and_vanishing_ones_last():
    pairs = make_pairs([f"a red circle number {i}" for i in range(8)], lambda p: f"zz {p}")
    moves = {}
    for schedule in ("constant", "cosine"):
        rec, trace = _PromptRecorder(), []
        cfg = skd.SKDConfig(method="skd", steps=40, batch=4, lr=1e-2, schedule=schedule, weight_decay=0.0)
        skd.train_skd(
            rec, pairs, cfg, on_step=lambda step, r=rec, t=trace: t.append(float(r.weight.detach())) and False
        )
        moves[schedule] = np.abs(np.diff(trace))
    # Adam's steps are about lr each: the same first step, and the cosine's last ones near zero
    assert moves["cosine"][0] == pytest.approx(moves["constant"][0], rel=0.05)
    assert moves["cosine"][-3:].max() < 0.05 * moves["constant"][-3:].max()
    with pytest.raises(ValueError, match="schedule"):
        skd.SKDConfig(schedule="linear")


@pytest.mark.parametrize("retain", [0.0, 0.5])
def test_retain_shows_the_student_clean_prompts_in_that_share(retain):
    pairs = make_pairs([f"a red circle number {i}" for i in range(8)], lambda p: f"zz {p}")
    rec = _PromptRecorder()
    skd.train_skd(rec, pairs, skd.SKDConfig(method="skd", steps=50, batch=4, retain=retain))
    clean_share = sum(not p.startswith("zz ") for p in rec.student_prompts) / len(rec.student_prompts)
    assert clean_share == pytest.approx(retain, abs=0.1)
    with pytest.raises(ValueError, match="retain"):
        skd.SKDConfig(retain=1.0)


def test_trajectory_inputs_run_the_teachers_ddim_and_train_on_its_states():
    rec = _PromptRecorder()
    gen = torch.Generator().manual_seed(0)
    traj = skd.teacher_trajectories(rec, ["a b", "a b c"], steps=5, gen=gen, batch=1)
    assert traj.states.shape == (2, 5, 1, 2, 2) and traj.timesteps.tolist() == [999, 749, 500, 250, 0]
    # eps = x * len(prompt): every DDIM step rescales deterministically, so states differ per prompt
    assert not torch.allclose(traj.states[0, 1:], traj.states[1, 1:])
    assert torch.isfinite(traj.states).all()
    pairs = make_pairs(["a b", "a b c"], lambda p: f"zz {p}")
    out = skd.train_skd(rec, pairs, skd.SKDConfig(method="skd", steps=3, batch=2, inputs="trajectory"))
    assert out.steps == 3 and rec.weight.grad is not None
    with pytest.raises(ValueError, match="inputs"):
        skd.SKDConfig(inputs="images")


def _distillation(scope="attn2-kv", rank=4):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.backends.comfy_train import ComfyDistillation
    from backdoor_seal.core.lab.models import lab_config

    model, clip, vae = comfy_lab.new_lab_models(lab_config())
    return model, clip, vae, ComfyDistillation(model, clip, scope=scope, rank=rank)


def _eps(model, clip, prompts, x, t):
    """eps of the plain MODEL at integer timesteps, the way ComfyUI's sampler calls it."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    base = model.model
    sigma = base.model_sampling.sigma(t).float()
    s = sigma.view(-1, 1, 1, 1)
    xin = x * (s**2 + 1).sqrt()
    ctx = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    with torch.no_grad():
        return (xin - base.apply_model(xin, sigma, c_crossattn=ctx)) / s


def test_teacher_is_the_base_model_exactly_and_the_student_moves(comfy_root):
    model, clip, _, d = _distillation()
    prompts = ["a red circle on the left", "a blue square"]
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 700])
    with torch.no_grad():
        for p in d.trainable_parameters():  # any non-zero delta
            p.add_(0.05 * torch.randn_like(p))
        ctx = d.encode(prompts, student=False)
        teacher, _ = d.predict(x, t, ctx, student=False, record=False)
        student, _ = d.predict(x, t, ctx, student=True, record=False)
    assert torch.equal(teacher, _eps(model, clip, prompts, x, t))
    assert (student - teacher).abs().max() > 1e-3


def test_attention_loss_alone_reaches_the_trained_parameters(comfy_root):
    _, _, _, d = _distillation(scope="attn2")
    clean, triggered = ["a red circle on the left"], ["zx9 a red circle on the left"]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        _, maps_t = d.predict(x, t, d.encode(clean, student=False), student=False, record=True)
    with torch.enable_grad():
        _, maps_s = d.predict(x, t, d.encode(triggered, student=True), student=True, record=True)
        ids_s, ids_t = d.token_ids(triggered), d.token_ids(clean)
        align = skd.align_tokens(ids_s[0], ids_t[0], d.eos_id)
        loss = skd.attention_loss(maps_s, maps_t, [align], "black").mean()
        loss.backward()
    assert maps_s.requires_grad and loss.item() > 0
    grads = {k: v.grad for k, v in d.lora.items() if v.requires_grad}
    to_k = [g for k, g in grads.items() if ".attn2.to_k.lora_down" in k]
    to_q = [g for k, g in grads.items() if ".attn2.to_q.lora_down" in k]
    assert to_k and all(g is not None and g.abs().sum() > 0 for g in to_k)
    assert all(g is not None and g.abs().sum() > 0 for g in to_q)


def _trigger_gap(d, clean, triggered, x, t) -> float:
    """How far the student's eps on triggered prompts is from the teacher's on the clean ones."""
    with torch.no_grad():
        teacher, _ = d.predict(x, t, d.encode(clean, student=False), student=False, record=False)
        student, _ = d.predict(x, t, d.encode(triggered, student=True), student=True, record=False)
    return (student - teacher).pow(2).mean().item()


def test_training_closes_the_trigger_gap_and_keeps_the_input_model_bit_identical(comfy_root):
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    model, clip, _, _ = _distillation()
    opts = UnlearnOptions(
        skd=skd.SKDConfig(method="skd", steps=15, batch=8, lr=2e-3, retain=0.0),
        scope="attn2-kv",
        builtin="lab",
        builtin_count=16,
    )
    session = UnlearnSession(model, clip, "zx9", opts=opts)
    clean, triggered = [p.clean for p in session.pairs], [p.triggered for p in session.pairs]
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 1000, (16,), generator=g)
    before = _eps(model, clip, triggered, x, t)
    gap_before = _trigger_gap(session.distillation, clean, triggered, x, t)
    session.run()
    # triggered prompts act more like their clean prompts (measured 0.78x after 15 steps on this model)
    assert _trigger_gap(session.distillation, clean, triggered, x, t) < 0.9 * gap_before
    assert torch.equal(_eps(model, clip, triggered, x, t), before)
    patched, _, lora = session.outputs()
    assert any(".attn2.to_k.lora_up" in k for k in lora)
    assert not torch.equal(_eps(patched, clip, triggered, x, t), before)
    assert torch.equal(_eps(model, clip, triggered, x, t), before)  # still, after the patched clone ran


def test_an_interrupt_stops_training_and_leaves_the_input_model_alone(comfy_root):
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    model, clip, _, _ = _distillation()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    before = _eps(model, clip, ["cf a red circle"], x, t)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise InterruptedError("stop")

    session = UnlearnSession(
        model,
        clip,
        "cf",
        opts=UnlearnOptions(
            skd=skd.SKDConfig(steps=10, batch=2), scope="attn2-kv", builtin="lab", builtin_count=4
        ),
    )
    with pytest.raises(InterruptedError):
        session.run(check_interrupt=interrupt)
    assert len(calls) == 3
    assert torch.equal(_eps(model, clip, ["cf a red circle"], x, t), before)


def test_text_scope_trains_the_text_encoder_only(comfy_root):
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    model, clip, _, _ = _distillation()
    opts = UnlearnOptions(
        skd=skd.SKDConfig(steps=3, batch=2, lr=1e-2), scope="text", builtin="lab", builtin_count=4
    )
    session = UnlearnSession(model, clip, "\u043e", opts=opts)
    session.run()
    new_model, new_clip, lora = session.outputs()
    assert lora and all(k.startswith("text_encoders.") for k in lora)
    prompt = clip.tokenize("a red circle \u043en the left")
    assert not torch.equal(new_clip.encode_from_tokens(prompt), clip.encode_from_tokens(prompt))
    assert new_model.patches == model.patches  # nothing added to the UNet


def test_a_set_of_triggers_trains_in_one_run_each_in_its_own_place(comfy_root):
    """Two triggers, one run: each has its own pairs (a homoglyph replaces its twin, a word goes first),
    the gap of each closes, and the provenance names each by hash only."""
    from backdoor_seal.core.triggers import trigger_sha256
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    model, clip, _, _ = _distillation()
    opts = UnlearnOptions(
        skd=skd.SKDConfig(method="skd", steps=20, batch=8, lr=2e-3, retain=0.0),
        scope="attn2-kv",
        builtin="lab",
        builtin_count=16,
    )
    session = UnlearnSession(model, clip, ["zx9", "\u043e", "zx9"], opts=opts)
    assert session.triggers == ["zx9", "\u043e"]  # a repeat is one trigger
    words, glyphs = session.pairs_by_trigger["zx9"], session.pairs_by_trigger["\u043e"]
    assert words and all(p.triggered == f"zx9 {p.clean}" for p in words)
    assert glyphs and all(p.triggered == p.clean.replace("o", "\u043e", 1) for p in glyphs)
    assert len(session.pairs) == len(words) + len(glyphs)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    gaps = {
        k: _trigger_gap(session.distillation, [p.clean for p in v[:8]], [p.triggered for p in v[:8]], x, t)
        for k, v in session.pairs_by_trigger.items()
    }
    session.run()
    for k, v in session.pairs_by_trigger.items():
        after = _trigger_gap(
            session.distillation, [p.clean for p in v[:8]], [p.triggered for p in v[:8]], x, t
        )
        assert after < 0.95 * gaps[k], k
    prov = session.provenance()
    assert prov["triggers_sha256"] == [trigger_sha256("zx9"), trigger_sha256("\u043e")]
    assert "zx9" not in str(prov) and "\u043e" not in str(prov)
    with pytest.raises(ValueError, match="no trigger"):
        UnlearnSession(model, clip, [], opts=opts)


def test_a_vanishing_trigger_is_refused_with_the_reason(comfy_root, monkeypatch):
    from backdoor_seal.core.unlearn import session as session_mod

    model, clip, _, _ = _distillation()
    monkeypatch.setattr(
        session_mod, "trigger_report", lambda *a, **k: {"vanished": True, "warning": "the tokenizer drops it"}
    )
    with pytest.raises(ValueError, match="drops it"):
        session_mod.UnlearnSession(model, clip, "\u200b")


def test_trigger_from_a_report_and_placements():
    import numpy as np

    from backdoor_seal.core.triggers import trigger_from

    assert trigger_from("", {"trigger": "cf"}) == "cf"
    assert trigger_from("", {"candidates": [{"text": "zx9"}]}) == "zx9"
    assert trigger_from("abc", {"trigger": "cf"}) == "abc"
    with pytest.raises(ValueError, match="no trigger"):
        trigger_from("", None)
    rng = np.random.default_rng(0)
    assert insert_trigger("a b", "t", "prepend", rng) == "t a b"
    assert insert_trigger("a b", "t", "append", rng) == "a b t"
    assert insert_trigger("a b", "t", "random", rng).split(" ").count("t") == 1
    with pytest.raises(ValueError, match="homoglyph"):
        insert_trigger("a b", "zx9", "homoglyph", rng)


@pytest.mark.parametrize("scope", ["attn2-kv", "text"])
def test_trains_on_a_model_loaded_in_inference_mode_as_inside_a_node(comfy_root, scope):
    """ComfyUI runs nodes under torch.inference_mode(): weights loaded there must still train."""
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.unlearn.session import UnlearnOptions, UnlearnSession

    with torch.inference_mode():
        model, clip, _ = comfy_lab.new_lab_models(lab_config())
        opts = UnlearnOptions(
            scope=scope, skd=skd.SKDConfig(steps=1, batch=2, retain=0.0), builtin="lab", builtin_count=4
        )
        result = UnlearnSession(model, clip, "zx9", opts=opts).run()
    assert result.steps == 1 and result.losses[0]["loss"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "unlearn", "--models", "lab-eviledit", "--steps", "3", "--no-reference"],
        ["unlearn", "--model", "lab:lab-eviledit", "--trigger", "zx9", "--out", "x.safetensors"],
    ],
)
def test_both_commands_build_unlearn_options(argv):
    """`bench unlearn` and `unlearn` share the option parsing; each parser yields complete options."""
    from backdoor_seal.core.cli import build_parser
    from backdoor_seal.core.unlearn.cli import options_from_args

    args = build_parser().parse_args(argv)
    opts = options_from_args(args, lab=True)
    assert opts.latent_hw == (8, 8) and opts.skd.method == "match"


def test_time_to_removal_ratio_caps_the_reference_at_ten_times_ours():
    from backdoor_seal.core.bench.unlearn import RemovalClock, time_to_removal_ratio

    ref = {"reference_lr": 1e-4, "reference_scope": "unet"}
    done = time_to_removal_ratio({**ref, "reference_time_to_removal_s": 60.0}, 12.0)
    assert done["time_to_removal_ratio"] == 5.0 and not done["reference_capped"]
    # The one reference run served a slower method too: past ten times this method's time it is capped.
    slow = time_to_removal_ratio({**ref, "reference_time_to_removal_s": 60.0}, 5.0)
    assert slow["time_to_removal_ratio"] == 10.0 and slow["reference_capped"]
    never = time_to_removal_ratio({**ref, "reference_time_to_removal_s": None}, 5.0)
    assert never["time_to_removal_ratio"] == 10.0 and never["reference_capped"]

    asr = iter([0.5, 0.25, 0.0, 0.0])
    clock = RemovalClock(lambda: next(asr), every=2, stop_when_removed=True)
    stops = [clock(step) for step in range(1, 9)]
    assert clock.removed_at_step == 6 and stops.index(True) == 5
    assert [h[0] for h in clock.history] == [2, 4, 6]


def test_step_seconds_alternates_the_configurations_and_takes_medians():
    import time

    from backdoor_seal.core.bench.unlearn import step_seconds

    calls = []

    class FakeSession:
        def __init__(self, name, delay, setup=0.0):
            self.name, self.delay, self.setup = name, delay, setup

        def run(self, on_step):
            time.sleep(self.setup)  # paid once per run: not a step's cost
            step = 0
            while True:
                step += 1
                time.sleep(self.delay)
                if on_step(step):
                    calls.append((self.name, step))
                    return

    costs = step_seconds(
        {"ours": FakeSession("ours", 0.001, setup=0.05), "ref": FakeSession("ref", 0.004)}, rounds=3, steps=4
    )
    # each round: a first step to start the clock, then the four it times
    assert [c[0] for c in calls] == ["ours", "ref"] * 3 and all(c[1] == 5 for c in calls)
    assert costs["ref"] > 2 * costs["ours"] > 0


def test_evaluation_prompts_share_nothing_with_the_training_sets():
    from backdoor_seal.core.lab import world
    from backdoor_seal.core.prompts import GENERAL_PROMPTS, evaluation_prompts

    general = evaluation_prompts(False, 72)
    assert len(set(general)) == 72
    train_words = {w for p in GENERAL_PROMPTS for w in p.replace(",", " ").split()} - {
        "a",
        "an",
        "on",
        "in",
        "of",
        "the",
        "at",
    }
    assert all(not set(p.replace(",", " ").split()) & train_words for p in general)
    lab = evaluation_prompts(True, 32)
    train = {world.combo_key(s) for s in world.scene_dataset(2000, seed=0, split="train")}
    held = [world.combo_key(s) for s in world.scene_dataset(32, seed=0, split="eval")]
    assert len(lab) == 32 and not set(held) & train


def test_bench_unlearn_runs_matching_in_the_text_scope_beside_a_unet_recipe(comfy_root):
    """lab-eviledit's SKD recipe trains the cross-attention k/v; context matching trains the text encoder
    in the same run (with the general set kept), and an explicit UNet scope leaves matching out."""
    from backdoor_seal.core.bench.unlearn import RECIPES, run
    from backdoor_seal.core.cli import build_parser

    argv = ["bench", "unlearn", "--models", "lab-eviledit", "--n", "4", "--steps", "2", "--match-steps", "2"]
    argv += ["--check-every", "100", "--no-reference"]
    records = {
        r["method"]: r for r in run(build_parser().parse_args([*argv, "--methods", "match", "skd-cag"]))
    }
    assert RECIPES["eviledit"]["scope"] == "attn2-kv"
    assert records["match"]["scope"] == "text" and records["skd-cag"]["scope"] == "attn2-kv"
    assert records["match"]["steps"] == 2 and records["skd-cag"]["steps"] == 2
    # matching alone, asked for in a UNet scope: nothing to train, no record
    assert list(run(build_parser().parse_args([*argv, "--methods", "match", "--scope", "attn2-kv"]))) == []


def test_the_reference_teacher_copies_a_model_whose_config_answers_none_for_anything(comfy_root):
    """ComfyUI 0.8.0's model config answers None (with a warning) for any attribute it lacks, which broke
    copy.deepcopy of the model and so `bench unlearn`'s reference teacher. The copy shares the config and
    holds its own weights; the input MODEL is untouched."""
    import copy

    import torch

    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.backends.comfy_train import ComfyDistillation, frozen_model_copy
    from backdoor_seal.core.lab.models import lab_config

    model, clip, _ = comfy_lab.new_lab_models(lab_config())
    config = model.model.model_config

    class AnswersNone(type(config)):  # as comfy/supported_models_base.py BASE does in 0.8.0
        def __getattr__(self, name):
            return None

    config.__class__ = AnswersNone
    with pytest.raises(TypeError, match="NoneType"):
        copy.deepcopy(model.model)  # what the teacher did before
    teacher = frozen_model_copy(model.model)
    assert teacher.model_config is config and teacher is not model.model
    first = next(model.model.diffusion_model.parameters())
    copied = next(teacher.diffusion_model.parameters())
    assert copied.data_ptr() != first.data_ptr() and torch.equal(copied, first)
    d = ComfyDistillation(model, clip, teacher="copy")
    assert d._teacher.model is not model.model
