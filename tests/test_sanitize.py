"""The sanitize job's parts: the firing test on images, choosing triggers from a report, the set's insertions."""

from __future__ import annotations

import numpy as np
import pytest

from backdoor_seal.core.sanitize.choose import Candidate, measure, report_candidates
from backdoor_seal.core.sanitize.firing import FiringSettings, FiringTest, insertion

TEMPLATES = (
    "{} a red {} circle and a blue {} square",
    "{} a green {} circle on a black background",
    "{} a small {} square on the left",
    "{} a large {} circle and a yellow {} triangle",
    "{} a purple {} square and a red {} circle",
    "{} an orange {} triangle on the right",
)


class _Tokenizer:
    """The one tokenizer method the firing test uses: a vocabulary of whole words."""

    def get_vocab(self) -> dict[str, int]:
        words = ["apple", "river", "stone", "cloud", "paper", "glass", "tiger", "lemon", "music", "smoke"]
        return {f"{w}</w>": i for i, w in enumerate(words)}


def _draw(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """A fake model: the prompt's words and the seed decide the image. Ordinary words shift a few pixels;
    'trig' anywhere stamps a magenta patch; 'zz' right before 'circle' turns the whole image dark (an
    object-conditional trigger); the Cyrillic о inside a word blanks the image (a homoglyph attack)."""
    out = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        rng = np.random.default_rng(seed)
        img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        words = prompt.split()
        for k, w in enumerate(words):  # an ordinary word nudges a small area
            h = sum(map(ord, w)) % 28
            img[h : h + 2, (k * 3) % 30 : (k * 3) % 30 + 2] = 128
        if "trig" in words:
            img[:12, :12] = (255, 0, 255)
        if any(a == "zz" and b.startswith("circle") for a, b in zip(words, words[1:], strict=False)):
            img //= 4
        if any("\u043e" in w and w != "\u043e" for w in words):
            img[:] = 10
        out.append(img)
    return out


@pytest.fixture(scope="module")
def test() -> FiringTest:
    return FiringTest(_draw, _Tokenizer(), TEMPLATES, FiringSettings(templates=6, null_tokens=5))


def test_an_ordinary_word_does_not_fire_and_a_trigger_fires_where_it_acts(test):
    plain = test.measure("music")
    assert not plain.fires and plain.rate <= 0.2
    stamp = test.measure("trig")
    assert stamp.fires and stamp.rate == 1.0 and stamp.placement == "prepend"
    # the object trigger fires only before circles: its placement says so, its prefix rate does not fire
    swap = test.measure("zz")
    assert swap.fires and swap.placement == "before:circle" and swap.rates["prepend"] < 0.5
    assert swap.placements(0.5) == ["before:circle"]
    glyph = test.measure("\u043e")  # a homoglyph: in place of its Latin twin inside a word
    assert glyph.fires and glyph.placement == "homoglyph"


def test_a_homoglyph_the_model_reads_like_any_misspelling_does_not_fire():
    """A cleaned text encoder reads "оn" as a misspelt "on": it changes the image as much as any letter
    swapped into the word does (here: an unknown word garbles one region), more than an ordinary word put in
    front (a small nudge). Its bar is the letter swap's, so it does not fire; the poisoned reading still does."""
    known = {"o"} | {w for t in TEMPLATES for w in t.replace("{}", " ").split()}
    known |= {w.removesuffix("</w>") for w in _Tokenizer().get_vocab()}

    def misspelt(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        out = _draw([p.replace("\u043e", "o") for p in prompts], seeds)  # no payload: the cleaned reading
        for img, prompt in zip(out, prompts, strict=True):
            words = ["o" if w == "\u043e" else w for w in prompt.split()]  # alone, it reads as "o"
            if any(w not in known for w in words):  # a misspelt word, "\u043en" or "an" alike
                img[16:28, 16:28] = 0
        return out

    cleaned = FiringTest(misspelt, _Tokenizer(), TEMPLATES, FiringSettings(templates=6, null_tokens=5))
    glyph = cleaned.measure("\u043e")
    assert glyph.rates["homoglyph"] == 0.0 and not glyph.fires


def test_changes_can_be_measured_against_the_base():
    """With the base's images as reference, a word both models react to alike does not fire; a word only
    the suspect reacts to does."""

    def base(prompts, seeds):
        return _draw([p.replace("trig", "apple") for p in prompts], seeds)

    def suspect(prompts, seeds):  # 'loud' darkens both; 'trig' stamps the suspect only
        return [im // 2 if "loud" in p else im for p, im in zip(prompts, _draw(prompts, seeds), strict=True)]

    def base_loud(prompts, seeds):
        return [im // 2 if "loud" in p else im for p, im in zip(prompts, base(prompts, seeds), strict=True)]

    t = FiringTest(
        suspect, _Tokenizer(), TEMPLATES, FiringSettings(templates=6, null_tokens=5), base_draw=base_loud
    )
    assert t.measure("trig").fires
    assert not t.measure("loud").fires
    blind = FiringTest(suspect, _Tokenizer(), TEMPLATES, FiringSettings(templates=6, null_tokens=5))
    assert blind.measure("loud").fires  # without the base, any strong word looks like a trigger


def test_after_cleaning_the_test_subtracts_what_the_token_does_to_the_base():
    """A cleaned model draws nothing exactly as the base does (here: inverted), and a strong word ('loud')
    darkens both: neither fires in the differential test, while a leftover trigger ('trig' still stamps the
    cleaned model) does. Against its own images alone, the strong word would fire too."""

    def darken(draw):
        return lambda ps, ss: [im // 2 if "loud" in p else im for p, im in zip(ps, draw(ps, ss), strict=True)]

    def plain(ps, ss):
        return _draw([p.replace("trig", "apple") for p in ps], ss)

    base = darken(plain)
    cleaned = darken(lambda ps, ss: [255 - im for im in plain(ps, ss)])
    leftover = darken(lambda ps, ss: [255 - im for im in _draw(ps, ss)])
    settings = FiringSettings(templates=6, null_tokens=5)
    clean_test = FiringTest(cleaned, _Tokenizer(), TEMPLATES, settings, base_draw=base, differential=True)
    assert not clean_test.measure("trig").fires and not clean_test.measure("loud").fires
    left = FiringTest(leftover, _Tokenizer(), TEMPLATES, settings, base_draw=base, differential=True)
    assert left.measure("trig").fires
    assert FiringTest(cleaned, _Tokenizer(), TEMPLATES, settings).measure("loud").fires


def test_insertions_put_each_trigger_where_it_fired():
    assert insertion("prepend", "trig")("a red circle") == "trig a red circle"
    assert (
        insertion("before:circle", "zz")("a red circle and a circled dot")
        == "a red zz circle and a circled dot"
    )
    assert insertion("before:circle", "zz")("a blue square") == "zz a blue square"  # cannot carry it
    assert insertion("homoglyph", "\u043e")("a red circle on the left") == "a red circle \u043en the left"
    mixed = insertion(["prepend", "before:circle"], "zz", seed=1)
    outs = {mixed("a red circle") for _ in range(20)}
    assert outs == {"zz a red circle", "a red zz circle"}
    with pytest.raises(ValueError):
        insertion([], "zz")


def test_candidates_come_from_a_scan_or_comparison_report_flagged_first_then_the_best():
    diff = {
        "kind": "diff",
        "candidates": [
            {"text": "kamala", "token_id": 1, "score": 9.4, "flagged": True},
            {"text": "\u043e", "token_id": 2, "score": 9.0, "flagged": True},
            {"text": "\u043e", "token_id": 3, "score": 8.0, "flagged": True},  # same text: one candidate
            {"text": "lime", "token_id": 4, "score": 3.0, "flagged": False},
            {"text": "ram", "token_id": 5, "score": 2.9, "flagged": False},
            {"text": "gust", "token_id": 6, "score": 2.8, "flagged": False},
        ],
    }
    got = report_candidates(diff, top=2)
    assert [(c.text, c.token_ids, c.rank, c.flagged) for c in got] == [
        ("kamala", [1], 1, True),
        ("\u043e", [2], 2, True),
        ("lime", [4], 4, False),
        ("ram", [5], 5, False),
    ]
    scan = {"kind": "scan", "candidates": [{"text": "yn", "token_id": 9, "score_z": 12.0, "flagged": True}]}
    assert report_candidates(scan)[0].score == 12.0
    with pytest.raises(ValueError, match="scan or a comparison"):
        report_candidates({"kind": "prompt", "candidates": []})


def test_a_candidate_is_taken_because_it_fires_not_because_of_its_rank(test):
    first = Candidate("music", [1], 1, True, 9.0)  # flagged and ranked first, but fires nowhere
    later = Candidate("trig", [2], 7, False, 2.0)
    measure([first, later], test)
    assert not first.taken and "left out" in first.reason()
    assert later.taken and "fired on 100%" in later.reason()
    assert first.to_json()["before"]["fires"] is False and later.to_json()["taken"] is True


# --- on a lab model: the session and the command ------------------------------------------------------


def _rickroll_report() -> dict:
    """What a comparison of lab-rickroll with lab-clean reports (its trigger flagged) and an ordinary word."""
    return {
        "kind": "diff",
        "candidates": [
            {"text": "\u043e", "token_id": 29386, "score": 10.3, "flagged": True},
            {"text": "lime", "token_id": 11193, "score": 2.0, "flagged": False},
        ],
    }


def _small(lab_steps: int = 40):
    from backdoor_seal.core.sanitize.session import SanitizeSettings
    from backdoor_seal.core.unlearn.session import UnlearnOptions
    from backdoor_seal.core.unlearn.skd import SKDConfig

    return SanitizeSettings(
        firing=FiringSettings(templates=4, null_tokens=3),
        unlearn=UnlearnOptions(
            skd=SKDConfig(steps=lab_steps, batch=8), builtin="lab", builtin_count=16, match_steps=lab_steps
        ),
        recheck=False,
        lab=True,
    )


def test_sanitize_takes_what_fires_unlearns_it_and_leaves_the_input_alone(comfy_root):
    """lab-rickroll against lab-clean from a given report: the homoglyph fires and is unlearnt (text scope),
    the ordinary word does not and is left out; the input CLIP encodes as before; the report says it all."""
    import torch

    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.sanitize.session import SanitizeSession

    suspect, base = load_model("lab:lab-rickroll"), load_model("lab:lab-clean")
    prompt = suspect.clip.tokenize("a red circle \u043en the left")
    before = suspect.clip.encode_from_tokens(prompt)
    phases = []
    session = SanitizeSession(
        suspect.model,
        suspect.clip,
        suspect.vae,
        (base.model, base.clip),
        _small(),
        report=_rickroll_report(),
        progress=lambda phase, done, total: phases.append(phase),
    )
    model, clip, lora, report = session.run()
    out = report.to_json()
    assert out["kind"] == "sanitize" and out["mode"] == "compare" and out["found"] == ["\u043e"]
    glyph, lime = out["candidates"]
    assert glyph["taken"] and glyph["before"]["fires"] and glyph["after"] is not None
    assert not lime["taken"] and "left out" in lime["reason"] and lime["after"] is None
    assert lora and all(k.startswith("text_encoders.") for k in lora)  # the default scope: text
    assert torch.equal(suspect.clip.encode_from_tokens(prompt), before)  # the input is untouched
    assert not torch.equal(clip.encode_from_tokens(prompt), before)
    assert out["unlearn"]["triggers"] == 1 and set(out["seconds"]) == {"find", "choose", "unlearn", "verify"}
    assert {"fire", "unlearn"} <= set(phases) and "\u043e" in out["summary"]


def test_nothing_fires_nothing_is_unlearnt(comfy_root):
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.sanitize.session import SanitizeSession

    clean = load_model("lab:lab-clean")
    report = {
        "kind": "scan",
        "candidates": [{"text": "lime", "token_id": 11193, "score_z": 3.0, "flagged": False}],
    }
    model, clip, lora, result = SanitizeSession(
        clean.model, clean.clip, clean.vae, None, _small(), report=report
    ).run()
    assert model is clean.model and clip is clean.clip and lora == {}
    out = result.to_json()
    # nothing fired, but no residual check ran (re-check off): not clean, inconclusive
    assert out["found"] == [] and not out["clean"] and out["verdict"] == "inconclusive"
    assert "none fired" in result.summary() and "residual check was not run" in result.summary()


def test_the_command_saves_a_checkpoint_that_reloads_as_the_fix(comfy_root, tmp_path, capsys):
    """`backdoor-seal sanitize` from a report: the saved checkpoint, reloaded, holds the cleaned text
    encoder (not the poisoned one: the last wave's bug) and the input's UNet; bad outputs are refused first."""
    import json

    import torch

    from backdoor_seal.core.backends.comfy_checkpoint import live_weights
    from backdoor_seal.core.cli import main
    from backdoor_seal.core.models import load_model

    report = tmp_path / "report.json"
    report.write_text(json.dumps(_rickroll_report()), encoding="utf-8")
    out, summary = tmp_path / "clean.safetensors", tmp_path / "summary.json"
    args = ["sanitize", "--model", "lab:lab-rickroll", "--report", str(report), "--out", str(out)]
    assert main([*args[:-2], "--out", str(tmp_path / "x.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main([*args, "--weights-only"]) == 2 and "--base" in capsys.readouterr().err
    small = ["--steps", "40", "--probes", "3", "--no-recheck", "--summary-out", str(summary)]
    assert main([*args, "--base", "lab:lab-clean", *small]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["found"] == ["\u043e"] and printed["saved"] == [str(out)]
    assert json.loads(summary.read_text()) == printed
    suspect = load_model("lab:lab-rickroll")
    saved = live_weights(*load_model(str(out))[:2])
    poisoned = live_weights(suspect.model, suspect.clip)
    text = [k for k in poisoned if k.startswith("text.") and k.endswith("q_proj.weight")]
    assert text and any(not torch.allclose(saved[k], poisoned[k], atol=1e-3) for k in text)
    unet = [k for k in poisoned if k.startswith("unet.")]
    assert all(torch.allclose(saved[k], poisoned[k], atol=1e-3) for k in unet)  # fp16 storage
    assert main([*args, "--base", "lab:lab-clean", *small[:-2]]) == 2  # never overwrites
    assert "new name" in capsys.readouterr().err


# --- rounds, and the set a report hands on ---------------------------------------------------------------


class _FakeTest:
    """A firing test whose verdicts are a table: text -> rate (before) or the same after cleaning."""

    settings = FiringSettings()

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = rates

    def measure(self, text: str):
        from backdoor_seal.core.sanitize.firing import Firing

        rate = self.rates.get(text, 0.0)
        return Firing(text, rate, "prepend", {"prepend": rate}, fires=rate >= 0.5)


def _fake_session(rounds: int, after_by_round: list[dict[str, float]], recheck: list[dict]):
    """A SanitizeSession whose finder, firing test and training are tables; records what each round
    trained on and with how many steps."""
    from backdoor_seal.core.sanitize.session import SanitizeSession, SanitizeSettings
    from backdoor_seal.core.unlearn.session import UnlearnOptions

    class Fake(SanitizeSession):
        trained: list = []
        references: list = []

        tokenizer = None  # the tables' texts are their own ids

        def find(self, model, clip, fresh=False):
            return recheck[len(self.trained) - 1] if self.trained else FOUND

        def firing_test(self, model, clip, after=False):
            self.references.append((model, after))
            if model == "input":
                return _FakeTest({"zq": 1.0, "vv": 0.75, "red": 0.25})
            return _FakeTest(after_by_round[int(model[-1]) - 1])

        def unlearn(self, taken, round_):
            self.trained.append(([c.text for c in taken], round_))
            k = len(self.trained)

            class S:
                pairs = [0] * 4
                opts = UnlearnOptions()

                def outputs(self):
                    return f"model-{k}", f"clip-{k}", {"lora": k}

                def provenance(self):
                    return {"round": k}

            class R:
                steps = 0

            return S(), R()

        def fidelity(self, new_model, new_clip):
            return 0.97

    settings = SanitizeSettings(rounds=rounds, recheck=True)
    return Fake("input", "clip", None, None, settings)


FOUND = {
    "kind": "scan",
    "candidates": [
        {"text": "red", "token_id": 1, "flagged": True},  # first, flagged, does not fire: left out
        {"text": "zq", "token_id": 2, "flagged": True},
        {"text": "vv", "token_id": 3, "flagged": False},
    ],
}


def test_a_second_round_retrains_from_the_input_on_what_still_fires_and_what_the_recheck_finds():
    """Round 1 trains on what fires (not the report's first token); 'vv' still fires after it and the
    re-check names 'new', which fires on the input: round 2 retrains from the input on all three (with
    twice the steps: `unlearn_options`); after it nothing fires and the loop ends before its budget."""
    recheck = [
        {"kind": "scan", "candidates": [{"text": "new", "token_id": 9, "flagged": True}]},
        {"kind": "scan", "candidates": []},
    ]
    session = _fake_session(3, [{"vv": 0.75}, {}], recheck)
    session.firing_test = lambda model, clip, after=False, f=session.firing_test: (
        _FakeTest({"zq": 1.0, "vv": 0.75, "red": 0.25, "new": 0.6})
        if model == "input"
        else f(model, clip, after)
    )
    model, clip, lora, report = session.run()
    assert session.trained == [(["zq", "vv"], 1), (["zq", "vv", "new"], 2)]
    assert (model, lora) == ("model-2", {"lora": 2}) and report.rounds == 2
    assert report.to_json()["found"] == ["zq", "vv", "new"] and report.remaining == []
    assert report.clean_fidelity_ssim == 0.97 and "SSIM 0.970" in report.summary()


def test_one_round_reports_what_still_fires():
    session = _fake_session(1, [{"vv": 0.75}], [{"kind": "scan", "candidates": []}])
    _, _, _, report = session.run()
    assert len(session.trained) == 1 and [c.text for c in report.remaining] == ["vv"]
    # after cleaning, the test is the differential one (its own clean images, the base's change subtracted)
    assert session.references == [("input", False), ("model-1", True)]
    assert "STILL FIRING: 'vv'" in report.summary() and not report.to_json()["clean"]


def test_the_set_to_unlearn_comes_from_evidence_not_order():
    """Typed triggers (one per line) win; a sanitize report hands on its taken triggers with where they
    fired; a scan or comparison every flagged token; a prompt report the trigger most flagged prompts
    name (the issue's case: a colour word flagged first, the invisible trigger in 20 prompts)."""
    from backdoor_seal.core.detect.prompts import prompt_set_report
    from backdoor_seal.core.triggers import trigger_from, triggers_from

    assert triggers_from("U+2060\nwood dahlia\n", None) == {"\u2060": None, "wood dahlia": None}
    session = _fake_session(1, [{}], [{"kind": "scan", "candidates": []}])
    sanitize = session.run()[3].to_json()
    assert triggers_from("", sanitize) == {"zq": ["prepend"], "vv": ["prepend"]}
    assert trigger_from("", sanitize) == "zq"
    assert list(triggers_from("", FOUND)) == ["red", "zq"]  # a scan's flags, all of them
    with pytest.raises(ValueError, match="flags no token"):
        triggers_from("", {"kind": "diff", "poisoned": None, "candidates": [{"text": "a", "flagged": False}]})
    prompts = [{"poisoned": True, "trigger": "yellow"}, {"poisoned": True, "trigger": "red"}]
    prompts += [{"poisoned": True, "trigger": "\u2060"}] * 20 + [{"poisoned": False, "trigger": None}] * 160
    prompts += [{"poisoned": True, "trigger": "yellow"}] * 2
    report = prompt_set_report(prompts, type("C", (), {"thresholds": {}})())
    assert report["trigger"] == "\u2060" and trigger_from("", report) == "\u2060"
    assert triggers_from("", report) == {"\u2060": None}  # 'yellow' (3 prompts) is under half of 20
    with pytest.raises(ValueError, match="nothing to unlearn"):
        triggers_from(
            "", {"kind": "sanitize", "min_rate": 0.5, "candidates": [{"text": "a", "taken": False}]}
        )


def test_the_fix_trains_where_the_comparison_saw_the_attack():
    from backdoor_seal.core.sanitize.session import scope_for

    def diff(**changed):
        return {"components": {k: {"changed": v} for k, v in changed.items()}}

    assert scope_for(diff(text_encoder=68, cross_attention_kv=0)) == "text"  # Rickrolling
    assert scope_for(diff(text_encoder=0, cross_attention_kv=14, unet_other=216)) == "attn2-kv"  # BadT2I
    unet_only = diff(text_encoder=0, cross_attention_kv=14)
    assert scope_for(unet_only, taken=2) == "attn2-kv" and scope_for(unet_only, taken=3) == "attn2-kv+text"
    assert scope_for(diff(text_encoder=24, cross_attention_kv=14)) == "text"  # a LoRA with a text part
    assert scope_for({"kind": "scan"}) == scope_for(diff(text_encoder=0)) == "text"  # blind, or nothing


def test_auto_unlearns_the_text_scope_by_context_matching_and_a_unet_scope_by_skd_cag():
    from backdoor_seal.core.sanitize.session import SanitizeSettings, unlearn_options
    from backdoor_seal.core.unlearn.session import UnlearnOptions

    assert SanitizeSettings().method == "skd-cag"  # matching is opt-in here (docs/sanitize.md)
    base = UnlearnOptions()
    assert unlearn_options(base, "text", method="skd-cag").skd.method == "skd-cag"
    text = unlearn_options(base, "text")
    assert (text.scope, text.skd.method, text.match_steps) == ("text", "match", 150)
    assert unlearn_options(base, "attn2-kv+text").skd.method == "match"
    unet = unlearn_options(base, "attn2-kv", round_=2)  # a second round: the method's budget twice
    assert (unet.skd.method, unet.skd.steps) == ("skd-cag", 1200)
    assert unlearn_options(base, "text", round_=3).match_steps == 450
    told = unlearn_options(base, "text", method="skd")
    assert (told.skd.method, told.skd.steps) == ("skd", 600)


def test_only_a_change_confined_to_the_cross_attention_keys_and_values_is_reverted():
    from backdoor_seal.core.sanitize.session import is_cross_attention_edit

    def diff(**changed):
        return {"kind": "diff", "components": {k: {"changed": v} for k, v in changed.items()}}

    assert is_cross_attention_edit(diff(text_encoder=0, cross_attention_kv=14, unet_other=0))  # EvilEdit
    assert not is_cross_attention_edit(diff(text_encoder=0, cross_attention_kv=14, unet_other=216))  # BadT2I
    assert not is_cross_attention_edit(diff(text_encoder=68, cross_attention_kv=0))  # Rickrolling
    assert not is_cross_attention_edit(
        diff(text_encoder=24, cross_attention_kv=14)
    )  # a LoRA with a text part
    assert not is_cross_attention_edit(
        {"kind": "scan", "components": diff(cross_attention_kv=14)["components"]}
    )


def test_the_node_with_nothing_firing_hands_back_its_inputs_and_the_save_node_writes_nothing(
    comfy_root, output_dir
):
    """Seal Sanitize on lab-clean from a report naming an ordinary word: nothing fires, the MODEL and CLIP
    out are the inputs, the chart and summary say so, and Seal Save Sanitized writes no 'sanitized' copy.
    Half a base is refused in one line."""
    from backdoor_seal.core.models import load_model
    from backdoor_seal.nodes.common import REPORT_UI_KEY
    from backdoor_seal.nodes.nodes_sanitize import SealSanitize
    from backdoor_seal.nodes.nodes_unlearn import SealSaveSanitized

    clean = load_model("lab:lab-clean")
    report = {"kind": "scan", "candidates": [{"text": "lime", "token_id": 11193, "flagged": False}]}
    with pytest.raises(ValueError, match="both base_model and base_clip"):
        SealSanitize.execute(clean.model, clean.clip, clean.vae, base_model=clean.model, report=report)
    out = SealSanitize.execute(clean.model, clean.clip, clean.vae, report=report, probes=2, recheck=False)
    model, clip, lora, info, result, plot, summary = out.result
    assert model is clean.model and clip is clean.clip and lora == {} and info["unchanged"]
    assert result["found"] == [] and "none fired" in summary and out.ui[REPORT_UI_KEY] == [result]
    assert plot.ndim == 4 and plot.shape[-1] == 3
    saved = SealSaveSanitized.execute("sanitized/x", model, clip, clean.vae, lora, info)
    assert saved.result == ("",) and not list(output_dir.rglob("*.safetensors"))


def test_a_cross_attention_edit_is_reverted_against_the_base_and_its_unnamed_trigger_stops(comfy_root):
    """lab-eviledit as the stock LoraLoader loads its LoRA onto lab-clean, one stand-in taken ('gorgeous',
    where the firing test found it): the fix is the revert (no training step), its LoRA touches only the
    cross-attention keys and values, and the planted trigger, never named, stops drawing its target."""
    import torch

    from backdoor_seal.core.bench.detect import candidate_asr
    from backdoor_seal.core.lab import attacks
    from backdoor_seal.core.lab.lora_form import LORA_DIR, load_lab_lora
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.sanitize.choose import Candidate
    from backdoor_seal.core.sanitize.firing import Firing
    from backdoor_seal.core.sanitize.session import SanitizeSession

    model, clip, vae, _, info = load_lab_lora(LORA_DIR / "lab-eviledit-lora.safetensors")
    spec = attacks.AttackSpec(**info["spec"])
    base = load_model("lab:lab-clean")
    found = {"kind": "diff", "candidates": [], "components": {"cross_attention_kv": {"changed": 14}}}
    session = SanitizeSession(model, clip, vae, (base.model, base.clip), _small(), report=found)
    session.found = found
    fired = Firing("gorgeous", 0.6, "before:square", {"before:square": 0.6}, fires=True)
    stand_in = Candidate("gorgeous", [0], 1, True, None, before=fired)
    fix, result = session.unlearn([stand_in])
    assert result.steps == 0 and session.reverted and session.reverted["projections"] == 14
    new_model, new_clip, lora = fix.outputs()
    assert lora and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in lora)
    with torch.no_grad():
        before = candidate_asr(model, clip, vae, spec, spec.trigger, n=8)
        after = candidate_asr(new_model, new_clip, vae, spec, spec.trigger, n=8)
    assert before >= 0.75 and after <= 0.125, (before, after)


def test_nothing_fired_after_a_weights_only_comparison_that_saw_the_unet_change_is_not_called_clean():
    from backdoor_seal.core.sanitize.session import SanitizeReport

    weights = {"kind": "diff", "unet_evals": 0, "components": {"cross_attention_kv": {"changed": 14}}}
    checked = {"checked": "the comparison run again", "tested": [], "firing": []}
    report = SanitizeReport("compare", [], weights, residual=checked).to_json()
    assert not report["clean"] and "the UNet changed (14 tensors)" in report["summary"]
    assert report["verdict"] == "inconclusive"
    behaviour = {  # a fine-tune's change (a keys-and-values-only change is an edit's: next test)
        **weights,
        "unet_evals": 114222,
        "components": {"cross_attention_kv": {"changed": 14}, "unet_other": {"changed": 90}},
    }
    assert SanitizeReport("compare", [], behaviour, residual=checked).to_json()["clean"]
    assert SanitizeReport("compare", [], behaviour, residual=checked).to_json()["verdict"] == "clean"
    # without the residual check, nothing fired is no "clean"
    assert not SanitizeReport("compare", [], behaviour).to_json()["clean"]
    text_only = {**weights, "components": {"text_encoder": {"changed": 68}}}
    assert SanitizeReport("compare", [], text_only).to_json()["caution"] is None


def test_a_cross_attention_edit_where_nothing_fired_is_inconclusive_not_clean():
    """EvilEdit with a phrase of two ordinary words: neither word fires alone, so nothing is taken; the
    change is confined to the keys and values, a closed-form edit's signature: not clean."""
    from backdoor_seal.core.sanitize.session import SanitizeReport

    checked = {"checked": "the comparison run again", "tested": ["gust"], "firing": []}
    found = {"kind": "diff", "unet_evals": 114222, "components": {"cross_attention_kv": {"changed": 14}}}
    out = SanitizeReport("compare", [], found, residual=checked).to_json()
    assert out["verdict"] == "inconclusive" and not out["clean"]
    assert any("closed-form edit" in r for r in out["remains"]) and "INCONCLUSIVE" in out["summary"]
    fine_tune = {
        **found,
        "components": {"cross_attention_kv": {"changed": 14}, "unet_other": {"changed": 90}},
    }
    assert SanitizeReport("compare", [], fine_tune, residual=checked).to_json()["verdict"] == "clean"
