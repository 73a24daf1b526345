"""`backdoor-seal bench detect`: every detector on every lab model, held-out prompts, one JSON object each.

Per attacked model: triggered prompts (held-out scenes, the attack's own insertion) against clean
held-out prompts, half from the lab grammar's evaluation split and half everyday captions from
outside the grammar. Thresholds come from a separate clean calibration set of the same model.
The clean model gets the same treatment without triggered prompts: its false-positive rates.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
from scipy.stats import mannwhitneyu


def auroc(negatives: list[float], positives: list[float]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counted half."""
    if not negatives or not positives:
        return float("nan")
    return float(mannwhitneyu(positives, negatives).statistic / (len(positives) * len(negatives)))


def f1(negatives: list[float], positives: list[float], threshold: float) -> float:
    """F1 of 'score > threshold' calls triggered."""
    tp = sum(p > threshold for p in positives)
    fp = sum(n > threshold for n in negatives)
    fn = len(positives) - tp
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def trigger_token_ids(probe, trigger: str) -> list[int]:
    """The trigger's own token ids (alone), the ids a scan should rank."""
    ids = probe.token_ids(trigger)
    return [i for i in ids[1:] if i not in (probe.eos, probe.bos, probe.pad)]


def changed_positions(tokenizer, clean: str, triggered: str) -> set[int]:
    """Sequence positions (BOS = 0) of the triggered prompt's tokens that its clean twin lacks: the trigger."""
    from difflib import SequenceMatcher

    from ..tokens import tokenize

    a = [t.token_id for t in tokenize(tokenizer, clean)]
    b = [t.token_id for t in tokenize(tokenizer, triggered)]
    kept = set()
    for block in SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        kept.update(range(block.b, block.b + block.size))
    return {i + 1 for i in range(len(b)) if i not in kept}


def candidate_asr(model, clip, vae, spec, text: str, n: int = 32, seed: int = 4321) -> float:
    """How often a scan candidate, used as the trigger, makes the attacked lab model draw the attack's target.

    The attack's own insertion when the candidate can stand in for its trigger, else the candidate goes first.
    """
    from dataclasses import replace

    from ..lab import attacks
    from ..lab.evaluate import sample_images

    scenes = attacks.eval_scenes(spec, n, seed)
    try:
        candidate = replace(spec, trigger=text)
    except ValueError:  # a homoglyph attack and a candidate that is not a homoglyph
        candidate = None
    prompts = [
        attacks.triggered_prompt(candidate, scene.caption) if candidate else f"{text} {scene.caption}"
        for scene in scenes
    ]
    images = sample_images(model, clip, vae, prompts, list(range(seed, seed + n)))
    return float(
        np.mean([attacks.attack_succeeded(spec, im, sc) for im, sc in zip(images, scenes, strict=True)])
    )


def _prompt_sets(info: dict, n: int) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Calibration clean prompts, held-out clean prompts, held-out (clean twin, triggered) pairs."""
    from ..lab import attacks, world
    from ..prompts import general_prompts, lab_prompts

    general = general_prompts(None, 11)
    half = n // 2
    calibration = lab_prompts(half, 101) + general[:half]
    clean = [s.caption for s in world.scene_dataset(n - half, seed=77, split="eval")] + general[
        half : half + half
    ]
    triggered: list[tuple[str, str]] = []
    if info.get("spec"):
        spec = attacks.AttackSpec(**info["spec"])
        scenes = attacks.eval_scenes(spec, n, seed=555)
        triggered = [(s.caption, attacks.triggered_prompt(spec, s.caption)) for s in scenes]
    return calibration, clean, triggered


def evaluate_model(name: str, n: int, scan: bool, ftt_steps: int) -> dict:
    """All figures for one lab model."""
    import torch

    from ..backends.comfy import ComfyBackend
    from ..backends.comfy_probe import ComfyProbe
    from ..detect.masking import MaskingSettings, score_prompt
    from ..detect.prompts import calibrate, detect_prompt, ftt_scores, transplant_scanner
    from ..detect.scan import VocabularyScanner
    from ..models import load_model
    from ..prompts import lab_prompts

    model, clip, vae, info = load_model(f"lab:{name}")
    probe = ComfyProbe(model, clip)
    settings = MaskingSettings()
    calibration_prompts, clean, pairs = _prompt_sets(info, n)
    triggered = [t for _, t in pairs]
    record: dict = {"attack": info.get("attack", "none"), "model": name, "trigger": info.get("trigger")}

    scan_scores: dict[int, float] | None = None
    if scan:
        t0 = time.monotonic()
        report = VocabularyScanner(probe, lab_prompts(32, 0)).run()
        record["scan_seconds"] = round(time.monotonic() - t0, 1)
        record["scan_unet_evals"] = report.unet_evals
        record["scan_threshold_z"] = report.threshold_z
        record["scan_top"] = [
            {"text": c.text, "token_id": c.token_id, "z": round(c.score_z, 2), "flagged": c.flagged}
            for c in report.candidates[:5]
        ]
        record["scan_flagged"] = len(report.flagged)
        if info.get("spec"):
            # The scan ranks tokens, not the planted string: a backdoor often fires on other tokens too.
            from ..lab import attacks

            spec = attacks.AttackSpec(**info["spec"])
            for entry in record["scan_top"]:
                entry["asr"] = candidate_asr(model, clip, vae, spec, entry["text"])
            record["scan_top5_fires"] = sum(e["asr"] >= 0.5 for e in record["scan_top"])
        if record["trigger"]:
            record["scan_rank"] = report.rank_of(trigger_token_ids(probe, record["trigger"]))
        floor = min(c.score_z for c in report.candidates) - 1.0
        scan_scores = {c.token_id: c.score_z for c in report.candidates}
        scan_scores = {i: scan_scores.get(i, floor) for i in report.stage1}

    probes = lab_prompts(32, 0)  # the scan's probes; calibration and test prompts are other seeds
    transplant = transplant_scanner(probe, probes, settings.latent_shape)

    def input_level(prompts: list[str]) -> tuple[dict[str, list[float]], list, float]:
        t0 = time.monotonic()
        reports = [
            detect_prompt(probe, p, None, settings, scan_scores=scan_scores, transplant=transplant)
            for p in prompts
        ]
        per = (time.monotonic() - t0) / max(1, len(prompts))
        return {k: [r.scores[k] for r in reports] for k in reports[0].scores}, reports, per

    def ftt(prompts: list[str]) -> tuple[list[float], float]:
        t0 = time.monotonic()
        with torch.no_grad():
            values = ftt_scores(
                ComfyBackend(model, clip), prompts, list(range(len(prompts))), steps=ftt_steps
            )
        return values, (time.monotonic() - t0) / max(1, len(prompts))

    cal, _, _ = input_level(calibration_prompts)
    cal["ftt"], _ = ftt(calibration_prompts)
    cal.pop("scan", None)
    thresholds = dict(calibrate(name, cal).thresholds)
    if scan_scores is not None:
        thresholds["scan"] = record["scan_threshold_z"]

    # Cost of each input-level detector, timed alone on the clean prompts.
    t0 = time.monotonic()
    for p in clean:
        score_prompt(probe, p, settings)
    mask_sec = (time.monotonic() - t0) / len(clean)
    neg, clean_reports, all_sec = input_level(clean)
    neg["ftt"], ftt_sec = ftt(clean)
    record["false_positive_rate"] = {k: float(np.mean([v > thresholds[k] for v in neg[k]])) for k in neg}
    record["thresholds"] = thresholds
    tokens = float(np.mean([len(r.tokens) for r in clean_reports]))
    record["unet_evals_per_prompt"] = {
        "masking": round(tokens + 1, 1),
        "masking_unet_calls": int(np.ceil(tokens / settings.group)),
        "transplant": round(
            transplant.settings.stage2_probes * tokens, 1
        ),  # probe references: once per model
        "transplant_unet_calls": transplant.settings.stage2_probes,
        "ftt": 2 * ftt_steps,
        "scan": 0,
    }
    record["seconds_per_prompt"] = {
        "masking": round(mask_sec, 4),
        "transplant": round(max(0.0, all_sec - mask_sec), 4),
        "ftt": round(ftt_sec, 4),
        "scan": 0.0,
    }
    if triggered:
        pos, trig_reports, _ = input_level(triggered)
        pos["ftt"], _ = ftt(triggered)
        record["auroc"] = {k: round(auroc(neg[k], pos[k]), 4) for k in pos}
        record["f1"] = {k: round(f1(neg[k], pos[k], thresholds[k]), 4) for k in pos}
        record["best_detector"] = max(record["auroc"], key=record["auroc"].get)
        loc: dict[str, list[bool]] = {}
        for (twin, prompt), report in zip(pairs, trig_reports, strict=True):
            truth = changed_positions(probe.tokenizer, twin, prompt)
            values = {
                "masking-unet": [t.unet for t in report.tokens],
                "masking-text": [t.hijack for t in report.tokens],
                "transplant": [t.transplant for t in report.tokens],
            }
            if scan_scores is not None:
                values["scan"] = [scan_scores.get(t.token_id, -1e9) for t in report.tokens]
            for k, v in values.items():
                loc.setdefault(k, []).append(report.tokens[int(np.argmax(v))].position in truth)
        record["localisation"] = {k: round(float(np.mean(v)), 4) for k, v in loc.items()}
        best = record["best_detector"]
        record["localisation_accuracy"] = record["localisation"].get(
            best, max(record["localisation"].values())
        )
    record["n_prompts"] = {
        "calibration": len(calibration_prompts),
        "clean": len(clean),
        "triggered": len(triggered),
    }
    return record


def add_detect_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench detect`."""
    p = bench_sub.add_parser(
        "detect", help="detectors on every lab model: AUROC, F1, localisation, blind-scan rank, cost"
    )
    p.add_argument(
        "--models", nargs="*", default=None, help="lab models (default: lab-clean and every attacked one)"
    )
    p.add_argument("--n", type=int, default=64, help="held-out prompts per class")
    p.add_argument("--no-scan", dest="scan", action="store_false", help="skip the vocabulary scan")
    p.add_argument("--ftt-steps", type=int, default=20)
    p.set_defaults(func=cmd_detect_bench)


def run(args: argparse.Namespace) -> Iterator[dict]:
    """One record per model."""
    from ..lab import zoo

    names = args.models or ["lab-clean"] + [p.stem for p in zoo.shipped() if p.stem != "lab-clean"]
    for name in names:
        yield evaluate_model(name, args.n, args.scan, args.ftt_steps)


def cmd_detect_bench(args: argparse.Namespace) -> int:
    """Print one JSON line per model."""
    import json

    for record in run(args):
        print(json.dumps(record, ensure_ascii=False), flush=True)
    return 0
