"""`backdoor-seal evaluate`: attack success before and after removal, and clean fidelity, headless."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..models import SPEC_HELP, add_model_argument, add_sampling_arguments, positive_int
from ..triggers import PLACEMENTS
from .metrics import LAB_DETECTORS


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate` under the main parser."""
    p = sub.add_parser(
        "evaluate",
        help="compare a model with what removal made of it: attack success before/after, clean fidelity",
    )
    add_model_argument(p, f"the original: {SPEC_HELP}")
    p.add_argument("--trigger", required=True, help="the trigger; U+XXXX spells invisible characters")
    after = p.add_mutually_exclusive_group(required=True)
    after.add_argument("--unlearned", default=None, help=f"the unlearned model: {SPEC_HELP}")
    after.add_argument("--lora", default=None, help="a LoRA (.safetensors) applied to the original")
    after.add_argument("--sau-profile", default=None, help="SAU sampling of the original with this profile")
    p.add_argument(
        "--lab-detector",
        choices=["auto", "none", *LAB_DETECTORS],
        default="auto",
        help="judge with a lab attack's exact detector (auto: the lab model's own attack)",
    )
    p.add_argument("--target", default=None, help="an image of what the backdoor draws (PNG/JPEG), the judge")
    p.add_argument(
        "--prompts", default=None, help="clean test prompts, one per line, before the built-in set"
    )
    p.add_argument("--count", type=positive_int, default=16, help="prompt pairs to sample")
    p.add_argument("--placement", choices=["auto", *PLACEMENTS], default="auto")
    add_sampling_arguments(p)
    p.add_argument(
        "--out", default=None, help="a folder for report.json and the figures (files never replaced)"
    )
    p.set_defaults(func=cmd_evaluate)


def _target_image(path: str | None):
    if path is None:
        return None
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except (UnidentifiedImageError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not an image PIL can read ({e})") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Sample both, judge, print the report as JSON (and write it with the figures to --out)."""
    from ..backends.comfy_train import apply_lora
    from ..models import is_lab_model, load_model, sampling_from_args
    from ..safetensors_io import load_checkpoint, write_json
    from ..sau.profile import SAUProfile
    from ..triggers import parse_trigger
    from .figures import FIGURE_FILES, save_figures
    from .metrics import make_judge
    from .session import EvaluationOptions, EvaluationSession

    out = Path(args.out) if args.out else None
    if out is not None:  # refuse before any work: every file --out would get must be new
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out}: a file; give --out a folder (nothing is overwritten)")
        taken = [n for n in ("report.json", *FIGURE_FILES) if (out / n).exists()]
        if taken:
            raise FileExistsError(f"{out} already holds {', '.join(taken)}: choose another --out")
    t0 = time.monotonic()
    model, clip, vae, info = load_model(args.model, args.clip_skip)
    trigger = parse_trigger(args.trigger)
    detector = args.lab_detector
    if detector == "auto":
        detector = info.get("attack", "none") if args.target is None else "none"
        detector = detector if detector in LAB_DETECTORS else "none"
    if detector == "none" and args.target is None:
        raise ValueError(
            "no way to tell whether the backdoor fired: give --target (an image of what it draws), or "
            f"--lab-detector for a lab model ({args.model} is not one)"
        )
    judge = make_judge(detector, _target_image(args.target))
    unlearned_model = unlearned_clip = profile = None
    if args.unlearned:
        unlearned_model, unlearned_clip, _, _ = load_model(args.unlearned, args.clip_skip)
    elif args.lora:
        lora, _ = load_checkpoint(args.lora)
        try:
            unlearned_model, unlearned_clip = apply_lora(model, clip, lora)
        except ValueError as e:
            raise ValueError(f"{args.lora}: {e}") from None
    else:
        profile = SAUProfile.load(args.sau_profile)
    opts = EvaluationOptions(args.count, is_lab_model(model), args.placement, sampling_from_args(args, model))
    user_prompts = Path(args.prompts).read_text(encoding="utf-8") if args.prompts else ""
    session = EvaluationSession(
        model, clip, vae, trigger, judge, user_prompts, opts, unlearned_model, unlearned_clip, profile
    )
    report = session.run()
    data = session.report_json(report)
    data["seconds_total"] = round(time.monotonic() - t0, 1)
    if out is not None:
        data["figures"] = [p.name for p in save_figures(report, out)]
        write_json(out / "report.json", data)
    print(json.dumps(data, ensure_ascii=False))
    return 0
