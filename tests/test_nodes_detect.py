"""SealDetectPrompt / SealScanModel and the detect/scan commands on shipped lab models (real ComfyUI)."""

from __future__ import annotations

import json

import pytest

HOMOGLYPH = "\u043e"  # Cyrillic o: lab-rickroll's text-encoder trigger


def _load(name):
    from backdoor_seal.core.models import load_model

    return load_model(f"lab:{name}")


def test_detect_prompt_node_flags_the_homoglyph_prompt_and_names_the_word(comfy_root):
    from backdoor_seal.core.triggers import trigger_from
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    model, clip, _, _ = _load("lab-rickroll")
    triggered = f"a small red circle{HOMOGLYPH}n the left".replace(
        f"circle{HOMOGLYPH}n", f"circle {HOMOGLYPH}n"
    )
    out = SealDetectPrompt.execute(model=model, clip=clip, prompts=f"{triggered}\na large blue square")
    report, image = out.result
    first = report["prompts"][0]
    assert first["flagged"]["masking-text"] and first["flagged"]["transplant"]
    assert first["localised_by"] == "transplant"  # the first flagged signal in the blame order
    assert HOMOGLYPH in first["trigger"]
    assert report["poisoned"] and trigger_from("", report) == first["trigger"]
    assert image.shape[0] == 2 and image.shape[-1] == 3
    assert len(first["tokens"]) == len(first["prompt"].split()) + 1  # 'on' splits into 'о' + 'n'


def test_detect_prompt_node_refuses_an_empty_prompt_list(comfy_root):
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    model, clip, _, _ = _load("lab-rickroll")
    with pytest.raises(ValueError, match="no prompt to check"):
        SealDetectPrompt.execute(model=model, clip=clip, prompts="\n  \n")


def test_scan_node_reports_candidates_a_plot_and_feeds_unlearn(comfy_root, monkeypatch):
    from backdoor_seal.core.detect.scan import VocabularyScanner
    from backdoor_seal.core.triggers import trigger_from
    from backdoor_seal.nodes.nodes_detect import SealScanModel

    model, clip, _, info = _load("lab-pixel")
    subset = [13503, *range(2000, 2300)]  # the pixel trigger (U+2060) among 300 ordinary tokens
    monkeypatch.setattr(VocabularyScanner, "vocabulary", lambda self: subset)
    out = SealScanModel.execute(model=model, clip=clip, candidates=16, stage2_probes=8)
    report, plot = out.result
    assert report["scanned_tokens"] == len(subset)
    assert report["candidates"][0]["token_id"] == 13503 and report["poisoned"]
    assert trigger_from("", report) == info["trigger"]
    assert plot.ndim == 4 and plot.shape[-1] == 3


def test_unlearn_refuses_a_report_that_found_nothing():
    from backdoor_seal.core.triggers import trigger_from

    with pytest.raises(ValueError, match="found no trigger"):
        trigger_from("", {"kind": "scan", "poisoned": False, "trigger": None, "candidates": [{"text": "x"}]})


def test_detect_command_prints_one_json_line_per_prompt(comfy_root, capsys, tmp_path):
    from backdoor_seal.core.cli import main

    cal = tmp_path / "cal.json"
    rc = main(
        [
            "detect",
            "--model",
            "lab:lab-rickroll",
            "--prompt",
            "a large blue square",
            "--prompt",
            f"a small red circle {HOMOGLYPH}n the left",
            "--calibrate-n",
            "12",
            "--save-calibration",
            str(cal),
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and lines[1]["poisoned"] and HOMOGLYPH in lines[1]["trigger"]
    assert set(json.loads(cal.read_text())["thresholds"]) == {"masking-unet", "masking-text", "transplant"}


def test_scan_command_refuses_to_overwrite_its_report(comfy_root, tmp_path, capsys):
    from backdoor_seal.core.cli import main

    out = tmp_path / "scan.json"
    out.write_text("{}")
    assert main(["scan", "--model", "lab:lab-pixel", "--out", str(out)]) == 2
    assert "nothing is overwritten" in capsys.readouterr().err
    assert out.read_text() == "{}"
