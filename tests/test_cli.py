"""The `backdoor-seal` console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _cli() -> str:
    exe = Path(sys.executable).parent / "backdoor-seal"  # the venv's script, whatever PATH says
    assert exe.exists(), "the console script is installed with the pack"
    return str(exe)


def test_info_prints_json(lab_dir):
    out = subprocess.run(
        [_cli(), "info", "--model", str(lab_dir / "lab-untrained.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["cross_attention_layers"] == 7 and info["unet_family"] == "LabSD"


def test_bad_input_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(b"pickle")
    out = subprocess.run([_cli(), "info", "--model", str(bad)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "only .safetensors" in out.stderr and "Traceback" not in out.stderr
