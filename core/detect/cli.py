"""`backdoor-seal detect` (is this prompt triggered, and by which token) and `backdoor-seal scan` (blind)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..models import add_model_argument, positive_int
from .scan import ScanSettings
from .session import DetectOptions


def _read_lines(path: str) -> list[str]:
    return [p.strip() for p in Path(path).read_text(encoding="utf-8").splitlines() if p.strip()]


def _at_least_8(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"at least 8 (the transplant detector uses 8 probes), got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
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
        "--calibrate-n",
        type=int,
        default=32,
        help="clean prompts to calibrate on when none is given (fewer is faster; each costs one detection)",
    )
    p.add_argument(
        "--save-calibration",
        default=None,
        help="write the calibration here (JSON; reuse it with --calibration)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="calibrate again even if this model was calibrated on the same prompts before (the cache: "
        "BACKDOOR_SEAL_CACHE, else ~/.cache/backdoor-seal)",
    )
    p.add_argument(
        "--probe-prompts",
        type=_at_least_8,
        default=DetectOptions.probe_prompts,
        help="clean prompts each token is put in front of (the transplant detector; at least 8)",
    )
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
    from ..models import latent_side, load_model
    from ..triggers import parse_trigger
    from .prompts import Calibration
    from .session import DetectOptions, PromptDetection

    model, clip, _, info = load_model(args.model, args.clip_skip)
    opts = DetectOptions(
        lab=bool(info),
        calibration_prompts=args.calibrate_n,
        probe_prompts=args.probe_prompts,
        latent_side=latent_side(model, args.latent_size or 0),
    )
    detection = PromptDetection(model, clip, opts)
    if args.calibration:
        detection.calibration = Calibration.load(args.calibration)
    else:
        from tqdm import tqdm

        own = _read_lines(args.clean_prompts) if args.clean_prompts else []
        prompts = detection.calibration_set(own, builtin=not own)
        # each calibration prompt is a full detection: minutes apiece for SD1.5 / SDXL on a CPU
        with tqdm(total=len(prompts), desc="calibrate", unit="prompt") as bar:
            detection.calibrate(prompts, name=args.model, tick=bar.update, cache=not args.no_cache)
        if detection.calibration_cached:
            print(f"calibration: read from the cache ({len(prompts)} prompts, this model)", file=sys.stderr)
        if args.save_calibration:
            detection.calibration.save(args.save_calibration)
    for prompt in args.prompt:
        t0 = time.monotonic()
        report = detection.check(parse_trigger(prompt)).to_dict()
        report["seconds"] = round(time.monotonic() - t0, 3)
        print(json.dumps(report, ensure_ascii=False))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan the vocabulary with a progress bar; print (and optionally save) the ranked candidates."""
    from tqdm import tqdm

    from ..models import latent_side, load_model
    from ..safetensors_io import write_json
    from .session import scan_model, scan_prompts

    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise FileExistsError(f"{out}: give a new name (nothing is overwritten)")
    model, clip, _, info = load_model(args.model, args.clip_skip)
    side = latent_side(model, args.latent_size or 0)
    settings = ScanSettings(
        candidates=args.candidates,
        stage1_probes=args.stage1_probes,
        stage2_probes=args.stage2_probes,
        threshold_z=args.threshold_z,
        latent_shape=(4, side, side),
    )
    own = _read_lines(args.clean_prompts) if args.clean_prompts else []
    prompts = scan_prompts(bool(info), settings, own, builtin=not own)
    bar = tqdm(total=1, desc="scan", unit="eval")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.monotonic()
    report = scan_model(model, clip, settings, prompts, progress)
    bar.close()
    summary = report.to_dict(top=args.top)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["model"] = args.model
    if out is not None:
        write_json(out, summary)
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0
