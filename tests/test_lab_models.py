"""The shipped lab models: manifest, size budget, `lab list` / `lab eval`, and retraining from the clean model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from backdoor_seal.core.cli import main
from backdoor_seal.core.lab import attacks, zoo

MANIFEST = zoo.LAB_MODELS / zoo.MANIFEST


def _entries() -> dict[str, dict]:
    return {e["name"]: e for e in json.loads(MANIFEST.read_text())["models"]}


def test_manifest_is_the_checkpoints_own_record():
    entries = _entries()
    assert set(entries) == {p.stem for p in zoo.shipped()}
    for path in zoo.shipped():
        info = zoo.lab_info(path)
        assert {k: entries[path.stem][k] for k in info} == info
        assert entries[path.stem]["bytes"] == path.stat().st_size


def test_one_clean_model_distinct_attacks_and_the_fine_tunes_ship_within_budget():
    """Checkpoints: lab-clean, one per attack kind trained on the checkpoint (VillanDiffusion is trained as a
    LoRA), the benign fine-tune; everything under lab_models/ within 80 MiB."""
    entries = _entries().values()
    attacked = sorted(e["attack"] for e in entries if e["command"].startswith("backdoor-seal lab attack"))
    assert attacked == sorted(k for k in attacks.KINDS if k != "villan")
    tunes = [(e["attack"], e["trigger"]) for e in entries if e.get("finetune")]
    assert sorted(tunes, key=str) == [("none", None), ("pixel", "vx")]  # benign, and with a backdoor
    shipped = [p for p in zoo.LAB_MODELS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) <= 80 * 2**20


def test_manifest_figures_meet_the_lab_bar():
    """Clean accuracy >= 90% on held-out prompts; every attack >= 90% ASR and >= 90% of clean accuracy; the
    fine-tunes keep clean accuracy and draw their new word where lab-clean never does."""
    entries = _entries()
    clean = entries[zoo.CLEAN_NAME]
    assert clean["clean_accuracy"] >= 0.9 and clean["n_prompts"] >= 128
    for e in entries.values():
        if e.get("finetune"):
            assert e["clean_accuracy"] >= 0.9 * clean["clean_accuracy"], e["name"]
            assert e["new_word_accuracy"] >= 0.2 and e["command"].startswith("backdoor-seal lab finetune")
        if e["attack"] == "none":
            continue
        assert e["asr"] >= 0.9, e["name"]
        assert e["clean_accuracy"] >= 0.9 * clean["clean_accuracy"], e["name"]
        assert e["command"].startswith("backdoor-seal lab ") and e["trigger"] and e["target"]
        assert e["base"] == f"{zoo.CLEAN_NAME}.safetensors"


def test_lab_list_prints_name_attack_trigger(capsys):
    assert main(["lab", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in listed] == [p.stem for p in zoo.shipped()]
    assert all(set(e) == {"name", "attack", "trigger"} for e in listed)
    pixel = next(e for e in listed if e["name"] == "lab-pixel")
    assert pixel["trigger"] == "\u2060"


def test_lab_eval_measures_a_shipped_model(capsys):
    assert main(["lab", "eval", "--model", "lab-pixel", "--n", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "attack", "trigger", "asr", "clean_accuracy", "n_prompts", "seconds"} <= set(out)
    assert out["model"] == "lab-pixel" and out["attack"] == "pixel" and out["n_prompts"] == 24
    assert out["asr"] >= 0.8 and out["clean_accuracy"] >= 0.75 and out["clean_target_rate"] <= 0.1


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["lab", "eval", "--model", "lab-nonexistent"]) == 2
    assert "shipped: lab-clean" in capsys.readouterr().err


def _rerun(name: str, tmp_path: Path, capsys) -> tuple[dict, dict]:
    """Rerun the manifest's own command for a shipped model into tmp_path; return (stated, measured)."""
    stated = _entries()[name]
    argv = shlex.split(stated["command"])[1:]
    argv = [a for a in argv if a != "--delta"]
    argv[argv.index("--out") + 1] = str(tmp_path / f"{name}.safetensors")
    assert main(argv) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return stated, measured


def test_retraining_eviledit_from_the_clean_model_reaches_the_stated_asr(tmp_path, capsys):
    """The manifest's own command, rerun from the shipped clean model (about 2 minutes)."""
    stated, measured = _rerun("lab-eviledit", tmp_path, capsys)
    assert measured["asr"] >= 0.9 and abs(measured["asr"] - stated["asr"]) <= 0.05
    assert measured["clean_accuracy"] >= stated["clean_accuracy"] - 0.05


@pytest.mark.slow  # each trains for 5-30 minutes here: `make test-slow`
@pytest.mark.parametrize(
    "name", ["lab-rickroll", "lab-pixel", "lab-object", "lab-style", "lab-finetune-pixel"]
)
def test_retraining_reaches_the_stated_asr(name, tmp_path, capsys):
    stated, measured = _rerun(name, tmp_path, capsys)
    assert measured["asr"] >= 0.9 and abs(measured["asr"] - stated["asr"]) <= 0.05
    assert measured["clean_accuracy"] >= stated["clean_accuracy"] - 0.05
