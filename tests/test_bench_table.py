"""The README's results tables are written from saved benchmark output, never typed."""

from __future__ import annotations

import json

import pytest

from backdoor_seal.core.bench.table import (
    diff_table,
    fullsize_table,
    lab_loras_table,
    replace_between,
    unlearn_table,
)
from backdoor_seal.core.cli import main

RECORD = {
    "model": "lab-pixel",
    "method": "skd-cag",
    "attack": "pixel",
    "scope": "text",
    "lr": 0.005,
    "asr_before": 1.0,
    "asr_floor": 0.0,
    "removal_accuracy": 0.9921875,
    "clean_fidelity_ssim": 0.975,
    "clean_accuracy": 0.977,
    "clean_accuracy_before": 0.977,
    "time_to_removal_s": 12.5,
    "reference_time_to_removal_s": None,
    "time_to_removal_ratio": 10.0,
    "reference_capped": True,
    "check_every": 10,
}


def test_unlearn_rows_show_measured_figures_targets_and_a_capped_ratio_as_a_bound():
    table = unlearn_table(
        [
            RECORD,
            {
                **RECORD,
                "attack": "object",
                "model": "lab-object",
                "reference_capped": False,
                "time_to_removal_ratio": 3.21,
                "reference_time_to_removal_s": 40.1,
            },
        ]
    )
    rows = table.strip().splitlines()
    assert len(rows) == 4
    assert "| lab-pixel | skd-cag | text, lr 0.005 | 1.000 (0.000) | 0.992 (0.99) |" in rows[2]
    assert rows[2].endswith("| 12.5 / not reached (10 steps) | >= 10 (capped) |")
    assert "(0.95)" in rows[3] and rows[3].endswith("| 12.5 / 40.1 (10 steps) | 3.21 |")


def test_bench_table_fills_only_the_marked_section(tmp_path):
    saved = tmp_path / "unlearn.jsonl"
    saved.write_text(json.dumps(RECORD) + "\n\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:unlearn -->\nold row\n<!-- /results:unlearn -->\nafter\n")
    assert main(["bench", "table", "--unlearn", str(saved), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:unlearn -->\n| model |") and text.endswith(
        "<!-- /results:unlearn -->\nafter\n"
    )
    assert "old row" not in text and "lab-pixel" in text
    with pytest.raises(ValueError, match="markers"):
        replace_between("no markers here", "unlearn", "x")


def test_detect_rows_show_each_detector_localisation_and_the_scan():
    from backdoor_seal.core.bench.table import detect_table

    record = {
        "model": "lab-pixel",
        "auroc": {"masking-unet": 0.61, "transplant": 1.0, "scan": 0.99},
        "f1": {"masking-unet": 0.2, "transplant": 0.97, "scan": 0.9},
        "localisation_accuracy": 1.0,
        "scan_rank": 8,
        "scan_flagged": 0,
        "scan_top5_fires": 4,
        "scan_seconds": 512.3,
        "false_positive_rate": {"transplant": 0.03},
    }
    rows = detect_table(
        [record, {"model": "lab-clean", "false_positive_rate": {"transplant": 0.05}}]
    ).splitlines()
    assert rows[0].count("|") == rows[1].count("|") == rows[2].count("|")
    assert "| 0.610 / 0.20 |  | 1.000 / 0.97 |  | 0.990 / 0.90 | 1.00 | 8 | 0 | 4 | 512 | 0.03 |" in rows[2]
    assert rows[3].startswith("| lab-clean |") and rows[3].endswith("| 0.05 |")


def test_sau_rows_show_each_variant_with_both_decoders_and_mark_the_default():
    from backdoor_seal.core.bench.table import sau_table

    variant = {
        "mask_fraction": 0.13,
        "pixel": {"removal_accuracy": 1.0, "fidelity_ssim_outside_mask": 0.99, "scene_accuracy": 0.9},
        "latent": {"removal_accuracy": 0.98, "fidelity_ssim_outside_mask": 0.81, "scene_accuracy": 0.92},
        "cost_ratio": 1.8,
    }
    record = {
        "model": "lab-pixel",
        "signal": "attention",
        "asr_plain": 1.0,
        "scene_accuracy_plain": 0.92,
        "clean_prompts_unchanged": "16/16",
        "variants": {"latent": variant, "attention": variant},
    }
    rows = sau_table([record]).strip().splitlines()
    assert len(rows) == 4
    assert rows[3].startswith(
        "| lab-pixel | attention (default) | 1.000 | 1.000 / 0.980 | 0.990 / 0.810 | 0.13 |"
    )
    assert rows[3].endswith("| 16/16 | 1.80 |") and rows[2].endswith("|  | 1.80 |")


def test_fullsize_table_shows_the_latest_complete_run_per_family_and_flags_a_mismatch():
    """One row per family from the latest record whose commands all exited 0; a saved file that is not
    input + LoRA is said to be so, never shown as right."""

    def record(family, rc=0, exact=True, seconds=10.0):
        unlearn = {
            "rc": rc,
            "seconds_per_step": 2.5,
            "peak_rss_gib": 6.5,
            "check": {
                "weights": 884,
                "changed_by_lora": 72,
                "changed_weights_match": True,
                "every_other_weight_bit_identical": exact,
            },
        }
        return {
            "family": family,
            "input": {"bytes": 2_132_625_342},
            "info": {"rc": 0, "seconds": seconds, "peak_rss_gib": 6.5},
            "detect": {"rc": 0, "seconds": 156.0},
            "unlearn_text": unlearn,
            "unlearn_attn2-kv": unlearn,
        }

    table = fullsize_table(
        [record("sdxl", seconds=1.0), record("sd15", seconds=99.0), record("sd15", rc=1, seconds=5.0)]
        + [record("sdxl", exact=False, seconds=62.0)]
    )
    rows = table.strip().splitlines()[2:]
    assert [r.split("|")[1].split()[0] for r in rows] == ["sd15", "sdxl"]
    assert "| 99 / 6.5 GiB" in rows[0] and "every other bit-identical" in rows[0]  # rc 1 run skipped
    assert "| 62 / 6.5 GiB" in rows[1] and "MISMATCH" in rows[1]


def test_diff_table_keeps_the_latest_record_per_suspect_and_says_what_was_not_measured():
    base = {"base": "lab-clean", "attack": "eviledit", "flagged": [], "unet_evals": 0, "seconds": 22.0}
    old = {
        **base,
        "model": "lab-eviledit",
        "form": "checkpoint",
        "trigger_rank": 999,
        "top5": [],
        "top5_fire": 0,
    }
    new = {
        **base,
        "model": "lab-eviledit",
        "form": "checkpoint",
        "trigger_rank": 12,
        "top5": ["a|b", "\u2060"],
        "top5_fire": None,
        "changed": {"text_encoder": 0, "cross_attention_kv": 14, "self_attention": 1},
    }
    lora = {
        **new,
        "form": "lora",
        "trigger_rank": 3,
        "weight_rank": 4000,
        "top5_fire": 2,
        "flagged": ["sks"],
        "unet_evals": 114222,
        "blind_unet_evals": 117278,
    }
    rows = diff_table([old, new, lora]).strip().splitlines()[2:]
    assert len(rows) == 2
    # an old weight-space-only record: its one rank is the weight space's
    assert "| 12 / 12 |" in rows[0] and "not measured" in rows[0] and "| 0 / 14 / 1 |" in rows[0]
    assert "'a\\|b'" in rows[0] and "'\\u2060'" in rows[0]  # pipes escaped, invisible characters spelled
    assert "| none |" in rows[0]
    assert "| lora |" in rows[1] and "| 3 / 4000 |" in rows[1] and "| 2 |" in rows[1]
    assert "| 'sks' |" in rows[1] and "| 114222 (117278) |" in rows[1]


def test_lab_loras_table_shows_each_attacks_lora_with_what_it_keeps():
    record = {
        "source": "lab-rickroll",
        "rank": 8,
        "tensors": 24,
        "dropped_tensors": 44,
        "kept_energy_mean": 0.8594,
        "bytes": 157184,
        "asr": 0.546875,
        "asr_checkpoint": 0.90625,
        "clean_accuracy": 0.828125,
        "n_prompts": 64,
    }
    (row,) = lab_loras_table([{**record, "asr": 0.1}, record]).strip().splitlines()[2:]
    assert row == "| lab-rickroll | 8 | 24 / 44 | 0.86 | 154 | 0.547 (0.906) | 0.828 | 64 |"
    trained = {  # a LoRA trained as a LoRA: no checkpoint to keep energy or ASR of
        "lora": "lab_models/loras/lab-villan-lora.safetensors",
        "source": "trained as a LoRA",
        "rank": 8,
        "tensors": 188,
        "dropped_tensors": 0,
        "bytes": 956094,
        "asr": 0.984375,
        "clean_accuracy": 0.875,
        "n_prompts": 64,
    }
    (row,) = lab_loras_table([trained]).strip().splitlines()[2:]
    assert row == "| lab-villan-lora (trained as a LoRA) | 8 | 188 / 0 | - | 934 | 0.984 (-) | 0.875 | 64 |"


def _sanitize_record(**over) -> dict:
    record = {
        "model": "lab-pixel",
        "mode": "compare",
        "finder": "weights",
        "scope": "attn2-kv",
        "attack": "pixel",
        "found": ["kamala", "dealer|ship"],
        "fired_before": [{"token": "kamala", "asr": 1.0}],
        "max_asr_after": 0.0,
        "planted_asr_after": 0.0,
        "floor": 0.0,
        "clean_fidelity_ssim": 0.95,
        "clean_accuracy": 0.96,
        "clean_accuracy_before": 1.0,
        "seconds": 300.4,
    }
    return {**record, **over}


def test_sanitize_table_applies_the_targets_and_keeps_the_latest_record_per_setting():
    from backdoor_seal.core.bench.table import sanitize_table

    rows = sanitize_table(
        [
            _sanitize_record(max_asr_after=0.5),
            _sanitize_record(),  # the same setting again: the latest counts
            _sanitize_record(finder="scan", mode="blind", planted_asr_after=1.0, max_asr_after=1.0),
            _sanitize_record(finder="behaviour", clean_accuracy=0.9),  # 0.9 < 0.95 x 1.0
            _sanitize_record(finder="x", max_asr_after=0.05, floor=0.06, found=[], fired_before=[]),
            _sanitize_record(finder="y", method="revert"),
        ]
    ).splitlines()[2:]
    assert len(rows) == 5
    assert "| compare: y | attn2-kv: edit reverted |" in rows[4]
    assert rows[0].startswith("| lab-pixel | pixel | compare: weights | attn2-kv | 'kamala', 'dealer\\|ship'")
    assert rows[0].endswith("| yes | 300 |") and "| 0.00 | 0.00 | 0.00 | 0.950 | 0.960 / 1.000 |" in rows[0]
    assert rows[1].endswith("| no | 300 |") and "blind: scan" in rows[1]
    assert rows[2].endswith("| no | 300 |")  # clean accuracy under 95% of before
    assert rows[3].endswith("| yes | 300 |") and "| none | none |" in rows[3]  # under the floor


def test_a_saved_comparison_record_becomes_a_report_the_sanitize_job_reads():
    from backdoor_seal.core.bench.sanitize import report_from_diff_record
    from backdoor_seal.core.sanitize.choose import report_candidates
    from backdoor_seal.core.sanitize.session import scope_for

    def tokenizer(text):  # one id per character, distinct per text
        return {"input_ids": [0, *(100 + ord(c) for c in text), 1]}

    record = {"flagged": ["kamala", "dealership"], "top5": ["kamala", "dealership", "cham", "alec", "lashes"]}
    record["changed"] = {"text_encoder": 0, "cross_attention_kv": 14}
    report = report_from_diff_record(record, tokenizer)
    cands = report_candidates(report, top=2)
    assert [(c.text, c.flagged) for c in cands] == [
        ("kamala", True),
        ("dealership", True),
        ("cham", False),
        ("alec", False),
    ]
    assert scope_for(report) == "attn2-kv"


def _gpu_record(**over):
    r = {
        "device": "NVIDIA H200", "arch": "sd15", "size": "full", "latent": [64, 64],
        "detect_masking_s_per_prompt": 0.04, "detect_transplant_s_per_prompt": 0.2, "scan_tokens_per_s": 900.0,
        "scan_full_vocab_s": 110.0, "skd_step_s": 0.2, "reference_step_s": 0.3, "throughput_ratio": 12.0,
        "skd_peak_gb": 6.0, "reference_peak_gb": 14.0, "capture_overhead": 1.03, "sau_cost_ratio": 1.9,
    }  # fmt: skip
    return r | over


def test_gpu_table_applies_the_targets_per_architecture_and_never_to_tiny_runs():
    from backdoor_seal.core.bench.table import gpu_table

    rows = gpu_table(
        [
            _gpu_record(scan_full_vocab_s=500.0),  # superseded by the next record of the same setting
            _gpu_record(),
            _gpu_record(
                arch="sdxl", latent=[128, 128], scan_full_vocab_s=400.0, detect_masking_s_per_prompt=0.3
            ),
            _gpu_record(arch="sdxl", device="cpu", size="tiny", latent=[8, 8], skd_peak_gb=None),
            _gpu_record(arch="sd15", device="NVIDIA A10", capture_overhead=1.2),
        ]
    ).splitlines()[2:]
    assert len(rows) == 4
    sd15, sdxl, tiny, a10 = rows
    assert sd15.endswith("| yes |") and "| 110 |" in sd15
    assert sdxl.endswith("| yes |")  # SDXL's masking time has no target; its scan's is 8 minutes
    assert "n/a (not full size)" in tiny and "| - /" in tiny
    assert a10.endswith("| no |")  # capture overhead 1.2 > 1.05
