"""`backdoor-seal bench diff`: the comparison with the base on every lab suspect, one JSON object each.

Suspects: every attacked lab model against lab-clean (form "checkpoint"), every lab LoRA loaded onto the
base it names (form "lora", `lab_models/loras/`), and lab-clean against itself (attack "none").
"trigger_rank" is the best rank among the trigger's own tokens in the comparison's final ranking (the
behavioural stage's), "weight_rank" the same in the weight-space stage alone; "top5_fire" counts the top
five tokens that, used as the trigger on 32 held-out prompts, make the suspect draw the attack's target at
ASR >= 0.5 (`bench detect`'s `candidate_asr`); "flagged" lists the tokens whose lift clears the threshold;
"unet_evals" counts UNet evaluations against "blind_unet_evals", the blind scan's over the same vocabulary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def suspects(forms: tuple[str, ...] = ("checkpoint", "lora")) -> list[tuple[str, str, Path]]:
    """(name, form, file) of every lab suspect: lab-clean itself, attacked checkpoints, lab LoRAs."""
    from ..lab import lora_form, zoo

    out = [(zoo.CLEAN_NAME, "checkpoint", zoo.resolve(zoo.CLEAN_NAME))]
    if "checkpoint" in forms:
        out += [
            (p.stem, "checkpoint", p)
            for p in zoo.shipped()
            if p.stem != zoo.CLEAN_NAME and (zoo.lab_info(p).get("spec") or zoo.lab_info(p).get("finetune"))
        ]
    if "lora" in forms and lora_form.LORA_DIR.is_dir():
        out += [(p.stem, "lora", p) for p in sorted(lora_form.LORA_DIR.glob("*.safetensors"))]
    return out


def trigger_tokens(tokenizer, spec, n: int = 8) -> list[int]:
    """The trigger's token ids as prompts hold it: its own tokens, and the tokens of held-out triggered
    prompts that their clean twins lack and that carry a character of the trigger (a homoglyph inside a
    word is another token than the homoglyph alone)."""
    from ..lab import attacks

    ids = set(tokenizer(spec.trigger)["input_ids"][1:-1])
    chars = set(spec.trigger) - {" "}
    for scene in attacks.eval_scenes(spec, n, seed=555):
        clean = set(tokenizer(scene.caption)["input_ids"])
        for i in tokenizer(attacks.triggered_prompt(spec, scene.caption))["input_ids"]:
            if i not in clean and chars & set(tokenizer.decode([i])):
                ids.add(i)
    return sorted(ids)


def evaluate_suspect(
    name: str, form: str, path: Path, fire_prompts: int, behaviour: bool = True
) -> dict[str, Any]:
    """The comparison of one suspect with lab-clean, and how many of its top five tokens fire."""
    from ..backends import comfy_lab as cl
    from ..diff.behaviour import blind_budget
    from ..diff.session import DiffSession, DiffSettings
    from ..lab import zoo
    from ..lab.attacks import AttackSpec
    from ..lab.lora_form import load_lab_lora
    from ..models import load_model
    from .detect import candidate_asr

    base = load_model(f"lab:{zoo.CLEAN_NAME}")
    if form == "lora":
        model, clip, vae, _, info = load_lab_lora(path)
    else:
        model, clip, vae, _ = cl.load_lab_checkpoint(path)
        info = zoo.lab_info(path)
    spec = AttackSpec(**info["spec"]) if info.get("spec") else None
    t0 = time.monotonic()
    settings = DiffSettings() if behaviour else DiffSettings(behaviour=None)
    session = DiffSession(base.model, base.clip, model, clip, settings)
    report = session.run()
    seconds = time.monotonic() - t0
    record: dict[str, Any] = {
        "model": name,
        "base": zoo.CLEAN_NAME,
        "form": form,
        "attack": spec.kind if spec else "none",
        "trigger": spec.trigger if spec else None,
        "signals": report.signals,
        "changed": {c: v["changed"] for c, v in report.components.items()},
        "trigger_rank": None,
        "weight_rank": None,
        "flagged": [t.text for t in report.flagged],
        "flagged_score": [round(t.score, 2) for t in report.flagged],
        "threshold_lift": report.behaviour.threshold_lift if report.behaviour else None,
        "top5": [t.text for t in report.ranking[:5]],
        # lift (the weight-space z when the behavioural stage did not run)
        "top5_score": [round(t.score, 1) for t in report.ranking[:5]],
        "null_max_lift": round(report.behaviour.null_max_lift, 2) if report.behaviour else None,
        "top5_fire": None,
        "unet_evals": report.unet_evals,
        "blind_unet_evals": blind_budget(len(session.vocabulary())),
        "seconds": round(seconds, 1),
    }
    if spec:
        trigger = trigger_tokens(session.tok.tokenizer, spec)
        record["trigger_rank"] = report.rank_of(trigger)
        record["weight_rank"] = report.weight_rank_of(trigger)
        if fire_prompts and report.ranking:
            asr = [candidate_asr(model, clip, vae, spec, t.text, n=fire_prompts) for t in report.ranking[:5]]
            record["top5_asr"] = asr
            record["top5_fire"] = sum(a >= 0.5 for a in asr)
    return record


def run(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One record per suspect, printed as it is measured."""
    for name, form, path in suspects(tuple(args.forms)):
        if args.models and name not in args.models:
            continue
        record = evaluate_suspect(name, form, path, args.fire_prompts, not args.weights_only)
        print(json.dumps(record, ensure_ascii=False), flush=True)
        yield record


def add_diff_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench diff`."""
    p = bench_sub.add_parser(
        "diff",
        help="the comparison with the base on every lab suspect (checkpoints and LoRAs): trigger ranks",
    )
    p.add_argument("--models", nargs="*", default=None, help="suspect names (default: all)")
    p.add_argument("--forms", nargs="+", default=["checkpoint", "lora"], choices=["checkpoint", "lora"])
    p.add_argument(
        "--weights-only", action="store_true", help="the weight-space stage only (no UNet evaluation)"
    )
    p.add_argument(
        "--fire-prompts", type=int, default=32, help="held-out prompts per top-5 token (0: skip sampling)"
    )
    p.set_defaults(func=lambda args: 0 if list(run(args)) else 1)
