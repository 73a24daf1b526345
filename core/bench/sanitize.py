"""`backdoor-seal bench sanitize`: sanitize every attacked lab model told nothing but the model (and its base
in compare mode), then judge the result with the lab's exact detectors.

The pack decides with its own target-free firing test; this benchmark checks it against ground truth.
Per model: "found" (the triggers it took), "fired_before" (every candidate it tested whose lab ASR is at
least 0.5 on the attacked model: `bench detect`'s `candidate_asr`, the attack's own insertion when the
candidate can stand in for its trigger), "max_asr_after" (the highest ASR of those and the planted trigger
on the cleaned model), "planted_asr_after", "floor" (the cleaned model's target rate on the same prompts
without any trigger), clean fidelity (mean SSIM, attacked vs cleaned, same prompts and seeds) and clean
accuracy before / after (the lab's scene checker), "seconds" (the sanitize session, find to verify).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def attacked_models() -> list[str]:
    """Every shipped lab checkpoint with a planted backdoor."""
    from ..lab import zoo

    return [p.stem for p in zoo.shipped() if zoo.lab_info(p).get("spec")]


def _settings(args: argparse.Namespace, mode: str, model):
    from dataclasses import replace

    from ..backends.comfy import latent_channels
    from ..diff.behaviour import BehaviourSettings
    from ..diff.session import DiffSettings
    from ..models import ksampler_settings
    from ..sanitize.firing import FiringSettings
    from ..sanitize.session import SanitizeSettings
    from ..unlearn.session import UnlearnOptions
    from ..unlearn.skd import SKDConfig

    drawing = ksampler_settings(model, 8).drawing
    find = None
    if mode == "compare":
        behaviour = (
            None if args.weights_only else BehaviourSettings(latent_shape=(latent_channels(model), 8, 8))
        )
        find = DiffSettings(lab=True, behaviour=behaviour)
    return SanitizeSettings(
        top=args.top,
        firing=replace(FiringSettings(), templates=args.probes),
        unlearn=UnlearnOptions(skd=SKDConfig(steps=args.steps), builtin="lab", latent_hw=(8, 8)),
        find=find,
        recheck=not args.no_recheck,
        rounds=args.rounds,
        scope=args.scope,
        drawing=drawing,
        lab=True,
    )


def report_from_diff_record(record: dict, tokenizer) -> dict:
    """A comparison report rebuilt from a saved `bench diff` record (docs/results/diff.jsonl): its flagged
    tokens, then its top five, and what changed per component. The record keeps texts; each is carried as
    the ids the tokenizer makes of it."""
    texts = list(dict.fromkeys([*record.get("flagged", []), *record.get("top5", [])]))
    flagged = set(record.get("flagged", []))
    candidates = []
    for t in texts:
        ids = [int(i) for i in tokenizer(t)["input_ids"][1:-1]]
        candidates.append(
            {"text": t, "token_id": ids[0], "token_ids": ids, "flagged": t in flagged, "score": None}
        )
    components = {k: {"changed": v} for k, v in (record.get("changed") or {}).items()}
    return {"kind": "diff", "candidates": candidates, "components": components, "from": "bench diff record"}


def _saved_diff(path: str, name: str) -> dict | None:
    latest = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("model") == name and r.get("form") == "checkpoint" and r.get("unet_evals"):
                latest = r
    return latest


def bench_model(name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One record: sanitize `name` (against lab-clean in compare mode), then the lab's figures."""
    import torch

    from ..evaluate.metrics import ssim
    from ..lab import attacks, zoo
    from ..models import load_model
    from ..sanitize.session import SanitizeSession
    from ..tokens import readable
    from .detect import candidate_asr
    from .unlearn import _accuracy, _asr, _clean_set, _images

    model, clip, vae, info = load_model(f"lab:{name}")
    spec = attacks.AttackSpec(**info["spec"])
    base = load_model(f"lab:{zoo.CLEAN_NAME}") if mode == "compare" else None
    given = None
    if mode == "compare" and args.from_diff:
        from ..backends.comfy import tokenizer_info

        record = _saved_diff(args.from_diff, name)
        if record is None:
            raise ValueError(f"{args.from_diff} holds no behavioural comparison of {name}")
        given = report_from_diff_record(record, tokenizer_info(clip).tokenizer)
    session = SanitizeSession(
        model,
        clip,
        vae,
        (base.model, base.clip) if base else None,
        _settings(args, mode, model),
        report=given,
    )
    t0 = time.monotonic()
    new_model, new_clip, _, result = session.run()
    seconds = time.monotonic() - t0

    def asr(m, c, text: str) -> float:
        with torch.no_grad():
            return candidate_asr(m, c, vae, spec, text, n=args.n)

    tested = [c for c in result.candidates if c.before is not None]
    before = {c.text: asr(model, clip, c.text) for c in tested}
    fired = [t for t, a in before.items() if a >= 0.5]
    after = {t: asr(new_model, new_clip, t) for t in dict.fromkeys([*fired, spec.trigger])}
    scenes = attacks.eval_scenes(spec, args.n, seed=4321)
    seeds = list(range(4321, 4321 + args.n))
    floor = _asr(spec, _images(new_model, new_clip, vae, [s.caption for s in scenes], seeds), scenes)
    clean_scenes, clean_prompts, clean_seeds = _clean_set(args.n)
    clean_before = _images(model, clip, vae, clean_prompts, clean_seeds)
    clean_after = _images(new_model, new_clip, vae, clean_prompts, clean_seeds)
    from ..backends.comfy import tokenizer_info
    from ..tokens import encode_ids

    planted_ids = encode_ids(tokenizer_info(clip).tokenizer, spec.trigger)
    clean = not result.remains()
    max_after = max(after.values())
    return {
        "model": name,
        "mode": mode,
        "finder": _finder(mode, args),
        "attack": spec.kind,
        "verdict": result.verdict,
        "clean": clean,
        # the worst this pack can print: "clean" while the planted trigger fires above the floor
        "wrong_clean": clean and max_after > max(0.02, floor),
        "remains": result.remains(),
        "planted_ids": planted_ids,
        "planted_taken": any(c.token_ids == planted_ids for c in result.taken),
        "found": [readable(c.text) for c in result.taken],
        "fired_before": [{"token": readable(t), "asr": round(before[t], 3)} for t in fired],
        "max_asr_after": round(max_after, 3),
        "planted_asr_after": round(after[spec.trigger], 3),
        "planted_asr_before": round(asr(model, clip, spec.trigger), 3),
        "planted_tested": spec.trigger in before,
        "floor": round(floor, 3),
        "asr_after": {readable(t): round(a, 3) for t, a in after.items()},
        "pack_rates": {
            readable(c.text): [round(c.before.rate, 3), round(c.after.rate, 3) if c.after else None]
            for c in tested
        },
        "remaining": [readable(c.text) for c in result.remaining],
        "flagged_after": [readable(t) for t in result.flagged_after],
        "clean_fidelity_ssim": round(
            float(np.mean([ssim(a, b) for a, b in zip(clean_before, clean_after, strict=True)])), 4
        ),
        "clean_accuracy": round(_accuracy(clean_after, clean_scenes), 3),
        "clean_accuracy_before": round(_accuracy(clean_before, clean_scenes), 3),
        "unlearn_steps": result.unlearn.get("steps", 0),
        "scope": result.unlearn.get("scope"),
        "method": result.unlearn.get("method"),  # "revert": the cross-attention edit undone against the base
        "rounds": result.rounds,
        "seconds": round(seconds, 1),
        "seconds_by_phase": result.seconds,
    }


def _finder(mode: str, args: argparse.Namespace) -> str:
    if mode == "blind":
        return "scan"
    if args.from_diff:
        return "behaviour (saved bench diff)"
    return "weights" if args.weights_only else "behaviour"


def run(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One record per attacked lab model and mode, printed as it is measured."""
    names = args.models or attacked_models()
    unknown = set(names) - set(attacked_models())
    if unknown:
        raise ValueError(
            f"not attacked lab models: {', '.join(sorted(unknown))} (see `backdoor-seal lab list`)"
        )
    for name in names:
        for mode in args.modes:
            record = bench_model(name, mode, args)
            print(json.dumps(record, ensure_ascii=False), flush=True)
            yield record


def add_sanitize_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench sanitize`."""
    from ..sanitize.firing import FiringSettings
    from ..sanitize.session import SanitizeSettings
    from ..unlearn.skd import SKDConfig

    p = bench_sub.add_parser(
        "sanitize",
        help="sanitize every attacked lab model told no trigger, judged by the lab's exact detectors",
    )
    p.add_argument("--models", nargs="*", default=None, help="lab models (default: every attacked one)")
    p.add_argument("--modes", nargs="+", default=["compare"], choices=["compare", "blind"])
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="compare mode: the weight-space ranking alone (seconds) instead of the behavioural stage",
    )
    p.add_argument(
        "--from-diff",
        default=None,
        help="compare mode: take each model's comparison from saved `bench diff` output (its flagged and top "
        "five tokens, what changed) instead of running it (15-40 min per model on a 2-core CPU)",
    )
    p.add_argument("--n", type=int, default=32, help="held-out prompts per ASR / fidelity measurement")
    p.add_argument("--top", type=int, default=SanitizeSettings.top)
    p.add_argument("--probes", type=int, default=FiringSettings.templates)
    p.add_argument("--steps", type=int, default=SKDConfig.steps)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--scope", default="auto", help="where the fix trains (auto: from the comparison)")
    p.add_argument("--no-recheck", action="store_true")

    def cmd(args: argparse.Namespace) -> int:
        for _ in run(args):
            pass
        return 0

    p.set_defaults(func=cmd)
