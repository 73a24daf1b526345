"""`backdoor-seal unlearn`: unlearn a known trigger headless and save the sanitized checkpoint."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..backends.comfy_train import SCOPES
from ..models import add_model_argument
from ..prompts import BUILTIN_SETS
from ..triggers import PLACEMENTS
from .save import LORA_LAYOUTS
from .session import DEFAULT_METHOD, UnlearnOptions
from .skd import INPUTS, METHODS, PRECISIONS, SCHEDULES, TARGETS, SKDConfig


def add_unlearn_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `unlearn` and `bench unlearn`: the method and its hyper-parameters."""
    p.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="match: context matching of the text encoder (no UNet pass; the default, text scopes only); "
        "skd / skd-cag: the paper's self-distillation through the UNet (any scope)",
    )
    p.add_argument("--scope", choices=SCOPES, default=UnlearnOptions.scope, help="which weights are trained")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; 0 trains a full delta")
    p.add_argument("--steps", type=int, default=SKDConfig.steps)
    p.add_argument("--lr", type=float, default=SKDConfig.lr)
    p.add_argument(
        "--lr-schedule",
        choices=SCHEDULES,
        default=None,
        help="learning rate over the run: constant (the paper; default) or cosine (decayed to 0 by the last step)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the attention loss (SKD-CAG)")
    p.add_argument(
        "--target", choices=TARGETS, default="black", help="attention target of the trigger tokens"
    )
    p.add_argument("--timestep-weighting", action="store_true", help="scale L_attn by t/T (the paper)")
    p.add_argument(
        "--retain",
        type=float,
        default=SKDConfig.retain,
        help="share of batch items that distil a clean prompt onto itself (keeps clean outputs; not in the paper)",
    )
    p.add_argument(
        "--inputs",
        choices=INPUTS,
        default="noise",
        help="x_t: pure noise (the paper) or states of the teacher's own sampling of the clean prompts",
    )
    p.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on a GPU, fp32 on a CPU"
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="first edit the cross-attention keys and values in closed form so triggered prompts project "
        "like their clean twins (scopes that train attn2 k/v: attn2-kv, attn2-kv+text, attn2, attention, unet)",
    )
    p.add_argument(
        "--match-steps",
        type=int,
        default=UnlearnOptions.match_steps,
        help="steps of --method match (one text-encoder pass each; docs/unlearn.md); --steps counts SKD's",
    )
    p.add_argument("--seed", type=int, default=0)


def add_unlearn_command(sub: argparse._SubParsersAction) -> None:
    """Register `unlearn` under the main parser."""
    p = sub.add_parser("unlearn", help="unlearn a known trigger (SKD / SKD-CAG) and save the sanitized model")
    add_model_argument(p)
    p.add_argument(
        "--trigger",
        action="append",
        default=None,
        help="a trigger (U+XXXX spells invisible characters); repeat it to unlearn a set in one run",
    )
    p.add_argument(
        "--report",
        default=None,
        help="or take the set from a report (JSON): a sanitize report's triggers, a scan's or comparison's "
        "flagged tokens, a prompt report's best supported",
    )
    p.add_argument("--out", required=True, help="sanitized checkpoint .safetensors (never overwritten)")
    p.add_argument("--lora-out", default=None, help="also save the LoRA here (.safetensors)")
    p.add_argument(
        "--lora-layout",
        choices=LORA_LAYOUTS,
        default="kohya",
        help="kohya: lora_unet_* / lora_te*_* with ss_* metadata (A1111, Forge, kohya, diffusers, ComfyUI); "
        "comfy: ComfyUI's own key names",
    )
    p.add_argument("--prompts", default=None, help="a text file of clean prompts, one per line")
    p.add_argument(
        "--builtin",
        choices=BUILTIN_SETS,
        default=None,
        help="built-in clean prompts (default: lab for lab models, general otherwise)",
    )
    p.add_argument("--builtin-count", type=int, default=64)
    p.add_argument(
        "--placement",
        choices=["auto", *PLACEMENTS],
        default="auto",
        help="where the trigger goes; auto: a lab model's own attack insertion, a homoglyph replaces "
        "its twin, anything else goes first",
    )
    p.add_argument(
        "--latent-size", type=int, default=None, help="training latent side (default 8 lab, 64 SD)"
    )
    add_unlearn_arguments(p)
    p.set_defaults(func=cmd_unlearn)


def options_from_args(args: argparse.Namespace, lab: bool):
    """UnlearnOptions from parsed arguments."""
    side = getattr(args, "latent_size", None) or (8 if lab else 64)
    return UnlearnOptions(
        skd=SKDConfig(
            method=args.method,
            alpha=args.alpha,
            target=args.target,
            timestep_weighting=args.timestep_weighting,
            steps=args.steps,
            lr=SKDConfig.lr if args.lr is None else args.lr,  # bench: None until a recipe fills it
            schedule=getattr(args, "lr_schedule", None) or SKDConfig.schedule,
            batch=args.batch,
            seed=args.seed,
            precision=args.precision,
            retain=getattr(args, "retain", SKDConfig.retain),
            inputs=getattr(args, "inputs", "noise"),
        ),
        scope=args.scope or UnlearnOptions.scope,
        rank=args.rank,
        placement=getattr(args, "placement", "auto"),
        builtin=getattr(args, "builtin", None) or ("lab" if lab else "general"),
        builtin_count=getattr(args, "builtin_count", 64),
        latent_hw=(side, side),
        warm_start=bool(getattr(args, "warm_start", False)),
        match_steps=getattr(args, "match_steps", UnlearnOptions.match_steps),
    )


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Unlearn, save the sanitized checkpoint (and LoRA), print a JSON summary."""
    from tqdm import tqdm

    from ..backends.comfy_checkpoint import checkpoint_dtypes
    from ..lab.attacks import insertion_for
    from ..models import load_model, resolve_spec, spec_label
    from ..triggers import insertion, parse_trigger, triggers_from
    from .save import save_lora, save_sanitized
    from .session import UnlearnSession

    out = Path(args.out)
    for target in (out, Path(args.lora_out) if args.lora_out else None):
        if target is not None and target.suffix != ".safetensors":
            raise ValueError(f"{target}: outputs are .safetensors files; give a name ending in .safetensors")
        if target is not None and target.exists():
            raise FileExistsError(f"{target} already exists; give a new name (nothing is overwritten)")
        if target is not None and not target.parent.is_dir():  # said now, not after the training
            raise FileNotFoundError(f"{target}: no folder {target.parent} to write into; create it first")
    if args.lora_out and Path(args.lora_out).resolve() == out.resolve():
        raise ValueError(f"--out and --lora-out are both {out}; give each its own file")
    if bool(args.trigger) == bool(args.report):
        raise ValueError("give the trigger(s) with --trigger, or a report with --report (one of them)")
    report = json.loads(Path(args.report).read_text(encoding="utf-8")) if args.report else None
    # typed triggers as given (each checked by the session); a report's set chosen on evidence
    triggers = (
        dict.fromkeys(map(parse_trigger, args.trigger)) if args.trigger else triggers_from(None, report)
    )
    model, clip, vae, info = load_model(args.model, args.clip_skip)
    user_prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines() if args.prompts else []
    opts = options_from_args(args, lab=bool(info))
    insert = {}
    for trigger, placements in triggers.items():
        if placements:  # where a sanitize report saw it fire
            insert[trigger] = insertion(placements, trigger, opts.skd.seed)
        elif args.placement == "auto" and info:  # a lab model's own attack insertion
            insert[trigger] = insertion_for(info, trigger)
    session = UnlearnSession(model, clip, list(triggers), user_prompts, opts, insert=insert or None)
    bar = tqdm(total=session.total_steps, desc=opts.skd.method, unit="step")

    def progress(step: int, total: int, losses: dict) -> None:
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})

    t0 = time.monotonic()
    result = session.run(progress)
    bar.close()
    new_model, new_clip, lora = session.outputs()
    provenance = session.provenance()
    provenance["source"] = spec_label(args.model)
    if args.clip_skip:  # the fix is for this encoding: draw with the same CLIPSetLastLayer
        provenance["clip_skip"] = args.clip_skip
    # ComfyUI on CPU holds weights in fp32: the input file's header says what each part was stored in
    dtypes = None if info else checkpoint_dtypes(resolve_spec(args.model))
    saved = [str(save_sanitized(out, new_model, new_clip, vae, None, provenance, dtype=dtypes))]
    if args.lora_out:
        lora_path = save_lora(Path(args.lora_out), lora, model, clip, provenance, layout=args.lora_layout)
        saved.append(str(lora_path))
    print(
        json.dumps(
            {
                "saved": saved,
                "method": opts.skd.method,
                "steps": result.steps,
                "final_loss": result.losses[-1],
                "train_seconds": round(result.seconds, 1),
                "seconds": round(time.monotonic() - t0, 1),
                "training_prompts": len(session.pairs),
                "triggers": len(triggers),
            }
        )
    )
    return 0
