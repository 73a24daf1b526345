"""`backdoor-seal bench table`: the README's results tables, written from saved benchmark output.

Benchmarks print JSON lines; saved under docs/results/, they are the record. This renders them as
markdown between marker comments in a file, so no figure in the README is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TARGET_REMOVAL = {"pixel": 0.99, "style": 0.97}  # the targets; 0.95 for the others


def read_records(path: str | Path) -> list[dict]:
    """JSON objects, one per non-empty line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def unlearn_table(records: list[dict]) -> str:
    """One markdown row per (model, method) of `bench unlearn` output, with the targets beside."""
    head = (
        "| model | method | scope | ASR before (floor) | removal (target) | clean SSIM | clean accuracy (before) "
        "| time to removal: ours / reference s (check every) | ratio |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        ratio = r.get("time_to_removal_ratio")
        ratio_text = (
            ""
            if ratio is None
            else (f">= {ratio:.0f} (capped)" if r.get("reference_capped") else f"{ratio:.2f}")
        )
        scope = r["scope"] + (f", lr {r['lr']:g}" if r.get("lr") else "")
        scope += f" {r['lr_schedule']}" if r.get("lr_schedule", "constant") != "constant" else ""
        ref_s = r.get("reference_time_to_removal_s")
        timing = f"{_fmt(r.get('time_to_removal_s'), 1) or 'not reached'} / {_fmt(ref_s, 1) or 'not reached'}"
        if r.get("check_every"):
            timing += f" ({r['check_every']} steps)"
        rows.append(
            f"| {r['model']} | {r['method']} | {scope} "
            f"| {_fmt(r['asr_before'])} ({_fmt(r.get('asr_floor'))}) "
            f"| {_fmt(r['removal_accuracy'])} ({TARGET_REMOVAL.get(r['attack'], 0.95)}) "
            f"| {_fmt(r['clean_fidelity_ssim'])} | {_fmt(r['clean_accuracy'])} ({_fmt(r['clean_accuracy_before'])}) "
            f"| {timing} | {ratio_text} |"
        )
    return head + "\n".join(rows) + "\n"


def detect_table(records: list[dict]) -> str:
    """One markdown row per lab model of `bench detect` output: AUROC / F1 per detector, localisation, scan."""
    detectors = ("masking-unet", "masking-text", "transplant", "ftt", "scan")
    head = (
        "| model | "
        + " | ".join(f"{d} AUROC / F1" for d in detectors)
        + " | localisation (best) | scan rank | scan flagged | scan top 5 that fire | scan s "
        "| FPR clean (transplant) |\n" + "|---" * (len(detectors) + 7) + "|\n"
    )
    rows = []
    for r in records:
        auc, f1 = r.get("auroc", {}), r.get("f1", {})
        cells = [f"{_fmt(auc.get(d))} / {_fmt(f1.get(d), 2)}" if d in auc else "" for d in detectors]
        loc = r.get("localisation_accuracy")
        rows.append(
            f"| {r['model']} | "
            + " | ".join(cells)
            + f" | {_fmt(loc, 2)} | {r.get('scan_rank', '') or ''} | {r.get('scan_flagged', '')} "
            f"| {r.get('scan_top5_fires', '')} "
            f"| {_fmt(r.get('scan_seconds'), 0)} | {_fmt(r.get('false_positive_rate', {}).get('transplant'), 2)} |"
        )
    return head + "\n".join(rows) + "\n"


def sau_table(records: list[dict]) -> str:
    """One markdown row per (lab model, SAU variant) of `bench sau` output."""
    head = (
        "| model | variant | ASR plain | removal: SAU Decode / VAEDecode | SSIM outside mask: SAU Decode / "
        "VAEDecode | mask share | scene accuracy: plain / SAU Decode | clean prompts untouched | cost ratio |\n"
        + "|---" * 9
        + "|\n"
    )
    rows = []
    for r in records:
        for name, v in r["variants"].items():
            label = f"{name} (default)" if name == r.get("signal") else name
            px, lt = v["pixel"], v["latent"]
            rows.append(
                f"| {r['model']} | {label} | {_fmt(r['asr_plain'])} "
                f"| {_fmt(px['removal_accuracy'])} / {_fmt(lt['removal_accuracy'])} "
                f"| {_fmt(px['fidelity_ssim_outside_mask'])} / {_fmt(lt['fidelity_ssim_outside_mask'])} "
                f"| {_fmt(v['mask_fraction'], 2)} | {_fmt(r['scene_accuracy_plain'])} / {_fmt(px['scene_accuracy'])} "
                f"| {r['clean_prompts_unchanged'] if name == r.get('signal') else ''} | {_fmt(v.get('cost_ratio'), 2)} |"
            )
    return head + "\n".join(rows) + "\n"


def fullsize_table(records: list[dict]) -> str:
    """`bench fullsize` output as one row per family: the latest record whose commands all exited 0."""
    commands = ("info", "detect", "unlearn_text", "unlearn_attn2-kv")
    latest: dict[str, dict] = {}
    for r in records:
        if all(r.get(c, {}).get("rc") == 0 for c in commands):
            latest[r["family"]] = r
    head = (
        "| family (file) | `info` s / peak RSS | `detect` s | `unlearn` text: s/step / peak RSS "
        "| `unlearn` attn2-kv: s/step / peak RSS | saved file = input + LoRA |\n|---|---|---|---|---|---|\n"
    )
    rows = []
    for family, r in sorted(latest.items()):
        runs = [r["unlearn_text"], r["unlearn_attn2-kv"]]
        checks = [u.get("check", {}) for u in runs]
        exact = all(
            c.get("changed_weights_match") and c.get("every_other_weight_bit_identical") for c in checks
        )
        saved = (
            f"{' / '.join(str(c.get('changed_by_lora')) for c in checks)} of {checks[0].get('weights')} weights "
            + ("changed, every other bit-identical" if exact else "changed; MISMATCH, see the record")
        )
        rows.append(
            f"| {family} ({r['input']['bytes'] / 1e9:.2f} GB fp16) "
            f"| {r['info']['seconds']:.0f} / {r['info'].get('peak_rss_gib', 0):.1f} GiB "
            f"| {r['detect']['seconds']:.0f} "
            + "".join(
                f"| {u.get('seconds_per_step', 0):.1f} / {u.get('peak_rss_gib', 0):.1f} GiB " for u in runs
            )
            + f"| {saved} |"
        )
    return head + "\n".join(rows) + "\n"


def diff_table(records: list[dict]) -> str:
    """`bench diff` output: one row per suspect, the latest record of each (model, form)."""
    latest = {(r["model"], r["form"]): r for r in records}
    head = (
        "| suspect | form | attack | changed (text / cross-attn k,v / rest of UNet) "
        "| trigger rank (target <= 5): comparison / weight space alone | flagged | top 5 | top 5 that fire "
        "| UNet evals (blind scan's) | s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in latest.values():
        c = r.get("changed", {})
        rest = sum(v for k, v in c.items() if k not in ("text_encoder", "cross_attention_kv"))
        fire = "not measured" if r.get("top5_fire") is None else str(r["top5_fire"])
        weight = r.get("weight_rank", r.get("trigger_rank") if not r.get("unet_evals") else None)
        rank = (
            ""
            if r.get("trigger_rank") is None
            else f"{r['trigger_rank']} / {'' if weight is None else weight}"
        )
        top5 = ", ".join(repr(t).replace("|", "\\|") for t in r.get("top5", []))
        names = [repr(t).replace("|", "\\|") for t in r.get("flagged", [])]
        flagged = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "") or "none"
        if r.get("threshold_lift") is not None:
            flagged += f" (lift >= {r['threshold_lift']:g})"
        evals = f"{r.get('unet_evals', 0)}" + (
            f" ({r['blind_unet_evals']})" if r.get("blind_unet_evals") else ""
        )
        rows.append(
            f"| {r['model']} | {r['form']} | {r['attack']} "
            f"| {c.get('text_encoder', 0)} / {c.get('cross_attention_kv', 0)} / {rest} "
            f"| {rank} | {flagged} | {top5} | {fire} | {evals} | {r.get('seconds', 0):.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def _fix(record: dict) -> str:
    """Where the sanitize fix went: its scope, or the edit reverted against the base."""
    if record.get("method") == "revert":
        return f"{record.get('scope')}: edit reverted"
    return record.get("scope") or "-"


def sanitize_table(records: list[dict]) -> str:
    """`bench sanitize` output: one row per (model, mode, finder), the latest of each; "met" applies the
    issue's targets (max ASR after <= max(0.02, floor), SSIM >= 0.90, clean accuracy >= 0.95 x before)."""
    latest = {(r["model"], r["mode"], r.get("finder")): r for r in records}
    head = (
        "| model | attack | finder | scope | found (taken) | candidates that fire (lab ASR >= 0.5) "
        "| max ASR after (target <= max(0.02, floor)) | planted trigger: ASR after | floor | clean SSIM "
        "| clean accuracy after / before | targets met | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in latest.values():
        met = (
            r["max_asr_after"] <= max(0.02, r["floor"])
            and r["clean_fidelity_ssim"] >= 0.90
            and r["clean_accuracy"] >= 0.95 * r["clean_accuracy_before"]
        )
        names = [repr(t).replace("|", "\\|") for t in r["found"]]
        found = ", ".join(names[:6]) + (f" +{len(names) - 6} more" if len(names) > 6 else "") or "none"
        fired = ", ".join(f"{t['token']!r} {t['asr']:.2f}".replace("|", "\\|") for t in r["fired_before"])
        rows.append(
            f"| {r['model']} | {r['attack']} | {r['mode']}: {r.get('finder', '')} | {_fix(r)} "
            f"| {found} | {fired or 'none'} | {r['max_asr_after']:.2f} | {r['planted_asr_after']:.2f} "
            f"| {r['floor']:.2f} | {r['clean_fidelity_ssim']:.3f} "
            f"| {r['clean_accuracy']:.3f} / {r['clean_accuracy_before']:.3f} | {'yes' if met else 'no'} "
            f"| {r['seconds']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


GPU_TARGETS = {"sd15": {"scan_s": 120.0, "masking_s": 0.05}, "sdxl": {"scan_s": 480.0, "masking_s": None}}


def gpu_table(records: list[dict]) -> str:
    """`bench gpu` output: one row per (device, architecture, size), the latest of each. Targets (#23, an
    H200 at full size): masking <= 0.05 s per prompt (SD1.5), full scan <= 2 min (SD1.5) / 8 min (SDXL),
    SKD-CAG throughput >= 10x the reference's at <= half its peak memory, capture overhead <= 1.05x."""
    latest = {(r["device"], r["arch"], r.get("size", "full")): r for r in records}
    head = (
        "| device | arch | latent | masking s / prompt | transplant s / prompt | scan tokens/s | full scan s "
        "(extrapolated) | SKD-CAG / reference step s | samples/s ratio | peak GB ours / reference "
        "| capture overhead | SAU cost | targets met |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for (device, arch, size), r in latest.items():
        t = GPU_TARGETS.get(arch, {})
        peaks = r.get("skd_peak_gb"), r.get("reference_peak_gb")
        checks = [
            r["scan_full_vocab_s"] <= t.get("scan_s", float("inf")),
            r["throughput_ratio"] >= 10,
            r["capture_overhead"] <= 1.05,
            None not in peaks and peaks[0] <= 0.5 * peaks[1],
        ]
        if t.get("masking_s") is not None:
            checks.append(r["detect_masking_s_per_prompt"] <= t["masking_s"])
        met = "n/a (not full size)" if size != "full" else ("yes" if all(checks) else "no")
        rows.append(
            f"| {device} | {arch}{'' if size == 'full' else f' ({size})'} | {r['latent'][0]}x{r['latent'][1]} "
            f"| {r['detect_masking_s_per_prompt']:.3f} | {r['detect_transplant_s_per_prompt']:.3f} "
            f"| {r['scan_tokens_per_s']:.0f} | {r['scan_full_vocab_s']:.0f} "
            f"| {r['skd_step_s']:.3f} / {r['reference_step_s']:.3f} | {r['throughput_ratio']:.1f} "
            f"| {_fmt(peaks[0], 1) or '-'} / {_fmt(peaks[1], 1) or '-'} | {r['capture_overhead']:.3f} "
            f"| {r['sau_cost_ratio']:.2f} | {met} |"
        )
    return head + "\n".join(rows) + "\n"


def lab_loras_table(records: list[dict]) -> str:
    """`lab extract-lora` output (each lab attack as a LoRA, its rank, size and the ASR it keeps) and the
    LoRAs trained as LoRAs (`lab attack --kind villan`: no checkpoint, no energy to keep)."""
    latest = {Path(r["lora"]).stem if r.get("lora") else r["source"]: r for r in records}
    head = (
        "| LoRA of | rank | weights carried / dropped | energy kept (mean) | KB | ASR: LoRA (checkpoint) "
        "| clean accuracy | prompts |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for stem, r in latest.items():
        name = r["source"] if r.get("kept_energy_mean") is not None else f"{stem} ({r['source']})"
        dropped = r.get("dropped_tensors", len(r.get("dropped", [])))
        rows.append(
            f"| {name} | {r['rank']} | {r['tensors']} / {dropped} | {_fmt(r.get('kept_energy_mean'), 2) or '-'} "
            f"| {r['bytes'] / 1024:.0f} | {_fmt(r.get('asr'))} ({_fmt(r.get('asr_checkpoint')) or '-'}) "
            f"| {_fmt(r.get('clean_accuracy'))} | {r.get('n_prompts', '')} |"
        )
    return head + "\n".join(rows) + "\n"


def replace_between(text: str, name: str, body: str) -> str:
    """text with the part between <!-- results:name --> and <!-- /results:name --> replaced by body."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} markers to fill")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body}{end}{after}"


def cmd_table(args: argparse.Namespace) -> int:
    """Fill the README's marked results sections from saved benchmark output."""
    target = Path(args.readme)
    text = target.read_text()
    text = replace_between(text, "unlearn", unlearn_table(read_records(args.unlearn)))
    if "<!-- results:detect -->" in text and Path(args.detect).exists():
        text = replace_between(text, "detect", detect_table(read_records(args.detect)))
    if "<!-- results:sau -->" in text and Path(args.sau).exists():
        text = replace_between(text, "sau", sau_table(read_records(args.sau)))
    if "<!-- results:lab-loras -->" in text and Path(args.lab_loras).exists():
        text = replace_between(text, "lab-loras", lab_loras_table(read_records(args.lab_loras)))
    if "<!-- results:diff -->" in text and Path(args.diff).exists():
        text = replace_between(text, "diff", diff_table(read_records(args.diff)))
    if "<!-- results:sanitize -->" in text and Path(args.sanitize).exists():
        text = replace_between(text, "sanitize", sanitize_table(read_records(args.sanitize)))
    if "<!-- results:gpu -->" in text and Path(args.gpu).exists():
        text = replace_between(text, "gpu", gpu_table(read_records(args.gpu)))
    if "<!-- results:fullsize -->" in text and Path(args.fullsize).exists():
        text = replace_between(text, "fullsize", fullsize_table(read_records(args.fullsize)))
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # atomic: a reader sees the old README or the new one
    print(f"wrote {target}")
    return 0
