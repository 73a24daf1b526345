"""`backdoor-seal sau`: estimate an SAU profile headless, and optionally draw prompts with it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..models import add_model_argument, add_sampling_arguments, positive_int
from ..triggers import PLACEMENTS
from .algebra import SIGNALS, WEIGHTINGS, SAUSettings


def add_sau_command(sub: argparse._SubParsersAction) -> None:
    """Register `sau` under the main parser."""
    p = sub.add_parser(
        "sau", help="estimate an SAU profile of a known trigger (no training) and draw prompts with it"
    )
    add_model_argument(p)
    p.add_argument("--trigger", required=True, help="the trigger; U+XXXX spells invisible characters")
    p.add_argument("--out", required=True, help="the profile .safetensors (never overwritten)")
    p.add_argument("--prompts", default=None, help="clean prompts, one per line, before the built-in set")
    p.add_argument("--pairs", type=positive_int, default=16, help="prompt pairs sampled for the profile")
    p.add_argument("--placement", choices=["auto", *PLACEMENTS], default="auto")
    p.add_argument("--signal", choices=SIGNALS, default=SAUSettings.signal)
    p.add_argument("--weighting", choices=WEIGHTINGS, default=SAUSettings.weighting)
    p.add_argument("--strength", type=float, default=SAUSettings.strength)
    add_sampling_arguments(p)
    p.add_argument("--draw", action="append", default=[], help="a prompt to draw with SAU (repeatable)")
    p.add_argument("--images", default=None, help="folder for the drawn images (PNG, never overwritten)")
    p.set_defaults(func=cmd_sau)


def cmd_sau(args: argparse.Namespace) -> int:
    """Estimate and save the profile; draw each --draw prompt with SAU; print a JSON summary."""
    from ..images import save_png
    from ..models import load_model, prompt_set, sampling_from_args
    from ..triggers import parse_trigger
    from .session import SAUOptions, SAUSession, sau_drawer

    out = Path(args.out)
    if out.exists() or out.suffix != ".safetensors":
        raise FileExistsError(f"{out}: give a new .safetensors name (nothing is overwritten)")
    if args.draw and not args.images:
        raise ValueError("--draw needs --images, the folder the drawn images go to")
    t0 = time.monotonic()
    model, clip, vae, _ = load_model(args.model, args.clip_skip)
    trigger = parse_trigger(args.trigger)
    opts = SAUOptions(
        settings=SAUSettings(signal=args.signal, weighting=args.weighting, strength=args.strength),
        pairs=args.pairs,
        builtin=prompt_set(model),
        placement=args.placement,
        sampling=sampling_from_args(args, model),
    )
    user_prompts = Path(args.prompts).read_text(encoding="utf-8") if args.prompts else ""
    session = SAUSession(model, clip, trigger, user_prompts, opts)
    profile = session.run()
    profile.save(out)
    summary = {"profile": str(out), "note": session.describe(profile), "pairs": profile.pairs, "images": []}
    if args.draw:
        draw = sau_drawer(model, clip, vae, profile, *opts.sampling.drawing)
        prompts = [parse_trigger(p) for p in args.draw]
        for k, image in enumerate(draw(prompts, [(args.seed + i) % 2**64 for i in range(len(prompts))])):
            summary["images"].append(str(save_png(image, Path(args.images) / f"sau_{k:03d}.png")))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(summary, ensure_ascii=False))
    return 0
