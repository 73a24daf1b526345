"""The headless commands on the second host (ComfyUI 0.8.0 as a library, COMFYUI_PATH): the benchmarks whose
deep-copied teacher broke on 0.8.0's model config run, and report which ComfyUI they ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hosts import SECOND_HOST, SECOND_MISSING, second_host_ready

RUN = (
    "import sys; from backdoor_seal.core.cli import main; rc = main(sys.argv[1:]); "
    "import comfyui_version; print('host', comfyui_version.__version__); sys.exit(rc)"
)


def _on_second_host(*argv: str) -> tuple[list[dict], str]:
    """Run the CLI in a fresh process on the second host; (its JSON records, the host's version)."""
    if not second_host_ready():
        pytest.skip(SECOND_MISSING)
    env = dict(
        os.environ, COMFYUI_PATH=str(SECOND_HOST), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")
    )
    done = subprocess.run(
        [sys.executable, "-c", RUN, *argv], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return [json.loads(x) for x in lines if x.startswith("{")], lines[-1].split()[-1]


def test_bench_gpu_tiny_runs_on_the_second_host():
    records, host = _on_second_host(
        "bench", "gpu", "--tiny", "--train-steps", "2", "--sample-steps", "2", "--repeats", "1",
        "--prompts", "1", "--scan-slice", "32",
    )  # fmt: skip
    assert host == "0.8.0"
    assert [r["arch"] for r in records] == ["sd15", "sdxl"]
    assert all(r["skd_step_s"] > 0 and r["reference_step_s"] > 0 for r in records)


def test_bench_unlearn_with_its_reference_runs_on_the_second_host():
    """The reference run (on by default) deep-copies a frozen teacher: TypeError on 0.8.0 before the fix."""
    records, host = _on_second_host(
        "bench", "unlearn", "--models", "lab-eviledit", "--methods", "skd-cag", "--n", "2", "--steps", "2",
        "--check-every", "100",
    )  # fmt: skip
    assert host == "0.8.0"
    (record,) = records
    # step seconds are measured beside the reference's (its copied teacher); then its time to removal or why not
    assert record["method"] == "skd-cag" and record["step_seconds"] > 0
    assert "reference_step_seconds" in record or "reference_note" in record, record
