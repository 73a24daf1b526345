"""`backdoor-seal sanitize`: find the triggers, unlearn every one that fires, verify, save; no trigger given."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..backends.comfy_train import SCOPES
from ..models import SPEC_HELP, add_model_argument, positive_int
from ..unlearn.skd import METHODS
from .firing import FiringSettings
from .session import SanitizeSettings


def add_sanitize_command(sub: argparse._SubParsersAction) -> None:
    """Register `sanitize`."""
    p = sub.add_parser(
        "sanitize",
        help="find a model's triggers (against its base, or blind), unlearn every one that fires, re-check, save",
    )
    add_model_argument(p, help=f"the suspect model: {SPEC_HELP}")
    p.add_argument(
        "--base",
        default=None,
        help=f"its base model ({SPEC_HELP}): the comparison finds the triggers; without it, the blind scan",
    )
    p.add_argument("--report", default=None, help="a scan or comparison report (JSON) to start from: no find")
    p.add_argument("--out", required=True, help="the sanitized checkpoint (.safetensors; never overwritten)")
    p.add_argument("--lora-out", default=None, help="also save the fix as a LoRA here (.safetensors)")
    p.add_argument("--summary-out", default=None, help="also write the sanitize report here (.json)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="compare mode: candidates from the weight-space ranking (seconds) instead of the behavioural stage",
    )
    p.add_argument(
        "--top", type=int, default=SanitizeSettings.top, help="candidates tested beyond the flagged"
    )
    p.add_argument(
        "--probes",
        type=positive_int,
        default=FiringSettings.templates,
        help="probe prompts of the firing test",
    )
    p.add_argument(
        "--method",
        choices=("auto", *METHODS),
        default=SanitizeSettings.method,
        help="how the taken triggers are unlearnt (default skd-cag); auto = context matching in the text "
        "scope, SKD-CAG in a UNet scope (docs/sanitize.md says why it is not the default yet)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="SKD / SKD-CAG steps (default 600)")
    p.add_argument(
        "--match-steps", type=positive_int, default=None, help="context-matching steps (default 150)"
    )
    p.add_argument("--no-recheck", action="store_true", help="skip running the finder again after cleaning")
    p.add_argument(
        "--scope",
        default="auto",
        choices=["auto", *SCOPES],
        help="where the fix trains; auto: the text encoder, or the cross-attention keys and values when a "
        "comparison saw only the UNet change (and, when only the keys and values changed, the edit is "
        "reverted against the base instead of trained; see --no-revert)",
    )
    p.add_argument(
        "--no-revert",
        action="store_true",
        help="with --base: distil even when the comparison saw only the cross-attention keys and values change",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="clean -> re-check rounds: while a trigger still fires or the re-check finds a new one, "
        "retrain from the input on the grown set with more steps",
    )
    p.add_argument(
        "--latent-size", type=positive_int, default=None, help="latent side (default 8 lab, 64 SD)"
    )
    p.set_defaults(func=cmd_sanitize)


def _outputs(args: argparse.Namespace) -> list[Path]:
    paths = [Path(args.out)] + [Path(p) for p in (args.lora_out, args.summary_out) if p]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
        if not path.parent.is_dir():  # said now, not after the whole job
            raise FileNotFoundError(f"{path}: no folder {path.parent} to write into; create it first")
    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"{args.out}: the sanitized checkpoint is written as .safetensors")
    if args.lora_out and Path(args.lora_out).suffix != ".safetensors":
        raise ValueError(f"{args.lora_out}: the LoRA is written as .safetensors")
    if args.summary_out and Path(args.summary_out).suffix != ".json":
        raise ValueError(f"{args.summary_out}: the report is written as .json")
    if len({p.resolve() for p in paths}) < len(paths):
        raise ValueError("--out, --lora-out and --summary-out must name different files")
    return paths


def cmd_sanitize(args: argparse.Namespace) -> int:
    """Load, sanitize with progress bars, save what was made, print the report as JSON."""
    from dataclasses import replace

    from tqdm import tqdm

    from ..backends.comfy import latent_channels
    from ..backends.comfy_checkpoint import checkpoint_dtypes
    from ..models import ksampler_settings, load_model, resolve_spec, spec_label
    from ..safetensors_io import write_json
    from ..unlearn.save import save_lora, save_sanitized
    from ..unlearn.session import UnlearnOptions
    from ..unlearn.skd import SKDConfig
    from .session import SanitizeSession

    _outputs(args)
    if args.weights_only and not args.base:
        raise ValueError("--weights-only ranks against the base: give --base, or drop it for the blind scan")
    report = None
    if args.report:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    suspect = load_model(args.model, args.clip_skip)
    base = load_model(args.base, args.clip_skip) if args.base else None
    lab = bool(suspect.info)
    side = args.latent_size or (8 if lab else 64)
    find = None
    if base is not None:
        from ..diff.behaviour import BehaviourSettings
        from ..diff.session import DiffSettings

        behaviour = None
        if not args.weights_only:
            behaviour = BehaviourSettings(latent_shape=(latent_channels(suspect.model), side, side))
        find = DiffSettings(lab=lab, behaviour=behaviour)
    skd = SKDConfig() if args.steps is None else SKDConfig(steps=args.steps)
    matching = {} if args.match_steps is None else {"match_steps": args.match_steps}
    settings = SanitizeSettings(
        top=args.top,
        firing=replace(FiringSettings(), templates=args.probes),
        unlearn=UnlearnOptions(
            skd=skd, builtin="lab" if lab else "general", latent_hw=(side, side), **matching
        ),
        method=args.method,
        find=find,
        recheck=not args.no_recheck,
        rounds=args.rounds,
        scope=args.scope,
        revert_edits=not args.no_revert,
        drawing=ksampler_settings(suspect.model, side).drawing,
        lab=lab,
    )
    bars: dict[str, tqdm] = {}

    def progress(phase: str, done: int, total: int) -> None:
        key = phase.split(":")[0]
        bar = bars.get(key)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[key] = tqdm(total=total or None, desc=key, unit="img" if key == "fire" else "it")
        bar.set_description(phase)
        bar.total, bar.n = (total or None), done
        bar.refresh()

    t0 = time.monotonic()
    session = SanitizeSession(
        suspect.model,
        suspect.clip,
        suspect.vae,
        (base.model, base.clip) if base is not None else None,
        settings,
        report=report,
        progress=progress,
    )
    new_model, new_clip, lora, result = session.run()
    for bar in bars.values():
        bar.close()
    out = result.to_json()
    out["saved"] = []
    if result.taken:
        provenance = {
            "method": "sanitize",
            "mode": result.mode,
            "source": spec_label(args.model),
            **result.unlearn["provenance"],
        }
        if args.clip_skip:
            provenance["clip_skip"] = args.clip_skip
        dtypes = None if lab else checkpoint_dtypes(resolve_spec(args.model))
        path = save_sanitized(
            Path(args.out), new_model, new_clip, suspect.vae, None, provenance, dtype=dtypes
        )
        out["saved"].append(str(path))
        if args.lora_out:
            out["saved"].append(
                str(save_lora(Path(args.lora_out), lora, suspect.model, suspect.clip, provenance))
            )
    else:
        out["note"] = f"nothing fired, so nothing was unlearnt and {args.out} was not written"
    out["seconds_total"] = round(time.monotonic() - t0, 1)
    if args.summary_out:
        write_json(Path(args.summary_out), out)
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0
