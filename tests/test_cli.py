"""The `backdoor-seal` console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


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


def test_bad_files_get_one_line_errors_and_nothing_is_written(comfy_root, tmp_path, capsys):
    """Corrupt or foreign files, as a user might pass them: exit 2, one line naming the file, no traceback."""
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.cli import main
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.safetensors_io import atomic_save

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)  # a header length no file has
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    foreign = atomic_save({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    not_image = tmp_path / "target.png"
    not_image.write_text("not a png")
    for argv, says in (
        (["info", "--model", str(corrupt)], "not a readable safetensors file"),
        (["info", "--model", str(folder)], "a folder, not a checkpoint file"),
        (["info", "--model", str(foreign)], "ComfyUI recognises no model"),
        (
            ["evaluate", "--model", "lab:lab-pixel", "--trigger", "x", "--lora", str(foreign)],
            "holds no weight",
        ),
        (
            ["evaluate", "--model", "lab:lab-pixel", "--trigger", "x", "--lora", str(corrupt)],
            "not a readable",
        ),
        (
            ["evaluate", "--model", "lab:lab-pixel", "--trigger", "x", "--unlearned", "lab:lab-clean"]
            + ["--target", str(not_image)],
            "not an image",
        ),
        (
            [
                "evaluate",
                "--model",
                "lab:lab-pixel",
                "--trigger",
                "x",
                "--lora",
                str(corrupt),
                "--out",
                str(not_image),
            ],
            "a file",
        ),
        (
            ["evaluate", "--model", "lab:lab-pixel", "--trigger", "U+D800", "--unlearned", "lab:lab-clean"],
            "names no character",
        ),
        (
            [
                "unlearn",
                "--model",
                "lab:lab-pixel",
                "--trigger",
                " ",
                "--out",
                str(tmp_path / "u.safetensors"),
            ],
            "whitespace",
        ),
        (["lab", "eval", "--model", "lab:lab-pixel", "--n", "0"], "at least one prompt"),
        (["unlearn", "--model", "lab:lab-pixel", "--out", str(tmp_path / "u.safetensors")], "one of them"),
        (
            ["unlearn", "--model", "lab:lab-pixel", "--trigger", "x", "--report", str(corrupt)]
            + ["--out", str(tmp_path / "u.safetensors")],
            "one of them",
        ),
        (
            ["unlearn", "--model", "lab:lab-pixel", "--trigger", "x", "--out", str(tmp_path / "u.ckpt")],
            "ending in .safetensors",
        ),
        (
            [
                "unlearn",
                "--model",
                "lab:lab-pixel",
                "--trigger",
                "x",
                "--out",
                str(tmp_path / "same.safetensors"),
            ]
            + ["--lora-out", str(tmp_path / "same.safetensors")],
            "each its own file",
        ),
        (
            ["unlearn", "--model", "lab:lab-pixel", "--trigger", "x"]
            + ["--out", str(tmp_path / "no-such-folder" / "u.safetensors")],
            "create it first",
        ),
        (
            ["unlearn", "--model", "lab:lab-pixel", "--trigger", "x", "--rank", "-1"]
            + ["--out", str(tmp_path / "u.safetensors")],
            "rank must be 0",
        ),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "images.png").write_bytes(b"kept")
    argv = ["evaluate", "--model", "lab:lab-pixel", "--trigger", "x", "--lora", str(corrupt)]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 2  # refused before any work, the file kept
    assert "already holds images.png" in capsys.readouterr().err
    assert (tmp_path / "eval" / "images.png").read_bytes() == b"kept" and len(
        list((tmp_path / "eval").iterdir())
    ) == 1
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "no-such-folder").exists()
    with pytest.raises(SystemExit):  # argparse's usage error for a count below 1
        main(["evaluate", "--model", "lab:lab-pixel", "--trigger", "x", "--unlearned", "x", "--count", "0"])
    assert "is not at least 1" in capsys.readouterr().err
    # a lab checkpoint saved without the shipped models' record (a sanitized lab model) still loads as one
    sanitized = comfy_lab.save_lab_checkpoint(
        tmp_path / "sanitized.safetensors", *comfy_lab.new_lab_models(lab_config())
    )
    assert main(["info", "--model", str(sanitized)]) == 0
    assert json.loads(capsys.readouterr().out)["unet_family"] == "LabSD"


def test_demo_progress_prints_a_line_per_node_at_most_every_few_seconds(monkeypatch):
    import io

    from backdoor_seal.core import demo

    clock = iter([10.0, 12.0, 13.0, 25.0, 26.0])
    monkeypatch.setattr(demo.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    on_text = demo.progress_printer({"3": {"class_type": "SealSanitize"}}, t0=0.0, every=10.0, stream=out)
    for node, text in [("3", "find: 1/9"), ("3", "find: 2/9"), ("7", "1/2"), ("7", "2/2"), ("7", "x")]:
        on_text(node, text)
    lines = out.getvalue().splitlines()
    # 10 s: first; 12 s: same node too soon; 13 s: another node; 25 s: ten seconds on; 26 s: too soon
    assert [line.split()[1:] for line in lines] == [
        ["10", "s", "SealSanitize:", "find:", "1/9"],
        ["13", "s", "node", "7:", "1/2"],
        ["25", "s", "node", "7:", "2/2"],
    ]


def test_demo_writes_a_new_folder_when_out_holds_a_report(tmp_path):
    from backdoor_seal.core.demo import free_output_folder

    base = tmp_path / "out"
    assert free_output_folder(base) == base
    base.mkdir()
    (base / "report.json").write_text("{}")
    assert free_output_folder(base) == tmp_path / "out-2"
    (tmp_path / "out-2").mkdir()
    (tmp_path / "out-2" / "report.json").write_text("{}")
    assert free_output_folder(base) == tmp_path / "out-3"


def test_written_reports_are_ordinary_files(tmp_path):
    from backdoor_seal.core.safetensors_io import write_json

    assert (write_json(tmp_path / "r.json", {"a": 1}).stat().st_mode & 0o777) == 0o644


def test_unlearn_records_the_clip_skip_it_trained_for(tmp_path, capsys):
    """A fix trained for CLIPSetLastLayer(-2) says so in its provenance: it must be drawn with the same."""
    from backdoor_seal.core.cli import main
    from backdoor_seal.core.safetensors_io import read_metadata
    from backdoor_seal.core.unlearn.save import PROVENANCE_KEY

    out, lora = tmp_path / "u.safetensors", tmp_path / "u-lora.safetensors"
    argv = ["unlearn", "--model", "lab:lab-pixel", "--trigger", "U+2060", "--steps", "1", "--batch", "2"]
    assert main([*argv, "--clip-skip", "2", "--out", str(out), "--lora-out", str(lora)]) == 0
    capsys.readouterr()
    for path in (out, lora):
        assert json.loads(read_metadata(path)[PROVENANCE_KEY])["clip_skip"] == 2


def test_unlearn_takes_a_set_from_repeated_triggers_or_from_a_report(tmp_path, capsys):
    """`--trigger` repeated trains the set in one run; `--report` takes a sanitize report's taken triggers
    (where each fired), not the ones it left out."""
    from backdoor_seal.core.cli import main

    argv = ["unlearn", "--model", "lab:lab-pixel", "--steps", "1", "--batch", "2", "--builtin-count", "4"]
    assert (
        main([*argv, "--trigger", "U+2060", "--trigger", "muted", "--out", str(tmp_path / "a.safetensors")])
        == 0
    )
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["triggers"] == 2 and first["training_prompts"] == 8  # each trigger its own pairs
    report = tmp_path / "sanitize.json"
    taken = {"text": "muted", "taken": True, "before": {"rates": {"before:circle": 0.75, "prepend": 0.25}}}
    left = {"text": "red", "taken": False, "before": {"rates": {"prepend": 0.25}}}
    report.write_text(json.dumps({"kind": "sanitize", "min_rate": 0.5, "candidates": [taken, left]}))
    assert main([*argv, "--report", str(report), "--out", str(tmp_path / "b.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["triggers"] == 1


def test_sanitize_refuses_an_output_folder_that_does_not_exist_before_any_work(tmp_path, capsys):
    from backdoor_seal.core.cli import main

    out = tmp_path / "missing" / "clean.safetensors"
    argv = ["sanitize", "--model", "lab:lab-rickroll", "--base", "lab:lab-clean", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no folder" in err and "create it first" in err and len(err.strip().splitlines()) == 1
    assert not out.parent.exists()
