"""`backdoor-seal diff`: compare a suspect checkpoint, or a LoRA on the base, with the base; JSON out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models import SPEC_HELP, positive_int
from .session import DiffSettings


def add_diff_command(sub: argparse._SubParsersAction) -> None:
    """Register `diff`."""
    p = sub.add_parser(
        "diff",
        help="compare a fine-tune or a LoRA with its base: what changed, and which tokens the change is about",
    )
    p.add_argument("--base", required=True, help=f"the base model: {SPEC_HELP}")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help=f"the suspect model: {SPEC_HELP}")
    which.add_argument("--lora", help="a LoRA file (.safetensors) to compare, loaded onto the base")
    p.add_argument("--lora-strength", type=float, default=1.0, help="as LoraLoader's strength (both parts)")
    p.add_argument(
        "--clip-skip", type=int, default=0, help="encode as CLIPSetLastLayer(-N) does (both models)"
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="skip the behavioural stage: the weight-space ranking only, in seconds, no UNet evaluation",
    )
    p.add_argument(
        "--latent-size", type=positive_int, default=None, help="behavioural stage's latent side (default 8)"
    )
    p.add_argument("--top", type=positive_int, default=DiffSettings.top, help="ranked tokens reported")
    p.add_argument("--out", default=None, help="also write the report here (JSON; never overwrites)")
    p.add_argument(
        "--evidence",
        default=None,
        help="write the flagged tokens' evidence here (PNG: base and suspect, same seed, without and with "
        "each token; never overwrites)",
    )
    p.set_defaults(func=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    """Load both, compare with a progress bar, print the report as JSON."""
    from tqdm import tqdm

    from ..backends.comfy import latent_channels
    from ..models import load_model, resolve_spec
    from ..safetensors_io import load_checkpoint, write_json
    from .behaviour import BehaviourSettings
    from .session import DiffSession

    out = Path(args.out) if args.out else None
    evidence = Path(args.evidence) if args.evidence else None
    for path in (out, evidence):
        if path is not None and path.exists():
            raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
    if evidence is not None and evidence.suffix.lower() != ".png":
        raise ValueError(f"{evidence.name}: the evidence is written as a .png")
    if evidence is not None and args.weights_only:
        raise ValueError("--evidence draws flagged tokens, which only the behavioural stage flags: drop one")
    if out is not None and evidence is not None and out.resolve() == evidence.resolve():
        raise ValueError(f"{out}: --out and --evidence name the same file; give each its own")
    if out is not None and out.suffix.lower() != ".json":
        raise ValueError(f"{out.name}: the report is written as .json")
    if args.model and args.lora_strength != 1.0:
        raise ValueError("--lora-strength applies to --lora; a --model checkpoint is compared as it is")
    base = load_model(args.base, args.clip_skip)
    if args.lora:
        from ..backends.comfy_train import apply_lora

        path = resolve_spec(args.lora)
        try:
            model, clip = apply_lora(base.model, base.clip, load_checkpoint(path)[0], args.lora_strength)
        except ValueError as e:
            raise ValueError(f"{path.name}: {e}") from None
        suspect = {"lora": path.name}
    else:
        loaded = load_model(args.model, args.clip_skip)
        model, clip = loaded.model, loaded.clip
        suspect = {"model": args.model}
    bar = tqdm(total=1, desc="diff", unit="batch")

    def progress(done: int, total: int, stage: str) -> None:
        bar.set_description(f"diff: {stage}")
        bar.total, bar.n = total, done
        bar.refresh()

    behaviour = None
    if not args.weights_only:
        side = args.latent_size or 8
        behaviour = BehaviourSettings(latent_shape=(latent_channels(base.model), side, side))
    settings = DiffSettings(top=args.top, behaviour=behaviour)
    session = DiffSession(base.model, base.clip, model, clip, settings)
    report = session.run(progress)
    bar.close()
    summary = {"base": args.base, **suspect, **report.to_json()}
    if report.behaviour is None:  # say it in words, not only by poisoned: null
        summary["note"] = "weight space only: ranked, not judged (drop --weights-only to flag tokens)"
    if out is not None:
        write_json(out, summary)
    if evidence is not None:
        from ..images import image_to_uint8, save_png
        from .evidence import evidence_for

        side = args.latent_size or 8
        grid = evidence_for(
            summary, (base.model, base.clip, base.vae), (model, clip, base.vae), session.lab, side
        )
        save_png(image_to_uint8(grid), evidence)
        summary["evidence"] = str(evidence)
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0
