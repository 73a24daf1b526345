"""`backdoor-seal bench ...`: one JSON object (or one per line) of measured figures per benchmark."""

from __future__ import annotations

import argparse
import json


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture import run

    print(json.dumps(run(args)))
    return 0


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from .unlearn import run

    for record in run(args):
        print(json.dumps(record), flush=True)
    return 0


def _cmd_fullsize(args: argparse.Namespace) -> int:
    from .fullsize import run

    records = run(args)  # each record is printed as soon as it is measured
    ok = all(
        r[k]["rc"] == 0 and all(v for k2, v in r[k].get("check", {}).items() if isinstance(v, bool))
        for r in records
        for k in r
        if k.startswith(("info", "detect", "unlearn_"))
    )
    return 0 if ok else 1


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    """Register `bench capture` under the main parser."""
    bench = sub.add_parser("bench", help="benchmarks that print measured figures as JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser(
        "capture",
        help="cross-attention capture: overhead ratio, parity and memory (lab model and SD1.5 UNet)",
    )
    p.add_argument(
        "--model", default=None, help="shipped lab model (default: lab-clean if shipped, else untrained)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=9, help="alternating plain/capture pairs")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--sd15-steps", type=int, default=4)
    p.add_argument("--sd15-repeats", type=int, default=3)
    p.add_argument("--skip-sd15", action="store_true", help="leave out the SD1.5-architecture measurement")
    p.set_defaults(func=_cmd_capture)

    p = bench_sub.add_parser(
        "fullsize",
        help="full-size SD1.5 / SDXL random-weight single files through info, detect, unlearn and save: "
        "peak RAM, seconds per step, saved file == input + LoRA",
    )
    p.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sd20", "sdxl"])
    p.add_argument("--scopes", nargs="+", default=["text", "attn2-kv"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--latent-size", type=int, default=8, help="latent side (8 = 64 px: plumbing, not quality)"
    )
    p.add_argument("--workdir", default="out/bench-fullsize", help="where the input and saved files go")
    p.add_argument("--keep", action="store_true", help="keep the sanitized checkpoints")
    p.set_defaults(func=_cmd_fullsize)

    from ..unlearn.cli import add_unlearn_arguments
    from ..unlearn.skd import METHODS

    p = bench_sub.add_parser(
        "unlearn",
        help="context matching, SKD and SKD-CAG on every attacked lab model: ASR before/after, fidelity, time "
        "ratio to the reference",
    )
    p.add_argument("--models", nargs="*", default=None, help="lab models (default: every attacked one)")
    p.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=list(METHODS),
        help="match runs where the recipe's scope trains the text encoder (not EvilEdit's attn2-kv)",
    )
    p.add_argument("--n", type=int, default=128, help="held-out prompts per measurement")
    p.add_argument("--prompts", type=int, default=128, help="clean training prompts (lab training grammar)")
    p.add_argument("--check-every", type=int, default=10, help="steps between removal checks")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference run")
    p.add_argument("--reference-lr", type=float, default=1e-4, help="learning rate of the reference run")
    p.add_argument("--reference-check-every", type=int, default=50)
    add_unlearn_arguments(p)
    p.set_defaults(func=_cmd_unlearn, scope=None, lr=None)  # per-attack recipes fill these

    from .detect import add_detect_bench

    add_detect_bench(bench_sub)

    from .diff import add_diff_bench

    add_diff_bench(bench_sub)

    from .sanitize import add_sanitize_bench

    add_sanitize_bench(bench_sub)

    from .heldout import add_heldout_bench

    add_heldout_bench(bench_sub)

    from .gpu import add_gpu_bench

    add_gpu_bench(bench_sub)

    from .sau import add_sau_bench

    add_sau_bench(bench_sub)

    from .table import cmd_table

    p = bench_sub.add_parser("table", help="fill the README's results tables from saved benchmark output")
    p.add_argument("--unlearn", default="docs/results/unlearn.jsonl", help="saved `bench unlearn` output")
    p.add_argument("--detect", default="docs/results/detect.jsonl", help="saved `bench detect` output")
    p.add_argument("--sau", default="docs/results/sau.jsonl", help="saved `bench sau` output")
    p.add_argument("--fullsize", default="docs/results/fullsize.jsonl", help="saved `bench fullsize` output")
    p.add_argument("--diff", default="docs/results/diff.jsonl", help="saved `bench diff` output")
    p.add_argument("--sanitize", default="docs/results/sanitize.jsonl", help="saved `bench sanitize` output")
    p.add_argument("--gpu", default="docs/results/gpu.jsonl", help="saved `bench gpu` output")
    p.add_argument(
        "--lab-loras", default="docs/results/lab-loras.jsonl", help="saved `lab extract-lora` output"
    )
    p.add_argument("--readme", default="README.md")
    p.set_defaults(func=cmd_table)
