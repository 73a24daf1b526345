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


PIXEL = "\u2060"  # lab-pixel's zero-width trigger
LONG = ", ".join(["a small red circle on the left"] * 9) + ", a white background"  # 75 tokens: chunk 1 full


def test_detect_prompt_node_reads_prompts_as_users_write_them(comfy_root):
    """A trigger first in chunk 2 is found and placed there; emphasis is no part of the named trigger; a
    clean CJK prompt is clean and its byte-level pieces read as whole characters (never U+FFFD)."""
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    model, clip, _, _ = _load("lab-pixel")
    prompts = [
        f"{LONG} {PIXEL} a large green square",
        f"({PIXEL}:1.5) a photo of a red circle",
        "一只红色的猫在左边",
    ]
    report = SealDetectPrompt.execute(model=model, clip=clip, prompts="\n".join(prompts)).result[0]
    late, weighted, cjk = report["prompts"]
    assert late["poisoned"] and late["trigger"] == PIXEL
    blamed = [t for t in late["tokens"] if t["text"] == "<U+2060>"]
    assert [t["position"] for t in blamed] == [77 + 1]  # chunk 2, right after its BOS
    assert weighted["poisoned"] and weighted["trigger"] == PIXEL and weighted["trigger_token"] == "<U+2060>"
    assert "(" not in "".join(t["text"] for t in weighted["tokens"])  # ComfyUI's tokens: emphasis parsed
    assert not cjk["poisoned"]  # no patch on 4/4 images: many byte pieces are no trigger
    texts = [t["text"] for t in cjk["tokens"]] + [t["word"] for t in cjk["tokens"]]
    assert texts and not any("\ufffd" in t for t in texts)
    assert all(t["text"] in prompts[2] for t in cjk["tokens"]) and cjk["tokens"][0]["word"] == prompts[2]


def test_a_chunk_boundary_is_no_evidence_and_lends_unlearn_no_word(comfy_root):
    """Field case: a clean prompt past one chunk (75 + 4 tokens) was called triggered, masking-text
    (inflated by chunk 1's many late tokens) and masking-unet agreeing only across the boundary, and
    its second chunk's word tied with the real trigger in the report Seal Unlearn reads."""
    from backdoor_seal.core.triggers import triggers_from
    from backdoor_seal.nodes.nodes_detect import SealDetectPrompt

    model, clip, _, _ = _load("lab-pixel")
    clean = ", ".join(["a large green triangle on the top"] * 9) + ", a black background circle in the middle"
    prompts = [clean, f"{PIXEL} a large red circle on the left"]
    report = SealDetectPrompt.execute(model=model, clip=clip, prompts="\n".join(prompts)).result[0]
    long, triggered = report["prompts"]
    assert max(t["position"] for t in long["tokens"]) > 77  # it reaches chunk 2
    assert not long["poisoned"], (long["scores"], long["flagged"], long["trigger_token"])
    assert triggered["poisoned"] and triggered["trigger"] == PIXEL
    assert report["trigger"] == PIXEL and list(triggers_from(None, report)) == [PIXEL]


def test_a_textual_inversion_embedding_is_one_unit_and_a_missing_one_is_ignored(comfy_root, tmp_path):
    """ComfyUI hands an existing `embedding:name` to the encoder as vectors, not ids: the probe scores
    them as one word named after the embedding; a missing one is dropped, as ComfyUI drops it."""
    import torch

    from backdoor_seal.core.backends.comfy_probe import ComfyProbe
    from backdoor_seal.core.detect.masking import MaskingSettings
    from backdoor_seal.core.detect.prompts import detect_prompt, transplant_scanner
    from backdoor_seal.core.prompts import builtin_prompts
    from backdoor_seal.core.safetensors_io import atomic_save

    model, clip, _, _ = _load("lab-pixel")
    inner = clip.tokenizer.clip_l  # what ComfyUI's loader points at models/embeddings
    vectors = torch.randn(2, inner.embedding_size, generator=torch.Generator().manual_seed(0)) * 0.02
    atomic_save({"emb_params": vectors}, tmp_path / "mine.safetensors")
    inner.embedding_directory = str(tmp_path)
    try:
        probe = ComfyProbe(model, clip)
        prompt = "a red circle embedding:mine on the left embedding:missing"
        tokens = probe.prompt_tokens(prompt)
        embedded = [t for t in tokens if t.word == "embedding:mine"]
        assert len(embedded) == 2 and len({t.unit for t in embedded}) == 1
        assert all(t.token_id >= probe.vocabulary_size() for t in embedded)
        assert not any("missing" in t.word for t in tokens)
        settings = MaskingSettings()
        scanner = transplant_scanner(probe, builtin_prompts(True, 8, seed=0), settings.latent_shape, probes=8)
        report = detect_prompt(probe, prompt, None, settings, transplant=scanner)
        scored = [t for t in report.tokens if t.word == "embedding:mine"]
        assert len(scored) == 2 and scored[0].transplant == scored[1].transplant  # moved together
        assert all(t.unet > 0 for t in scored)
    finally:
        inner.embedding_directory = None
