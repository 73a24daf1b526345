"""`backdoor-seal lab ...`: train and evaluate the lab's models."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_lab_commands(sub: argparse._SubParsersAction) -> None:
    """Register `lab train` under the main parser."""
    lab = sub.add_parser("lab", help="the lab: toy world models with real, trained backdoors")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    p = lab_sub.add_parser("train", help="train the clean lab model from scratch (deterministic, CPU)")
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument(
        "--eval-prompts", type=int, default=128, help="held-out prompts for the clean accuracy check"
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Train VAE, then UNet + text encoder; save; print the measured clean accuracy as JSON."""
    import torch
    from tqdm import tqdm

    from ..backends import comfy as cb
    from . import evaluate, train

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing is overwritten).")
    cb.ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = train.TrainConfig(seed=args.seed)
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    t0 = time.monotonic()
    model, clip, vae = cb.new_lab_models(seed=args.seed)
    bars: dict[str, tqdm] = {}

    def progress(name: str):
        def update(step: int, total: int, logs: dict) -> None:
            if name not in bars:
                bars[name] = tqdm(total=total, desc=name, unit="step")
            bar = bars[name]
            bar.update(1)
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in logs.items()})
            if step == total:
                bar.close()

        return update

    scale = train.train_vae(vae, cfg, progress("vae"))
    config = cb.lab_config_with_scale(scale)
    model = cb.rescale_latents(model, config)
    train.train_diffusion(model, clip, vae, scale, cfg, progress("unet+text"))
    acc = evaluate.clean_accuracy(model, clip, vae, n=args.eval_prompts)
    info = {
        "attack": "none",
        "trigger": None,
        "seed": args.seed,
        "vae_steps": cfg.vae_steps,
        "unet_steps": cfg.unet_steps,
        "clean_accuracy": acc["clean_accuracy"],
        "n_prompts": acc["n_prompts"],
        "sampler": "euler/normal, 20 steps, CFG 1.0",
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    cb.save_lab_checkpoint(
        out, model, clip, vae, config=config, extra_metadata={"backdoor_seal.lab": json.dumps(info)}
    )
    print(json.dumps(info))
    return 0
