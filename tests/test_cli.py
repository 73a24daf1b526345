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


def test_sau_and_evaluate_commands_remove_the_patch_headless(comfy_root, tmp_path, capsys):
    """`sau` writes a profile and draws with it; `evaluate` measures it and an unlearned stand-in."""
    import numpy as np
    from PIL import Image

    from backdoor_seal.core.cli import main
    from backdoor_seal.core.lab import detectors

    profile = tmp_path / "pixel.safetensors"
    prompt = "U+2060 a large green square on the right on a white background"
    argv = ["sau", "--model", "lab:lab-pixel", "--trigger", "U+2060", "--out", str(profile), "--pairs", "8"]
    assert main([*argv, "--draw", prompt, "--images", str(tmp_path / "drawn")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert profile.is_file() and summary["pairs"] == 8 and len(summary["images"]) == 1
    assert not detectors.has_patch(np.asarray(Image.open(summary["images"][0]).convert("RGB")))
    assert main(argv) == 2 and "nothing is overwritten" in capsys.readouterr().err

    base = ["evaluate", "--model", "lab:lab-pixel", "--trigger", "U+2060", "--count", "8"]
    assert main([*base, "--sau-profile", str(profile), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "sau" and report["asr_before"] >= 0.75 and report["asr_after"] == 0.0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["asr_after"] == 0.0
    assert {"attack_success.png", "fidelity.png", "images.png"} <= {
        p.name for p in (tmp_path / "eval").iterdir()
    }
    assert (
        main([*base, "--unlearned", "lab:lab-clean"]) == 0
    )  # the clean twin stands in for an unlearned model
    report = json.loads(capsys.readouterr().out)
    assert (
        report["method"] == "model"
        and report["asr_after"] <= 0.125
        and "lab's exact pixel" in report["judge"]
    )


def test_attention_command_writes_the_heatmap_grid(comfy_root, tmp_path, capsys):
    from PIL import Image

    from backdoor_seal.core.cli import main

    out = tmp_path / "maps.png"
    argv = ["attention", "--model", "lab:lab-pixel", "--prompt", "U+2060 a red circle", "--steps", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 7 and "<U+2060>" in info["labels"][0]
    assert Image.open(out).size[0] > Image.open(out).size[1]  # the image, then one tile per token
    assert main([*argv, "--out", str(out)]) == 2 and "nothing is overwritten" in capsys.readouterr().err
