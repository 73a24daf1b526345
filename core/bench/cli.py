"""`backdoor-seal bench ...`: one JSON object (or one per line) of measured figures per benchmark."""

from __future__ import annotations

import argparse
import json


def _cmd_capture(args: argparse.Namespace) -> int:
    from .capture import run

    print(json.dumps(run(args)))
    return 0


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
