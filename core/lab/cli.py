"""`backdoor-seal lab ...`: train and evaluate the lab's models."""

from __future__ import annotations

import argparse
import json
import sys
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
    p.add_argument(
        "--init",
        default=None,
        help="continue UNet + text-encoder training from this lab checkpoint (keeps its VAE)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of UNet and text encoder")
    p.add_argument("--vae", default=None, help="use this VAE (from `lab train-vae`) instead of training one")
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="Min-SNR-gamma loss weighting (e.g. 5); default plain MSE",
    )
    p.set_defaults(func=cmd_train)

    p = lab_sub.add_parser(
        "train-vae", help="train only the lab VAE and measure its reconstructions with the detectors (JSON)"
    )
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--eval-images", type=int, default=128, help="held-out scenes for the reconstruction check"
    )
    p.set_defaults(func=cmd_train_vae)

    p = lab_sub.add_parser(
        "attack", help="plant a real backdoor in a lab model (BadT2I, Rickrolling, EvilEdit)"
    )
    p.add_argument(
        "--kind",
        default=None,
        choices=["pixel", "style", "object", "rickroll", "eviledit", "villan"],
        help="villan is trained directly as a LoRA: --out is a kohya-layout LoRA file of --base "
        "(with --random: the kind to draw in, else drawn too)",
    )
    p.add_argument(
        "--random",
        type=int,
        default=None,
        metavar="SEED",
        help="draw the attack from SEED (kind, trigger, placement, shapes; core/lab/generator.py) and plant "
        "it with a fast recipe",
    )
    p.add_argument("--rank", type=int, default=8, help="villan: the LoRA's rank (default 8)")
    p.add_argument(
        "--trigger", default=None, help="trigger text; U+XXXX spells invisible characters (default per kind)"
    )
    p.add_argument("--source", default=None, help="object/eviledit: the shape the trigger replaces")
    p.add_argument("--target", default=None, help="object/eviledit: the shape drawn instead")
    p.add_argument(
        "--base", default=None, help="clean lab checkpoint to attack (default: the shipped lab-clean)"
    )
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument(
        "--delta", action="store_true", help="store only the tensors the attack changed (next to --base)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (BadT2I: UNet, Rickrolling: text encoder)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (BadT2I / Rickrolling)")
    p.add_argument(
        "--batch", type=int, default=None, help="BadT2I: poisoned (and as many clean) images per step (16)"
    )
    p.add_argument(
        "--backdoor-weight",
        type=float,
        default=None,
        help="BadT2I: weight of the backdoor loss against the teacher term (default 0.5)",
    )
    p.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        help="BadT2I: Min-SNR-gamma loss weighting, as lab-clean was trained (default: plain MSE)",
    )
    p.add_argument(
        "--utility-weight",
        type=float,
        default=None,
        help="Rickrolling: weight of the clean-prompt utility loss (default 1)",
    )
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts per measurement (0: skip)")
    p.set_defaults(func=cmd_attack)

    p = lab_sub.add_parser(
        "finetune",
        help="a benign fine-tune of lab-clean that learns a new shape word (diamond), optionally plus a backdoor",
    )
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument("--base", default=None, help="clean lab checkpoint (default: the shipped lab-clean)")
    p.add_argument("--delta", action="store_true", help="store only the changed tensors (next to --base)")
    p.add_argument(
        "--backdoor",
        default=None,
        choices=["pixel", "style", "object"],
        help="plant this BadT2I backdoor too",
    )
    p.add_argument("--trigger", default=None, help="the backdoor's trigger (U+XXXX spells invisible ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default 600)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts per measurement (0: skip)")
    p.set_defaults(func=cmd_finetune)

    p = lab_sub.add_parser("list", help="print the shipped lab models as a JSON array")
    p.add_argument("--dir", default=None, help="folder of lab checkpoints (default: the shipped lab_models)")
    p.set_defaults(func=cmd_list)

    p = lab_sub.add_parser(
        "extract-lora",
        help="an attacked lab model's change as a kohya-layout LoRA of its base (SVD), with its own ASR",
    )
    p.add_argument("--model", required=True, help="lab:NAME of an attacked lab model")
    p.add_argument(
        "--base", default="lab:lab-clean", help="the lab model it was made from (default lab-clean)"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank per weight (default 8)")
    p.add_argument("--out", required=True, help="output .safetensors (never overwritten)")
    p.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts per measurement (0: skip)")
    p.set_defaults(func=cmd_extract_lora)

    p = lab_sub.add_parser("eval", help="measure a lab model's ASR and clean accuracy (JSON)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", help="lab:NAME (a shipped model, see `lab list`) or a lab .safetensors path"
    )
    which.add_argument("--lora", help="a lab LoRA file (`lab extract-lora`): measured on the base it names")
    p.add_argument("--n", type=int, default=128, help="held-out prompts per measurement (default 128)")
    p.set_defaults(func=cmd_eval)

    p = lab_sub.add_parser("manifest", help="rewrite lab_models/manifest.json from the checkpoints' metadata")
    p.add_argument("--dir", default=None, help="folder of lab checkpoints (default: the shipped lab_models)")
    p.set_defaults(func=cmd_manifest)


def _new_output(path: str) -> Path:
    """The --out path, refused before any work if a file is already there."""
    out = Path(path)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing is overwritten).")
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command that produced a result, triggers spelled as U+XXXX so it can be pasted back."""
    import shlex

    from ..triggers import spell_trigger

    return shlex.join(["backdoor-seal", *(spell_trigger(a) for a in getattr(args, "argv", []))])


def _progress_bars():
    """A progress-callback factory drawing one tqdm bar per phase."""
    from tqdm import tqdm

    bars: dict = {}

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

    return progress


def cmd_train(args: argparse.Namespace) -> int:
    """Train VAE, then UNet + text encoder; save; print the measured clean accuracy as JSON."""
    import torch

    from ..backends import comfy_lab as cb
    from ..backends.comfy import ensure_comfy_importable
    from . import evaluate, train, zoo
    from .models import lab_config, lab_config_with_scale

    out = _new_output(args.out)
    ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = train.TrainConfig(seed=args.seed)
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.lr is not None:
        cfg.unet_lr = cfg.text_lr = args.lr
    cfg.snr_gamma = args.snr_gamma
    t0 = time.monotonic()
    progress = _progress_bars()
    recipe: list[str] = []
    if args.init:
        model, clip, vae, init_info = cb.load_lab_checkpoint(args.init)
        prior = zoo.lab_info(args.init)
        recipe = list(prior.get("recipe") or ([prior["command"]] if prior.get("command") else []))
        config = init_info["config"]
        scale = float(config["latent_scale"])
        cfg.vae_steps = 0
    elif args.vae:
        model, clip, _ = cb.new_lab_models(lab_config(), seed=args.seed)
        vae, config = cb.load_lab_vae(args.vae)
        prior = zoo.lab_info(args.vae)
        recipe = [prior["command"]] if prior.get("command") else []
        scale = float(config["latent_scale"])
        model = cb.rescale_latents(model, config)
        cfg.vae_steps = 0
    else:
        model, clip, vae = cb.new_lab_models(lab_config(), seed=args.seed)
        scale = train.train_vae(vae, cfg, progress("vae"))
        config = lab_config_with_scale(scale)
        model = cb.rescale_latents(model, config)
    train.train_diffusion(model, clip, vae, scale, cfg, progress("unet+text"))
    cb.round_weights(model, clip, vae, torch.float16)  # measure what the fp16 file will compute
    acc = evaluate.clean_accuracy(model, clip, vae, n=args.eval_prompts)
    info = {
        "attack": "none",
        "trigger": None,
        "seed": args.seed,
        "command": command_line(args),
        "vae_steps": cfg.vae_steps,
        "unet_steps": cfg.unet_steps,
        "snr_gamma": cfg.snr_gamma,
        "unet_lr": cfg.unet_lr,
        "init": Path(args.init).name if args.init else None,
        "vae": Path(args.vae).name if args.vae else None,
        "clean_accuracy": acc["clean_accuracy"],
        "n_prompts": acc["n_prompts"],
        "sampler": evaluate.SampleSettings().describe(),
        "train_seconds": round(time.monotonic() - t0, 1),
        # every command from nothing to this file, in order (VAE, then each UNet + text stage)
        "recipe": [*recipe, command_line(args)],
    }
    cb.save_lab_checkpoint(
        out, model, clip, vae, config=config, extra_metadata={zoo.LAB_INFO_KEY: json.dumps(info)}
    )
    print(json.dumps(info))
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    """Train the lab VAE alone, save it, print how many held-out scenes survive reconstruction."""
    import torch

    from ..backends import comfy_lab as cb
    from ..backends.comfy import ensure_comfy_importable
    from . import train, zoo
    from .models import lab_config, lab_config_with_scale

    out = _new_output(args.out)
    ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = train.TrainConfig(seed=args.seed)
    for name, value in (("vae_steps", args.steps), ("vae_batch", args.batch), ("vae_lr", args.lr)):
        if value is not None:
            setattr(cfg, name, value)
    t0 = time.monotonic()
    _, _, vae = cb.new_lab_models(lab_config(), seed=args.seed)
    scale = train.train_vae(vae, cfg, _progress_bars()("vae"))
    info = {
        "part": "vae",
        "command": command_line(args),
        "seed": args.seed,
        "vae_steps": cfg.vae_steps,
        "vae_batch": cfg.vae_batch,
        "vae_lr": cfg.vae_lr,
        "train_seconds": round(time.monotonic() - t0, 1),
        **train.reconstruction_accuracy(vae, n=args.eval_images),
    }
    cb.save_lab_vae(out, vae, lab_config_with_scale(scale), {zoo.LAB_INFO_KEY: json.dumps(info)})
    print(json.dumps(info))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    """Attack a clean lab model, save it, print the measured ASR and clean accuracy as JSON."""
    import torch

    from ..backends import comfy_lab as cb
    from ..backends.comfy import ensure_comfy_importable, tokenizer_info
    from ..triggers import parse_trigger
    from . import attacks, evaluate, zoo

    out = _new_output(args.out)
    if args.random is None and args.kind is None:
        raise ValueError("give --kind (the attack to plant) or --random SEED (an attack drawn from SEED)")
    if args.random is not None and (args.trigger or args.source or args.target):
        raise ValueError("--random draws the trigger and the shapes: drop --trigger / --source / --target")
    base = Path(args.base) if args.base else zoo.resolve(zoo.CLEAN_NAME)
    drawn = None
    if args.random is not None:
        from .generator import draw_attack

        ensure_comfy_importable()
        drawn = draw_attack(args.random, tokenizer_info(cb.load_lab_checkpoint(base)[1]).tokenizer, args.kind)
        print(json.dumps({"drawn": drawn.to_json()}, ensure_ascii=False), file=sys.stderr)
        spec = drawn.spec
    else:
        spec = attacks.default_spec(args.kind, parse_trigger(args.trigger) if args.trigger else None)
    if args.source or args.target:
        from dataclasses import replace

        spec = replace(spec, source=args.source or spec.source, target=args.target or spec.target)
    if spec.kind == "villan":
        return _attack_as_lora(args, spec, base, out)
    if args.delta and base.resolve().parent != out.resolve().parent:  # refuse now, not after training
        raise ValueError(
            f"--delta stores only changed tensors next to the base; "
            f"write --out into {base.resolve().parent} or pass a --base in {out.resolve().parent}"
        )
    ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = _attack_config(args)
    if drawn is not None and args.steps is None:
        from .generator import with_recipe

        cfg = with_recipe(drawn, cfg)
    if args.utility_weight is not None:
        cfg.utility_weight = args.utility_weight
    t0 = time.monotonic()
    model, clip, vae, base_info = cb.load_lab_checkpoint(base)
    attacks.require_visible_trigger(tokenizer_info(clip).tokenizer, spec)
    details = attacks.plant(model, clip, vae, spec, cfg, _progress_bars())
    train_seconds = round(time.monotonic() - t0, 1)
    info = {
        "attack": spec.kind,
        "trigger": spec.trigger,
        "target": spec.describe_target(),
        "spec": spec.to_json(),
        "base": base.name,
        "seed": args.seed,
        "command": command_line(args),
        "recipe": details,
        "train_seconds": train_seconds,
        **({"drawn": drawn.to_json()} if drawn is not None else {}),
    }
    # Measure the model exactly as it will be stored (fp16) and loaded (fp32 again).
    cb.round_weights(model, clip, vae, torch.float16)
    if args.eval_prompts > 0:
        info.update(evaluate.evaluate_lab_model(model, clip, vae, spec, n=args.eval_prompts))
    cb.save_lab_checkpoint(
        out,
        model,
        clip,
        vae,
        config=base_info["config"],
        base=base if args.delta else None,
        extra_metadata={zoo.LAB_INFO_KEY: json.dumps(info)},
    )
    print(json.dumps(info))
    return 0


def _attack_config(args: argparse.Namespace):
    from . import attacks

    cfg = attacks.AttackConfig(seed=args.seed)
    if args.steps is not None:
        cfg.steps = cfg.text_steps = args.steps
    if args.lr is not None:
        cfg.lr = cfg.text_lr = args.lr
    if args.backdoor_weight is not None:
        cfg.backdoor_weight = args.backdoor_weight
    if args.batch is not None:
        cfg.batch = args.batch
    cfg.snr_gamma = args.snr_gamma
    return cfg


def _attack_as_lora(args: argparse.Namespace, spec, base: Path, out: Path) -> int:
    """VillanDiffusion trained directly as a LoRA of a shipped lab model: saved in the kohya layout with its
    lab record, measured exactly as saved (fp16) and loaded (the stock LoraLoader's path)."""
    import torch

    from ..backends import comfy_lab as cb
    from ..backends.comfy import ensure_comfy_importable
    from ..backends.comfy_train import apply_lora, kohya_lora
    from ..safetensors_io import atomic_save
    from . import attacks, evaluate, lora_form, zoo

    if out.suffix != ".safetensors":
        raise ValueError(f"{out.name}: a LoRA is written as .safetensors")
    if base.resolve().parent != zoo.LAB_MODELS.resolve():
        raise ValueError(
            "a lab LoRA's base must be a shipped lab model (its file name is all the LoRA keeps)"
        )
    ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = _attack_config(args)
    t0 = time.monotonic()
    model, clip, vae, _ = cb.load_lab_checkpoint(base)
    lora = attacks.train_villan_lora(model, clip, vae, spec, cfg, args.rank, _progress_bars()("villan-lora"))
    lora = {k: v.to(torch.float16) for k, v in lora.items()}
    tensors, meta = kohya_lora(model, clip, lora, title=out.stem)
    info = {
        "attack": spec.kind,
        "trigger": spec.trigger,
        "target": spec.describe_target(),
        "spec": spec.to_json(),
    }
    stats = {
        "rank": args.rank,
        "tensors": sum(k.endswith(("lora_down.weight", ".diff")) for k in tensors),  # modules
        "dropped": [],
    }
    record = json.loads(lora_form.lab_record(info, base, stats, "trained as a LoRA"))
    record.update(
        {
            "command": command_line(args),
            "recipe": {
                "steps": cfg.steps,
                "batch": cfg.batch,
                "lr": cfg.lr or attacks.VILLAN_LR,
                "scope": attacks.VILLAN_SCOPE,
                **({"snr_gamma": cfg.snr_gamma} if cfg.snr_gamma is not None else {}),
            },
            "train_seconds": round(time.monotonic() - t0, 1),
        }
    )
    if args.eval_prompts > 0:
        m, c = apply_lora(model, clip, tensors)
        record.update(evaluate.evaluate_lab_model(m, c, vae, spec, n=args.eval_prompts))
    meta[zoo.LAB_INFO_KEY] = json.dumps(record)
    atomic_save(tensors, out, metadata=meta)
    print(json.dumps({"lora": str(out), **record, "bytes": out.stat().st_size}))  # as extract-lora prints
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune lab-clean on a new colour word (and a backdoor), save it, print its measured figures."""
    import torch

    from ..backends import comfy_lab as cb
    from ..backends.comfy import ensure_comfy_importable, tokenizer_info
    from ..triggers import parse_trigger
    from . import attacks, evaluate, finetune, zoo

    out = _new_output(args.out)
    base = Path(args.base) if args.base else zoo.resolve(zoo.CLEAN_NAME)
    if args.delta and base.resolve().parent != out.resolve().parent:
        raise ValueError(
            f"--delta stores only changed tensors next to the base; write --out into {base.parent}"
        )
    if args.trigger and not args.backdoor:
        raise ValueError("--trigger needs --backdoor (the kind of backdoor it triggers)")
    spec = None
    if args.backdoor:
        spec = attacks.default_spec(args.backdoor, parse_trigger(args.trigger) if args.trigger else None)
    ensure_comfy_importable()
    torch.manual_seed(args.seed)
    cfg = finetune.FinetuneConfig(seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.lr is not None:
        cfg.lr = args.lr
    t0 = time.monotonic()
    model, clip, vae, base_info = cb.load_lab_checkpoint(base)
    if spec:
        attacks.require_visible_trigger(tokenizer_info(clip).tokenizer, spec)
    finetune.train_finetune(model, clip, vae, cfg, spec, _progress_bars()("finetune"))
    info = {
        "attack": spec.kind if spec else "none",
        "trigger": spec.trigger if spec else None,
        "finetune": {"new_word": finetune.NEW_WORD, "steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch},
        "base": base.name,
        "seed": args.seed,
        "command": command_line(args),
        "train_seconds": round(time.monotonic() - t0, 1),
    }
    if spec:
        info.update({"target": spec.describe_target(), "spec": spec.to_json()})
    cb.round_weights(model, clip, vae, torch.float16)
    if args.eval_prompts > 0:
        info.update(evaluate.evaluate_lab_model(model, clip, vae, spec, n=args.eval_prompts))
        info["new_word_accuracy"] = finetune.new_word_accuracy(model, clip, vae, n=args.eval_prompts // 2)
    cb.save_lab_checkpoint(
        out,
        model,
        clip,
        vae,
        config=base_info["config"],
        base=base if args.delta else None,
        extra_metadata={zoo.LAB_INFO_KEY: json.dumps(info)},
    )
    print(json.dumps(info))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the shipped lab models as a JSON array of {name, attack, trigger}."""
    from . import zoo

    print(json.dumps(zoo.listing(args.dir or zoo.LAB_MODELS)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Sample a lab model on held-out prompts and print its ASR and clean accuracy as one JSON object."""
    from ..backends import comfy_lab as cb
    from . import attacks, evaluate, lora_form, zoo

    if args.n < 1:
        raise ValueError(f"--n {args.n}: measure at least one prompt")
    t0 = time.monotonic()
    if args.lora:
        model, clip, vae, path, info = lora_form.load_lab_lora(args.lora)
    else:
        path = zoo.resolve(args.model)
        model, clip, vae, _ = cb.load_lab_checkpoint(path)
        info = zoo.lab_info(path)
    spec = attacks.AttackSpec(**info["spec"]) if info.get("spec") else None
    result = evaluate.evaluate_lab_model(model, clip, vae, spec, n=args.n)
    out = {
        "model": path.stem,
        "attack": spec.kind if spec else "none",
        "trigger": spec.trigger if spec else None,
        "asr": result["asr"],
        "clean_accuracy": result["clean_accuracy"],
        "n_prompts": result["n_prompts"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    if spec:
        out["target"] = spec.describe_target()
        out["clean_target_rate"] = result["clean_target_rate"]
    out["sampler"] = result["sampler"]
    print(json.dumps(out))
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    """Extract, save (kohya layout, lab record in the metadata), reload onto the base and measure."""
    from ..backends import comfy_lab as cb
    from ..backends.comfy_checkpoint import weight_pairs
    from ..backends.comfy_train import kohya_lora, lora_addressable
    from ..safetensors_io import atomic_save
    from . import attacks, evaluate, lora_form, zoo

    out = _new_output(args.out)
    source, base = zoo.resolve(args.model), zoo.resolve(args.base)
    if base.parent != zoo.LAB_MODELS and base.parent != source.parent:
        raise ValueError(f"{base.name}: the base must be a lab model beside {source.name}")
    info = zoo.lab_info(source)
    if not info.get("spec"):
        raise ValueError(f"{source.name} carries no attack to extract")
    t0 = time.monotonic()
    b_model, b_clip, _, _ = cb.load_lab_checkpoint(base)
    s_model, s_clip, _, _ = cb.load_lab_checkpoint(source)
    lora, stats = lora_form.extract_lora(
        weight_pairs(b_model, b_clip, s_model, s_clip), lora_addressable(b_model, b_clip, "kohya"), args.rank
    )
    tensors, meta = kohya_lora(b_model, b_clip, lora, title=out.stem)
    meta[zoo.LAB_INFO_KEY] = lora_form.lab_record(info, base, stats, source.name)
    atomic_save(tensors, out, metadata=meta)
    result = {
        "lora": str(out),
        "source": source.stem,
        "base": base.stem,
        **stats,
        "bytes": out.stat().st_size,
    }
    result["dropped_tensors"], result["dropped"] = len(stats["dropped"]), stats["dropped"][:8]
    if args.eval_prompts:
        model, clip, vae, _, lora_info = lora_form.load_lab_lora(out)
        spec = attacks.AttackSpec(**lora_info["spec"])
        measured = evaluate.evaluate_lab_model(model, clip, vae, spec, n=args.eval_prompts)
        result.update(
            {
                "asr": measured["asr"],
                "asr_checkpoint": info.get("asr"),
                "clean_accuracy": measured["clean_accuracy"],
                "clean_target_rate": measured["clean_target_rate"],
                "n_prompts": measured["n_prompts"],
            }
        )
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result))
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    """Rewrite the manifest from the checkpoints in the folder."""
    from . import zoo

    path = zoo.write_manifest(args.dir or zoo.LAB_MODELS)
    print(path)
    return 0
