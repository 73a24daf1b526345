"""`backdoor-seal detect` (is this prompt triggered, and by which token) and `backdoor-seal scan` (blind)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .masking import MaskingSettings
from .prompts import probe_latent_shape
from .scan import ScanSettings


def clean_prompt_set(info: dict, path: str | None, n: int, seed: int = 0) -> list[str]:
    """Clean prompts: the user's file, else the built-in set (the lab grammar for lab models)."""
    from .prompts import builtin_clean_prompts

    if path:
        return [p.strip() for p in Path(path).read_text(encoding="utf-8").splitlines() if p.strip()]
    return builtin_clean_prompts(bool(info), n, seed)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="lab:NAME or a single-file .safetensors checkpoint")
    p.add_argument(
        "--clean-prompts",
        default=None,
        help="clean prompts, one per line (default: the lab grammar for lab models, everyday captions otherwise)",
    )
    p.add_argument("--latent-size", type=int, default=None, help="latent side (default 8 lab, 64 SD)")


def add_detect_commands(sub: argparse._SubParsersAction) -> None:
    """Register `detect` and `scan`."""
    p = sub.add_parser("detect", help="score prompts for a backdoor trigger and localise the trigger token")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt to check (repeatable)")
    p.add_argument("--calibration", default=None, help="calibration JSON (written by --save-calibration)")
    p.add_argument(
        "--calibrate-n", type=int, default=32, help="clean prompts to calibrate on when none is given"
    )
    p.add_argument("--save-calibration", default=None, help="write the calibration here (JSON)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("scan", help="rank every vocabulary token by how strongly it hijacks the model")
    _add_model_args(p)
    p.add_argument("--out", default=None, help="write the report here (JSON; never overwrites)")
    p.add_argument("--candidates", type=int, default=ScanSettings.candidates)
    p.add_argument("--stage1-probes", type=int, default=ScanSettings.stage1_probes)
    p.add_argument("--stage2-probes", type=int, default=ScanSettings.stage2_probes)
    p.add_argument(
        "--threshold-z", type=float, default=ScanSettings.threshold_z, help="flag tokens above this stage-2 z"
    )
    p.add_argument("--top", type=int, default=10, help="candidates printed")
    p.set_defaults(func=cmd_scan)


def cmd_detect(args: argparse.Namespace) -> int:
    """Calibrate (or load a calibration), score each prompt, print one JSON line per prompt."""
    from ..backends.comfy_probe import ComfyProbe
    from ..lab.zoo import parse_trigger
    from ..unlearn.cli import load_model
    from .prompts import Calibration, calibrate_on, detect_prompt, transplant_scanner

    model, clip, _, info = load_model(args.model)
    probe = ComfyProbe(model, clip)
    settings = MaskingSettings(latent_shape=probe_latent_shape(bool(info), args.latent_size))
    transplant = transplant_scanner(probe, clean_prompt_set(info, None, 32, seed=0), settings.latent_shape)
    if args.calibration:
        calibration = Calibration.load(args.calibration)
    else:
        clean = clean_prompt_set(info, args.clean_prompts, args.calibrate_n, seed=1)
        calibration = calibrate_on(probe, clean, settings, transplant, name=args.model)
        if args.save_calibration:
            calibration.save(args.save_calibration)
    for prompt in args.prompt:
        t0 = time.monotonic()
        report = detect_prompt(
            probe, parse_trigger(prompt), calibration, settings, transplant=transplant
        ).to_dict()
        report["seconds"] = round(time.monotonic() - t0, 3)
        print(json.dumps(report, ensure_ascii=False))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan the vocabulary with a progress bar; print (and optionally save) the ranked candidates."""
    from tqdm import tqdm

    from ..backends.comfy_probe import ComfyProbe
    from ..unlearn.cli import load_model
    from .scan import VocabularyScanner

    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise FileExistsError(f"{out}: give a new name (nothing is overwritten)")
    model, clip, _, info = load_model(args.model)
    probe = ComfyProbe(model, clip)
    settings = ScanSettings(
        candidates=args.candidates,
        stage1_probes=args.stage1_probes,
        stage2_probes=args.stage2_probes,
        threshold_z=args.threshold_z,
        latent_shape=probe_latent_shape(bool(info), args.latent_size),
    )
    prompts = clean_prompt_set(info, args.clean_prompts, max(32, settings.stage2_probes))
    bar = tqdm(total=1, desc="scan", unit="eval")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.monotonic()
    report = VocabularyScanner(probe, prompts, settings, progress).run()
    bar.close()
    summary = report.to_dict(top=args.top)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["model"] = args.model
    if out is not None:
        from .report import write_json

        write_json(out, summary)
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0
