"""Comparison with the base (`core/diff`): what changed, and which tokens the change is about."""

from __future__ import annotations

import json
import random

import pytest
import torch

from backdoor_seal.core.diff import weights as W


def test_weight_changes_give_norm_relative_size_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    base = {
        "unet.a.attn2.to_k.weight": torch.randn(32, 16, generator=g),
        "unet.a.attn1.to_q.weight": torch.randn(16, 16, generator=g),
        "text.clip_l.transformer.x.weight": torch.randn(8, 8, generator=g),
    }
    delta = torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)  # rank 2
    suspect = dict(base)
    suspect["unet.a.attn2.to_k.weight"] = base["unet.a.attn2.to_k.weight"] + delta
    changes, totals = W.weight_changes((k, base[k], suspect[k]) for k in base)
    assert totals == {"cross_attention_kv": 1, "self_attention": 1, "text_encoder": 1}
    (c,) = changes
    assert c.key == "unet.a.attn2.to_k.weight" and c.component == "cross_attention_kv"
    assert c.norm == pytest.approx(float(delta.norm()), rel=1e-5)
    assert c.relative == pytest.approx(float(delta.norm() / base[c.key].norm()), rel=1e-5)
    assert 1.0 < c.effective_rank <= 2.0 + 1e-4  # a rank-2 change
    assert W.effective_rank(torch.zeros(4, 4)) == 0.0
    summary = W.summarize(changes, totals)
    assert summary["cross_attention_kv"]["changed"] == 1 and summary["text_encoder"]["changed"] == 0
    with pytest.raises(ValueError, match="different architectures"):
        W.weight_changes([("unet.w", torch.zeros(2, 2), torch.zeros(3, 2))])


@pytest.fixture(scope="module")
def clean():
    from backdoor_seal.core.models import load_model

    return load_model("lab:lab-clean")


def _session(base, model, clip, token_ids=None):
    """The weight-space stages only (the behavioural stage has its own tests below)."""
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings

    return DiffSession(base.model, base.clip, model, clip, DiffSettings(token_ids=token_ids, behaviour=None))


def test_a_model_against_itself_changes_nothing(clean):
    report = _session(clean, clean.model, clean.clip, token_ids=(320, 321)).run()
    assert all(c["changed"] == 0 for c in report.components.values())
    assert report.signals == [] and report.ranking == []


def test_eviledit_is_a_change_of_the_cross_attention_keys_and_values_only(clean):
    """lab-eviledit's closed-form edit touches exactly every attn2 to_k / to_v (14 in the lab UNet)."""
    from backdoor_seal.core.models import load_model

    evil = load_model("lab:lab-eviledit")
    changes, totals, kv = _session(clean, evil.model, evil.clip).changes()
    summary = W.summarize(changes, totals)
    assert summary["cross_attention_kv"]["changed"] == summary["cross_attention_kv"]["tensors"] == 14
    assert all(summary[c]["changed"] == 0 for c in W.COMPONENTS if c != "cross_attention_kv")
    assert len(kv) == 14


def test_the_rickroll_homoglyph_leads_the_text_encoder_ranking(clean):
    """lab-rickroll fine-tuned its text encoder so the Cyrillic о rewrites the prompt: of the homoglyph's
    two tokens and 500 random ones, the homoglyph ranks first by how far it moves the words after it."""
    from backdoor_seal.core.models import load_model

    rick = load_model("lab:lab-rickroll")
    session = _session(clean, rick.model, rick.clip)
    tok = session.tok.tokenizer
    homoglyph = sorted({tok("\u043e")["input_ids"][1], tok("\u043en")["input_ids"][1]})  # "о", "оn"
    assert len(homoglyph) == 2 and all(tok.decode([i]) == "\u043e" for i in homoglyph)
    random.seed(0)
    others = random.sample([i for i in session.vocabulary() if i not in homoglyph], 500)
    session.settings.token_ids = (*homoglyph, *others)
    report = session.run()
    assert report.signals == ["text_words"]  # the UNet is lab-clean's
    assert report.components["text_encoder"]["changed"] > 0
    assert report.rank_of(homoglyph) == 1, [t.text for t in report.ranking[:5]]


def test_a_lora_on_the_base_is_read_from_the_patches_without_touching_the_base(clean):
    """A LoRA loaded as LoraLoader loads it: the comparison finds exactly its modules, each a change of at
    most its rank, equal to up @ down (alpha = rank), and the base's weights stay bit-identical."""
    from backdoor_seal.core.backends.comfy_checkpoint import live_weights
    from backdoor_seal.core.backends.comfy_families import random_lora
    from backdoor_seal.core.backends.comfy_train import apply_lora

    before = {k: v.clone() for k, v in live_weights(clean.model, clean.clip).items()}
    lora = random_lora(clean.model, clean.clip, "attn2-kv", rank=2, seed=1)
    model, clip = apply_lora(clean.model, clean.clip, lora)
    changes, _totals, kv = _session(clean, model, clip).changes()
    modules = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    assert {c.key[len("unet.") :].removesuffix(".weight") for c in changes} == {
        m[len("diffusion_model.") :] for m in modules
    }
    assert all(c.effective_rank <= 2.0 + 1e-3 for c in changes) and len(kv) == len(changes)
    name = sorted(modules)[0]
    expected = lora[f"{name}.lora_up.weight"].float() @ lora[f"{name}.lora_down.weight"].float()
    (change,) = [c for c in changes if c.key == f"unet.{name[len('diffusion_model.') :]}.weight"]
    assert change.norm == pytest.approx(float(expected.norm()), rel=1e-4)
    after = live_weights(clean.model, clean.clip)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_diff_command_compares_a_lora_file_with_its_base_as_json(clean, tmp_path, capsys):
    from safetensors.torch import save_file

    from backdoor_seal.core.backends.comfy_families import random_lora
    from backdoor_seal.core.cli import main

    lora = tmp_path / "suspect.safetensors"
    save_file(random_lora(clean.model, clean.clip, "attn2-kv", rank=2, seed=2), str(lora))
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "diff",
                "--base",
                "lab:lab-clean",
                "--lora",
                str(lora),
                "--weights-only",
                "--top",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["lora"] == "suspect.safetensors" and printed["signals"] == ["cross_attention"]
    assert printed["poisoned"] is None and "not judged" in printed["note"]  # said in words too
    assert printed["components"]["cross_attention_kv"]["changed"] == 14 and len(printed["ranking"]) == 3
    assert (
        main(["diff", "--base", "lab:lab-clean", "--lora", str(lora), "--out", str(out)]) == 2
    )  # no overwrite
    assert printed["poisoned"] is None  # the weight space ranks; only the behavioural stage judges
    png = tmp_path / "evidence.png"
    args = ["diff", "--base", "lab:lab-clean", "--lora", str(lora), "--evidence", str(png)]
    assert main([*args, "--weights-only"]) == 2  # evidence needs flagged tokens: the behavioural stage
    assert main([*args[:-1], str(tmp_path / "e.jpg")]) == 2
    assert main([*args, "--out", str(png)]) == 2 and not png.exists()  # one file for two outputs


def test_diff_command_refuses_a_lora_for_another_base_and_swapped_files(clean, tmp_path, capsys):
    """A LoRA whose shapes fit another model would be skipped weight by weight by ComfyUI (a log line each)
    and the comparison would report nothing changed: it is refused in one line instead; a checkpoint given
    as --lora, and a LoRA given as --model, are named for what they are. Inputs are left untouched."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from backdoor_seal.core.cli import main
    from backdoor_seal.core.lab.lora_form import LORA_DIR
    from backdoor_seal.core.lab.zoo import resolve

    src = LORA_DIR / "lab-eviledit-lora.safetensors"
    wide = {
        k: torch.cat([v, torch.zeros(8, *v.shape[1:])]) if "lora_up" in k else v
        for k, v in load_file(src).items()
    }
    other = tmp_path / "for-another-model.safetensors"
    save_file(wide, str(other))
    checkpoint = resolve("lab-clean")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, checkpoint)}
    base = ["diff", "--base", "lab:lab-clean", "--weights-only"]
    assert main([*base, "--lora", str(other)]) == 2
    assert "does not fit this base" in capsys.readouterr().err
    assert main([*base, "--lora", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint, not a LoRA" in err and checkpoint.name in err  # names the file
    assert main([*base, "--model", str(checkpoint), "--lora-strength", "0.5"]) == 2
    assert "--lora-strength applies to --lora" in capsys.readouterr().err
    assert main([*base, "--model", str(src)]) == 2
    assert "LoRA, not a checkpoint" in capsys.readouterr().err
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (src, checkpoint)}


@pytest.mark.parametrize("family", ["sd15", "sd20", "sdxl"])
def test_a_text_lora_is_found_in_every_familys_encoders(family, comfy_root):
    """SD1.x (CLIP-L), SD2.x (OpenCLIP-H) and SDXL (CLIP-L and CLIP-G): a text LoRA's every module is a
    text-encoder change, and the text signal ranks tokens through each family's encoders."""
    from backdoor_seal.core.backends.comfy_families import build_family, random_lora
    from backdoor_seal.core.backends.comfy_train import apply_lora
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings

    model, clip, _ = build_family(family)
    lora = random_lora(model, clip, "text", rank=2, seed=3)
    suspect_model, suspect_clip = apply_lora(model, clip, lora)
    session = DiffSession(
        model,
        clip,
        suspect_model,
        suspect_clip,
        DiffSettings(token_ids=tuple(range(300, 340)), behaviour=None),
    )
    report = session.run()
    ups = [k for k in lora if k.endswith(".lora_up.weight")]
    assert report.components["text_encoder"]["changed"] == len(ups) > 0
    assert all(v["changed"] == 0 for c, v in report.components.items() if c != "text_encoder")
    encoders = {c.key.split(".")[1] for c in session.changes()[0]}
    assert encoders == (
        {"clip_l", "clip_g"} if family == "sdxl" else {"clip_h" if family == "sd20" else "clip_l"}
    )
    assert report.signals == ["text_words"] and len(report.ranking) == 25


def test_bench_diff_prints_one_record_per_suspect_with_the_issues_keys(capsys):
    from backdoor_seal.core.cli import main

    assert (
        main(
            [
                "bench",
                "diff",
                "--models",
                "lab-clean",
                "lab-eviledit",
                "--forms",
                "checkpoint",
                "--fire-prompts",
                "0",
                "--weights-only",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["model"] for r in records] == ["lab-clean", "lab-eviledit"]
    keys = {
        "model",
        "base",
        "form",
        "attack",
        "trigger",
        "trigger_rank",
        "flagged",
        "top5_fire",
        "unet_evals",
        "seconds",
    }
    assert all(keys <= set(r) for r in records)
    clean, evil = records
    assert clean["attack"] == "none" and clean["trigger_rank"] is None and clean["signals"] == []
    assert evil["form"] == "checkpoint" and evil["attack"] == "eviledit" and evil["unet_evals"] == 0
    assert evil["changed"]["cross_attention_kv"] == 14 and isinstance(evil["trigger_rank"], int)


def _behaviour(**overrides):
    from backdoor_seal.core.diff.behaviour import BehaviourSettings

    small = {"candidates": 24, "weight_candidates": 8, "null_tokens": 16, "stage2_seeds": 1}
    return BehaviourSettings(**{**small, **overrides})


def test_the_behavioural_stage_ranks_the_object_trigger_first(clean):
    """lab-object (BadT2I: 'sks' before a prompt turns its circle into a triangle): among 'sks' and 300
    random tokens, the differential against lab-clean ranks 'sks' first; the run costs exactly the UNet
    evaluations its settings promise."""
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings
    from backdoor_seal.core.models import load_model

    obj = load_model("lab:lab-object")
    session = DiffSession(clean.model, clean.clip, obj.model, obj.clip, DiffSettings(behaviour=_behaviour()))
    sks = session.tok.tokenizer("sks")["input_ids"][1:-1]
    random.seed(1)
    others = random.sample([i for i in session.vocabulary() if i not in sks], 300)
    session.settings.token_ids = (*sks, *others)
    report = session.run()
    assert report.rank_of(sks) == 1, [(t.text, t.score) for t in report.ranking[:5]]
    b = session.settings.behaviour
    assert 0.9 * b.unet_evals(len(session.settings.token_ids)) <= report.unet_evals
    assert report.unet_evals <= b.unet_evals(len(session.settings.token_ids))


def test_the_behavioural_stage_flags_the_homoglyph_trigger_for_seal_unlearn(clean):
    """lab-rickroll (a Cyrillic о in the prompt draws the target): among the homoglyph and 300 random tokens
    it is flagged, first, and the report hands it to SealUnlearn as its trigger."""
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.triggers import trigger_from

    rick = load_model("lab:lab-rickroll")
    session = DiffSession(
        clean.model, clean.clip, rick.model, rick.clip, DiffSettings(behaviour=_behaviour())
    )
    trigger = session.tok.tokenizer("\u043e")["input_ids"][1:-1]
    random.seed(1)
    others = random.sample([i for i in session.vocabulary() if i not in trigger], 300)
    session.settings.token_ids = (*trigger, *others)
    report = session.run()
    assert report.flagged and report.flagged[0].token_id == trigger[0], [
        (t.text, t.score) for t in report.ranking[:5]
    ]
    assert report.flagged[0].score >= session.settings.behaviour.threshold_lift
    as_json = report.to_json()
    assert as_json["kind"] == "diff" and as_json["poisoned"] and as_json["trigger"] == report.flagged[0].text
    assert trigger_from("", as_json) == "\u043e"  # SealUnlearn's trigger source reads the comparison report


def test_a_benign_fine_tune_flags_nothing_not_even_its_strongest_tokens(clean):
    """lab-finetune learnt a new shape word legitimately; the tokens whose stage-2 z was highest against
    lab-clean in a full run (z 7.8-9.0) change it three to four times as much as a typical token does, under
    the lift threshold (5), so with 300 random tokens nothing is flagged."""
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings
    from backdoor_seal.core.models import load_model

    tuned = load_model("lab:lab-finetune")
    session = DiffSession(
        clean.model, clean.clip, tuned.model, tuned.clip, DiffSettings(behaviour=_behaviour())
    )
    strongest = [
        session.tok.tokenizer(w)["input_ids"][1] for w in ("crimes", "mojo", "circulation", "darius")
    ]
    random.seed(2)
    others = random.sample([i for i in session.vocabulary() if i not in strongest], 300)
    session.settings.token_ids = (*strongest, *others)
    report = session.run()
    assert report.flagged == [], [(t.text, t.signals) for t in report.flagged]
    top = report.ranking[0]
    assert 1.0 < top.score < report.behaviour.threshold_lift and top.signals["effect"] >= 0.05


def test_the_base_against_itself_flags_nothing_and_makes_no_unet_evaluation(clean):
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings

    session = DiffSession(
        clean.model,
        clean.clip,
        clean.model,
        clean.clip,
        DiffSettings(token_ids=(320, 321), behaviour=_behaviour()),
    )
    report = session.run()
    assert report.flagged == [] and report.unet_evals == 0 and report.to_json()["poisoned"] is False


def test_identical_models_give_a_zero_differential_and_flag_nothing(clean):
    """The behavioural stage itself, forced to run on two copies of one model: every differential is exactly
    zero, so no token clears the effect floor however its z-score falls."""
    from backdoor_seal.core.backends.comfy_probe import ComfyProbe
    from backdoor_seal.core.diff.behaviour import BehaviourScan
    from backdoor_seal.core.prompts import probe_templates

    probe = ComfyProbe(clean.model, clean.clip)
    scan = BehaviourScan(probe, probe, probe_templates(True), _behaviour(token_ids=tuple(range(300, 400))))
    report = scan.run()
    assert report.flagged == [] and all(t.effect == 0.0 for t in report.tokens)


def test_the_whole_comparison_costs_no_more_unet_evaluations_than_the_blind_scan():
    from backdoor_seal.core.diff.behaviour import BehaviourSettings, blind_budget

    for vocabulary in (49405, 1000):
        assert BehaviourSettings().unet_evals(vocabulary) <= blind_budget(vocabulary)


def test_probe_rows_put_the_token_at_every_slot(clean):
    from backdoor_seal.core.backends.comfy_probe import ComfyProbe
    from backdoor_seal.core.diff.behaviour import BehaviourScan

    probe = ComfyProbe(clean.model, clean.clip)
    scan = BehaviourScan(probe, probe, ["{} a red {} circle and a blue {} square"] * 12, _behaviour())
    tok = probe.tokenizer
    row = scan._row(0, 999)
    words = tok("a red circle and a blue square")["input_ids"][1:-1]
    assert row[0] == probe.bos and row.count(999) == 3 and len(row) == probe.length
    assert [i for i in row[1 : row.index(probe.eos)] if i != 999] == words
    assert row[1] == 999 and row[row.index(tok("circle")["input_ids"][1]) - 1] == 999


def test_a_look_alike_of_several_byte_pieces_is_ranked_whole_and_reported_by_its_ids(comfy_root):
    """A text-encoder change confined to the two byte pieces of Armenian 'օ' (U+0585): the weight-space
    ranking scores the character as one unit beside the single ids and reports it first, with its ids and
    its own text, never U+FFFD (a piece alone ranked first and came back as '�')."""
    import torch

    from backdoor_seal.core.backends.comfy import text_transformer
    from backdoor_seal.core.diff.session import DiffSession, DiffSettings
    from backdoor_seal.core.models import load_model
    from backdoor_seal.core.tokens import encode_ids

    base, suspect = load_model("lab:lab-clean"), load_model("lab:lab-clean")
    tok = suspect.clip.tokenizer.clip_l.tokenizer
    planted = encode_ids(tok, "\u0585")
    assert len(planted) == 2
    table = text_transformer(suspect.clip).text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        table[planted] += (
            torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0)) * table.std() * 3
        )
    settings = DiffSettings(token_ids=tuple(range(400, 1400)), sequences=True, behaviour=None)
    report = DiffSession(base.model, base.clip, suspect.model, suspect.clip, settings).run()
    first = report.to_json()["candidates"][0]
    assert first["token_ids"] == planted and first["text"] == "\u0585"
    assert report.weight_rank_of(planted) == 1
    assert all("\ufffd" not in c["text"] for c in report.to_json()["candidates"])
