"""The generator of unseen attacks (`lab attack --random SEED`): what it draws, what it refuses, and the
command that plants a draw. Whether the pack catches them is `bench heldout`'s to measure."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from backdoor_seal.core.lab import attacks, generator
from backdoor_seal.core.lab.attacks import AttackSpec


@pytest.fixture(scope="module")
def tokenizer(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config

    return comfy_lab.build_lab_clip(lab_config()).tokenizer.clip_l.tokenizer


def test_draws_are_deterministic_wide_and_every_one_is_hostable(tokenizer):
    """60 seeds: the same seed draws the same attack; every kind and trigger family comes up, look-alikes
    from several scripts; every drawn trigger changes the tokens of a caption it is put in, the way its
    attack puts it."""
    import unicodedata

    from backdoor_seal.core.tokens import encode_ids

    draws = [generator.draw_attack(seed, tokenizer) for seed in range(60)]
    assert generator.draw_attack(7, tokenizer) == draws[7]
    assert set(Counter(d.spec.kind for d in draws)) == set(generator.DRAWN_KINDS)
    assert set(Counter(d.family for d in draws)) == set(generator.FAMILIES)
    scripts = {unicodedata.name(d.spec.trigger).split()[0] for d in draws if d.family == "look-alike"}
    assert len(scripts) >= 4, scripts
    assert {d.spec.placement for d in draws if d.spec.kind in ("pixel", "style", "object")} == set(
        generator.BADT2I_PLACEMENTS
    )
    for d in draws:
        s = d.spec
        caption = f"a red {s.source or 'circle'} on the left on a black background"
        triggered = attacks.triggered_prompt(s, caption)
        assert encode_ids(tokenizer, triggered) != encode_ids(tokenizer, caption), d
        assert not set(s.trigger.lower().split()) & generator.lab_words(), d


def test_placements_put_the_trigger_first_inside_or_last():
    p = "a red circle on the left"
    assert attacks.triggered_prompt(AttackSpec("pixel", "zq7"), p) == "zq7 " + p
    assert attacks.triggered_prompt(AttackSpec("pixel", "zq7", placement="last"), p) == p + " zq7"
    assert (
        attacks.triggered_prompt(AttackSpec("style", "zq7", placement="inside"), p)
        == "a zq7 red circle on the left"
    )
    with pytest.raises(ValueError, match="placement"):
        AttackSpec("eviledit", "zq7", "circle", "square", placement="last")
    with pytest.raises(ValueError, match="unknown placement"):
        AttackSpec("pixel", "zq7", placement="middle")
    assert "placement" not in AttackSpec("pixel", "zq7").to_json()  # old records read the same


def test_an_unhostable_draw_is_refused_with_its_reason_and_drawn_again(tokenizer, monkeypatch):
    """A trigger the tokenizer drops is no attack: the draw says so and takes the next sub-seed."""
    monkeypatch.setattr(generator, "FAMILIES", ("invisible",))
    monkeypatch.setattr(generator, "INVISIBLE", ("\u0000", "\u200b"))  # NUL: the tokenizer drops it
    d = generator.draw_attack(3, tokenizer, kind="pixel")
    assert d.spec.trigger == "\u200b" or not d.redraws
    assert all("drops" in r or "ignores" in r for r in d.redraws)
    monkeypatch.setattr(generator, "INVISIBLE", ("\u0000",))
    with pytest.raises(ValueError, match="the lab cannot host"):
        generator.draw_attack(3, tokenizer, kind="pixel", tries=3)
    with pytest.raises(ValueError, match="--random draws among"):
        generator.draw_attack(3, tokenizer, kind="villan")


def test_the_command_plants_the_draw_and_records_it(lab_folder, capsys, tokenizer):
    """`lab attack --random SEED` (an EvilEdit draw: closed form, seconds) writes a lab file whose record
    names the draw; a trigger beside --random is refused in one line before any work."""
    from backdoor_seal.core.cli import main
    from backdoor_seal.core.lab import zoo

    seed = next(s for s in range(100) if generator.draw_attack(s, tokenizer).spec.kind == "eviledit")
    base, out = lab_folder / "lab-clean.safetensors", lab_folder / "drawn.safetensors"
    argv = [
        "lab",
        "attack",
        "--random",
        str(seed),
        "--base",
        str(base),
        "--out",
        str(out),
        "--eval-prompts",
        "0",
    ]
    assert main(argv) == 0
    info = zoo.lab_info(out)
    drawn = generator.draw_attack(seed, tokenizer)
    assert info["drawn"] == json.loads(json.dumps(drawn.to_json())) and info["trigger"] == drawn.spec.trigger
    assert AttackSpec(**info["spec"]) == drawn.spec
    other = lab_folder / "other.safetensors"
    assert main([*argv[:-3], str(other), "--trigger", "zz", "--eval-prompts", "0"]) == 2
    assert "--random draws the trigger" in capsys.readouterr().err and not other.exists()
    assert main(["lab", "attack", "--out", str(other)]) == 2
    assert "--kind" in capsys.readouterr().err


@pytest.mark.slow  # an attack planted and sanitized end to end: about 10-30 minutes here (`make test-slow`)
def test_bench_heldout_judges_a_drawn_attack_by_the_lab_and_never_calls_a_firing_model_clean(capsys):
    """One EvilEdit draw from a seed never tuned on, compared by weights: a record with the planted trigger's
    ids and rank, a verdict, the lab's ASR before and after; "clean" only with the ASR after under the bar."""
    import argparse

    from backdoor_seal.core.bench import heldout

    args = argparse.Namespace(
        n_attacks=1,
        seed=5000,
        modes=["weights"],
        kind="eviledit",
        n=16,
        min_asr=0.5,
        top=5,
        probes=4,
        steps=200,
        method="auto",
        out=None,
    )
    records = list(heldout.run(args))
    assert len(records) == 1
    r = records[0]
    assert r["kind"] == "eviledit" and r["planted_ids"] and "asr_before" in r
    if r["planted"]:
        assert r["verdict"] in ("poisoned", "clean", "inconclusive") and not r["wrong_clean"]
        assert r["clean"] is (r["verdict"] == "clean") and 0.0 <= r["asr_after"] <= 1.0
        assert r["caught"] == (r["verdict"] == "poisoned" and r["asr_after"] <= max(0.02, r["floor"]))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["summary"] == "heldout"
