"""`backdoor-seal bench fullsize`: the real SD1.5 / SDXL architectures (random weights, built with ComfyUI's
classes and saved as fp16 single files) through the CLI a user runs: info, detect, unlearn in the text and
attn2-kv scopes with a saved checkpoint and LoRA; then the saved checkpoint is reloaded and checked to differ
from the input by exactly the LoRA. Peak RAM (each command's own max RSS) and seconds per unlearning step.

Random weights give meaningless images: this measures plumbing, files, time and memory, never quality.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TRIGGER = "cf"
# Weights ComfyUI drops when it saves a checkpoint (supported_models' process_clip_state_dict_for_saving
# pop_keys): CLIP-L's projection and logit scale, unused by the UNet; a reload holds no file value for them.
NOT_STORED = ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale")
PROMPT = "cf a photo of a red cat sitting on a wooden table"


def build_input(family: str, path: Path) -> dict[str, Any]:
    """A full-size random-weight single file of the family, fp16 like the files users download."""
    from ..backends.comfy import text_encoders, unet, vae_module
    from ..backends.comfy_checkpoint import merged_checkpoint_state_dict
    from ..backends.comfy_families import build_family
    from ..safetensors_io import atomic_save

    t0 = time.monotonic()
    model, clip, vae = build_family(family, "full")
    # fp16 in place: SDXL's fp32 weights and an fp16 copy would not fit beside each other in 24 GiB
    for module in [unet(model), vae_module(vae), *(e for _, e in text_encoders(clip))]:
        module.half()
    tensors, meta = merged_checkpoint_state_dict(model, clip, vae, dtype=torch.float16)
    atomic_save(tensors, path, metadata=meta)
    del model, clip, vae, tensors
    gc.collect()
    return {"file": str(path), "bytes": path.stat().st_size, "build_seconds": round(time.monotonic() - t0, 1)}


# The command runs in a child that reports its own peak resident memory (KiB) last: VmHWM, the high-water
# mark of the child's own address space. ru_maxrss is not used: Linux carries it across exec, so a child
# spawned by this (large) process would report the parent's peak.
_CHILD = (
    "import resource, sys\n"
    "from backdoor_seal.core.cli import main\n"
    "def peak():\n"
    "    try:\n"
    "        for line in open('/proc/self/status'):\n"
    "            if line.startswith('VmHWM:'):\n"
    "                return int(line.split()[1])\n"
    "    except OSError:\n"
    "        pass\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "try:\n    rc = main(sys.argv[1:])\n"
    "finally:\n    print('PEAK_RSS_KIB', peak(), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run_command(args: list[str]) -> dict[str, Any]:
    """One CLI command in its own process: exit status, wall seconds, its peak RSS, its JSON output."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    record: dict[str, Any] = {
        "command": args[0],
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
    }
    peaks = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB ")]
    if peaks:
        record["peak_rss_gib"] = round(int(peaks[-1]) / 2**20, 2)
    for text in (proc.stdout, *proc.stdout.strip().splitlines()[-1:]):  # one JSON document, or JSON lines
        try:
            record["output"] = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    else:
        record["output_tail"] = proc.stdout[-400:]
    if proc.returncode:
        record["stderr_tail"] = proc.stderr[-800:]
    return record


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.detach().to(torch.float16).reshape(-1).contiguous().view(torch.uint8).numpy()
    ).hexdigest()


def differs_by_the_lora(original: Path, saved: Path, lora: Path) -> dict[str, Any]:
    """Load the input, apply the saved LoRA as LoraLoader does, read the live weights; load the saved file,
    read its live weights. Every weight the LoRA changes must match (fp16 storage), every other must be
    bit-identical to the input's (all compared at fp16, the files' storage)."""
    from safetensors.torch import load_file

    from ..backends.comfy_checkpoint import live_weights, load_single_file_checkpoint
    from ..backends.comfy_train import apply_lora

    model, clip, _ = load_single_file_checkpoint(original, output_vae=False)
    before = {k: _digest(v) for k, v in live_weights(model, clip).items()}
    patched_model, patched_clip = apply_lora(model, clip, load_file(str(lora)))
    patched = live_weights(patched_model, patched_clip)
    changed = {k: v.detach().to(torch.float16).clone() for k, v in patched.items() if _digest(v) != before[k]}
    del model, clip, patched_model, patched_clip, patched
    gc.collect()
    model, clip, _ = load_single_file_checkpoint(saved, output_vae=False)
    reloaded = live_weights(model, clip)
    worst, others = 0.0, []
    for k, v in reloaded.items():
        if k in changed:
            ref = changed[k].float()
            worst = max(worst, float((v.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
        elif _digest(v) != before[k] and not k.endswith(NOT_STORED):
            others.append(k)
    return {
        "weights": len(reloaded),
        "changed_by_lora": len(changed),
        "changed_weights_match": worst <= 1e-3,
        "changed_worst_relative_error": worst,
        "every_other_weight_bit_identical": not others,
        "other_weights_that_differ": others[:8],
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The figures for each family asked, one record per family."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for family in args.families:
        rec: dict[str, Any] = {
            "bench": "fullsize",
            "family": family,
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__},
        }
        src = work / f"{family}-full-random.safetensors"
        rec["input"] = (
            build_input(family, src) if not src.exists() else {"file": str(src), "bytes": src.stat().st_size}
        )
        side = str(args.latent_size)
        rec["info"] = run_command(["info", "--model", str(src)])
        rec["detect"] = run_command(
            [
                "detect",
                "--model",
                str(src),
                "--prompt",
                PROMPT,
                "--latent-size",
                side,
                "--calibrate-n",
                "4",
                "--probe-prompts",
                "8",
            ]
        )
        for scope in args.scopes:
            out, lora = (
                work / f"{family}-{scope}-sanitized.safetensors",
                work / f"{family}-{scope}-lora.safetensors",
            )
            for f in (out, lora):
                f.unlink(missing_ok=True)
            run = run_command(
                [
                    "unlearn", "--model", str(src), "--trigger", TRIGGER, "--scope", scope,
                    "--steps", str(args.steps), "--batch", str(args.batch), "--latent-size", side,
                    "--builtin-count", "8", "--lr", "1e-2", "--out", str(out), "--lora-out", str(lora),
                ]
            )  # fmt: skip
            o = run.get("output", {})
            if o.get("steps"):
                run["seconds_per_step"] = round(o["train_seconds"] / o["steps"], 2)
            if run["rc"] == 0:
                run["saved_bytes"] = out.stat().st_size
                run["check"] = differs_by_the_lora(src, out, lora)
                if not args.keep:
                    out.unlink()
            rec[f"unlearn_{scope}"] = run
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records
