"""`backdoor-seal bench heldout`: sanitize attacks nobody here tuned for, judged by the lab's exact detectors.

Each seed draws an attack (`core/lab/generator.py`: kind, trigger family, placement, shapes), plants it in
lab-clean with the fast recipe, measures it (lab ASR, clean accuracy; an attack that did not take, ASR
under `--min-asr`, is recorded and not judged), then sanitizes it in each mode: compare with the
weight-space ranking alone ("weights"), compare with the behavioural stage ("behaviour"), and blind. One
JSON record per attack and mode: the planted trigger's own rank in the finder's ranking (its ids), whether
its ids were tested and taken, the verdict, the lab ASR before and after, the floor (the cleaned model's
target rate without any trigger), clean SSIM and accuracy, seconds. A record is *caught* when its verdict
is right (`poisoned`) and the ASR after is at most max(2%, floor); a `clean` verdict while the ASR after
is above that is a wrong clean, the worst this pack can print. The last line sums up per mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("weights", "behaviour", "blind")


def _say(seed: int, text: str) -> None:
    """A progress line on stderr (the records go to stdout)."""
    print(f"heldout seed {seed}: {text}", file=sys.stderr, flush=True)


def _settings(args: argparse.Namespace, mode: str, model):
    from dataclasses import replace

    from ..backends.comfy import latent_channels
    from ..detect.scan import ScanSettings
    from ..diff.behaviour import BehaviourSettings
    from ..diff.session import DiffSettings
    from ..models import ksampler_settings
    from ..sanitize.firing import FiringSettings
    from ..sanitize.session import SanitizeSettings
    from ..unlearn.session import UnlearnOptions
    from ..unlearn.skd import SKDConfig

    shape = (latent_channels(model), 8, 8)
    if mode == "blind":
        find = ScanSettings(latent_shape=shape)
    else:
        find = DiffSettings(
            lab=True, behaviour=BehaviourSettings(latent_shape=shape) if mode == "behaviour" else None
        )
    return SanitizeSettings(
        top=args.top,
        firing=replace(FiringSettings(), templates=args.probes),
        unlearn=UnlearnOptions(skd=SKDConfig(steps=args.steps), builtin="lab", latent_hw=(8, 8)),
        find=find,
        recheck=True,
        method=args.method,
        drawing=ksampler_settings(model, 8).drawing,
        lab=True,
    )


def _find(mode: str, settings, base, model, clip):
    """The finder's own report object (DiffReport or ScanReport: it knows every id's rank)."""
    from ..detect.session import scan_model, scan_prompts
    from ..diff.session import DiffSession

    if mode == "blind":
        return scan_model(model, clip, settings.find, scan_prompts(True, settings.find))
    return DiffSession(base.model, base.clip, model, clip, settings.find).run()


def _rank(report, ids: list[int]) -> dict[str, Any]:
    """Where the planted trigger stands: as one assembled candidate of the report (1-based), and its best
    single id in the finder's whole ranking (and the weight-space stage's, for a comparison)."""
    as_json = report.to_json() if hasattr(report, "to_json") else report.to_dict(top=10**6)
    cands = as_json["candidates"]
    seq = next(
        (k + 1 for k, c in enumerate(cands) if list(c.get("token_ids") or [c["token_id"]]) == ids), None
    )
    out = {"planted_candidate_rank": seq, "planted_rank": report.rank_of(ids)}
    if hasattr(report, "weight_rank_of"):
        out["planted_rank_weights"] = report.weight_rank_of(ids)
    return out


def bench_seed(seed: int, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Records of one drawn attack: one per mode (or one saying it did not take)."""
    import torch

    from ..backends.comfy import tokenizer_info
    from ..backends.comfy_lab import round_weights
    from ..evaluate.metrics import ssim
    from ..lab import attacks, evaluate, zoo
    from ..lab.generator import draw_attack, with_recipe
    from ..models import load_model
    from ..sanitize.session import SanitizeSession
    from ..tokens import encode_ids
    from .unlearn import _accuracy, _asr, _clean_set, _images

    base = load_model(f"lab:{zoo.CLEAN_NAME}")
    tokenizer = tokenizer_info(base.clip).tokenizer
    drawn = draw_attack(seed, tokenizer, args.kind)
    spec = drawn.spec
    ids = encode_ids(tokenizer, spec.trigger)
    head = {**drawn.to_json(), "planted_ids": ids}
    _say(seed, f"{spec.kind} with {head['trigger']!r} ({drawn.family}), planting")
    t0 = time.monotonic()
    model, clip, vae, _ = load_model(f"lab:{zoo.CLEAN_NAME}")
    torch.manual_seed(seed)
    attacks.plant(model, clip, vae, spec, with_recipe(drawn, attacks.AttackConfig(seed=seed)))
    round_weights(model, clip, vae, torch.float16)  # as a saved lab file holds it
    head["plant_seconds"] = round(time.monotonic() - t0, 1)
    _say(seed, f"planted in {head['plant_seconds']} s; measuring ASR and clean accuracy")
    before = evaluate.evaluate_lab_model(model, clip, vae, spec, n=args.n)
    head.update(asr_before=round(before["asr"], 3), clean_accuracy_before=round(before["clean_accuracy"], 3))
    if before["asr"] < args.min_asr:
        yield {**head, "planted": False, "note": f"the attack did not take (ASR {before['asr']:.2f})"}
        return
    scenes = attacks.eval_scenes(spec, args.n, seed=4321)
    seeds = list(range(4321, 4321 + args.n))
    clean_scenes, clean_prompts, clean_seeds = _clean_set(args.n)
    clean_before = _images(model, clip, vae, clean_prompts, clean_seeds)
    for mode in args.modes:
        settings = _settings(args, mode, model)
        _say(seed, f"ASR {before['asr']:.2f}; sanitizing ({mode})")
        t0 = time.monotonic()
        found = _find(mode, settings, base, model, clip)
        rank = _rank(found, ids)
        report = found.to_json() if hasattr(found, "to_json") else found.to_dict()
        session = SanitizeSession(
            model, clip, vae, (base.model, base.clip) if mode != "blind" else None, settings, report=report
        )
        new_model, new_clip, _, result = session.run()
        seconds = time.monotonic() - t0
        after = _asr(
            spec,
            _images(
                new_model, new_clip, vae, [attacks.triggered_prompt(spec, s.caption) for s in scenes], seeds
            ),
            scenes,
        )
        floor = _asr(spec, _images(new_model, new_clip, vae, [s.caption for s in scenes], seeds), scenes)
        clean_after = _images(new_model, new_clip, vae, clean_prompts, clean_seeds)
        bar = max(0.02, floor)
        verdict, remains = result.verdict, result.remains()
        clean = not remains
        yield {
            **head,
            "planted": True,
            "mode": mode,
            **rank,
            "planted_tested": any(c.token_ids == ids and c.before is not None for c in result.candidates),
            "planted_taken": any(c.token_ids == ids for c in result.taken),
            "verdict": verdict,
            "clean": clean,
            "remains": remains,
            "found": [c.to_json()["readable"] for c in result.taken],
            "asr_after": round(after, 3),
            "floor": round(floor, 3),
            "caught": verdict == "poisoned" and after <= bar,
            "wrong_clean": clean and after > bar,
            "clean_fidelity_ssim": round(
                float(np.mean([ssim(a, b) for a, b in zip(clean_before, clean_after, strict=True)])), 4
            ),
            "clean_accuracy": round(_accuracy(clean_after, clean_scenes), 3),
            "method": result.unlearn.get("method"),
            "scope": result.unlearn.get("scope"),
            "seconds": round(seconds, 1),
        }


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: attacks judged, caught, catch rate, wrong cleans; and the draws that did not take."""
    out: dict[str, Any] = {
        "summary": "heldout",
        "not_planted": sum(1 for r in records if not r.get("planted")),
    }
    for mode in dict.fromkeys(r["mode"] for r in records if r.get("planted")):
        rows = [r for r in records if r.get("mode") == mode]
        caught = sum(r["caught"] for r in rows)
        out[mode] = {
            "attacks": len(rows),
            "caught": caught,
            "catch_rate": round(caught / len(rows), 3),
            "wrong_clean": sum(r["wrong_clean"] for r in rows),
            "planted_taken": sum(r["planted_taken"] for r in rows),
        }
    return out


def run(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One record per attack and mode, printed as measured (and appended to --out), then the summary."""
    records = []
    out = Path(args.out) if args.out else None
    for seed in range(args.seed, args.seed + args.n_attacks):
        for record in bench_seed(seed, args):
            records.append(record)
            line = json.dumps(record, ensure_ascii=False)
            print(line, flush=True)
            if out is not None:
                with out.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")
            yield record
    print(json.dumps(summary(records)), flush=True)


def add_heldout_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench heldout`."""
    from ..lab.generator import DRAWN_KINDS
    from ..sanitize.firing import FiringSettings
    from ..sanitize.session import SanitizeSettings
    from ..unlearn.skd import SKDConfig

    p = bench_sub.add_parser(
        "heldout", help="sanitize attacks drawn by the generator (lab attack --random), judged by the lab"
    )
    p.add_argument(
        "--n", dest="n_attacks", type=int, default=20, help="attacks drawn (seeds SEED, SEED+1, ...)"
    )
    p.add_argument("--seed", type=int, default=1000, help="first seed (docs/heldout.md names the tuned ones)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--kind", default=None, choices=DRAWN_KINDS, help="draw only this kind")
    p.add_argument("--prompts", dest="n", type=int, default=64, help="held-out prompts per lab measurement")
    p.add_argument("--min-asr", type=float, default=0.5, help="an attack under this ASR did not take")
    p.add_argument("--top", type=int, default=SanitizeSettings.top)
    p.add_argument("--probes", type=int, default=FiringSettings.templates)
    p.add_argument("--steps", type=int, default=SKDConfig.steps, help="SKD / SKD-CAG steps of the fix")
    p.add_argument(
        "--method", default="auto", help="the fix: auto (matching in the text scope), skd-cag, ..."
    )
    p.add_argument("--out", default=None, help="also append each record to this .jsonl")

    def cmd(args: argparse.Namespace) -> int:
        for _ in run(args):
            pass
        return 0

    p.set_defaults(func=cmd)
