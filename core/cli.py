"""`backdoor-seal <job> ...`: the headless command line."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from .backends.comfy import describe_model
    from .models import load_model

    model, clip, _vae, _ = load_model(args.model, args.clip_skip)
    print(json.dumps(describe_model(model, clip), indent=2))
    return 0


def _cmd_attention(args: argparse.Namespace) -> int:
    """Sample prompts with cross-attention capture; write the per-token heatmap grid as a PNG."""
    from .attention import CaptureSettings, capture
    from .backends.comfy import ComfyBackend, vae_decode
    from .heatmaps import overlay_grid
    from .images import image_to_uint8, save_png
    from .models import default_cfg, latent_side, load_model
    from .triggers import parse_trigger

    out = Path(args.out)
    if out.exists() or out.suffix.lower() != ".png":
        raise FileExistsError(f"{out}: give a new .png name (nothing is overwritten)")
    model, clip, vae, _ = load_model(args.model, args.clip_skip)
    side = latent_side(model, args.latent_size)
    backend = ComfyBackend(model, clip, (side, side), args.sampler, args.scheduler)
    prompts = [parse_trigger(p) for p in args.prompt]
    seeds = [(args.seed + i) % 2**64 for i in range(len(prompts))]
    settings = CaptureSettings(resolution=args.resolution)
    latents, maps = capture(backend, prompts, seeds, settings, args.steps, default_cfg(model, args.cfg))
    grid = overlay_grid(maps, vae_decode(vae, latents), args.max_tokens)
    save_png(image_to_uint8(grid), out)
    # each prompt's labels up to its EOS (the padding after it says nothing)
    labels = [lab[: lab.index("<EOS>") + 1] if "<EOS>" in lab else lab for lab in maps.labels]
    print(json.dumps({"image": str(out), "layers": len(maps.per_layer), "labels": labels}))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_WORKFLOW, run_demo

    r = run_demo(out_dir=args.out, port=args.port)
    print(
        f"backdoor-seal demo: workflows/{DEMO_WORKFLOW}.json on {r['model']} (base {r['base']}) through a "
        "headless ComfyUI; no trigger given"
    )
    print(r["summary"])
    print(f"  time {r['seconds']:.0f} s; written to {r['folder']}/")
    print(f"    report.json, {', '.join(r['figures'])}, comfyui-output/ (the sanitized model and its LoRA)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    from .models import add_model_argument, add_sampling_arguments
    from .version import __version__

    parser = argparse.ArgumentParser(prog="backdoor-seal", description=__doc__)
    parser.add_argument("--version", action="version", version=f"backdoor-seal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="describe a model (UNet family, cross-attention layers, tokenizer)")
    add_model_argument(p)
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("attention", help="per-token cross-attention heatmaps of prompts (a PNG grid)")
    add_model_argument(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable; U+XXXX allowed)")
    p.add_argument("--out", required=True, help="the grid .png (never overwritten)")
    p.add_argument("--max-tokens", type=int, default=8, help="token overlays per image")
    p.add_argument("--resolution", type=int, default=16, help="map grid side")
    add_sampling_arguments(p)
    p.set_defaults(func=_cmd_attention)
    p = sub.add_parser("demo", help="run the demo pipeline through a headless ComfyUI and print a summary")
    p.add_argument(
        "--out", default=None, help="output folder (default: out, or out-2, ... when out holds a report)"
    )
    p.add_argument("--port", type=int, default=None, help="loopback port (default: a free one)")
    p.set_defaults(func=_cmd_demo)
    from .bench.cli import add_bench_commands
    from .detect.cli import add_detect_commands
    from .diff.cli import add_diff_command
    from .evaluate.cli import add_evaluate_command
    from .lab.cli import add_lab_commands
    from .sanitize.cli import add_sanitize_command
    from .sau.cli import add_sau_command
    from .unlearn.cli import add_unlearn_command

    # one command per job, in the order data flows: detect -> unlearn / sau -> evaluate -> all of them
    add_detect_commands(sub)
    add_diff_command(sub)
    add_unlearn_command(sub)
    add_sau_command(sub)
    add_evaluate_command(sub)
    add_sanitize_command(sub)
    add_lab_commands(sub)
    add_bench_commands(sub)
    return parser


def _quiet_optional_audio(record: logging.LogRecord) -> bool:
    """ComfyUI warns at import that its audio models need torchaudio; no command here uses them."""
    return "torchaudio missing" not in record.getMessage()


def _return_large_buffers() -> None:
    """glibc raises its mmap threshold after large frees and then keeps freed buffers in the heap: a
    full-size SDXL training step on a CPU then holds 11 GB it no longer uses (measured: 23.4 GB of
    anonymous memory after two steps against 12.4 GB with this). A fixed 1 MiB threshold (mallopt
    M_MMAP_THRESHOLD) hands large buffers back to the system. Our own process only; not glibc: nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `backdoor-seal` console script."""
    _return_large_buffers()
    logging.getLogger().addFilter(_quiet_optional_audio)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in lab checkpoints so every figure names the command that made it
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"backdoor-seal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
