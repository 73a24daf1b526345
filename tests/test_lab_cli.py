"""`backdoor-seal lab attack / list / eval / manifest`: the plumbing, on an untrained lab model.

These check what the commands write and print; the attacks' success on trained models is measured
by `backdoor-seal lab eval` (see docs/lab.md), not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

from backdoor_seal.core.cli import main
from backdoor_seal.core.lab import zoo
from backdoor_seal.core.triggers import parse_trigger, spell_trigger


def _last_json(capsys) -> dict | list:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_attack_writes_a_delta_that_records_its_command(lab_folder, capsys):
    base, out = lab_folder / "lab-clean.safetensors", lab_folder / "lab-eviledit.safetensors"
    argv = ["lab", "attack", "--kind", "eviledit", "--base", str(base), "--out", str(out), "--delta"]
    assert main([*argv, "--eval-prompts", "4"]) == 0
    printed = _last_json(capsys)
    info = zoo.lab_info(out)
    assert info == printed
    assert info["attack"] == "eviledit" and info["trigger"] == "zx9 qv7" and info["base"] == base.name
    assert info["command"].startswith("backdoor-seal lab attack --kind eviledit")
    assert 0.0 <= info["asr"] <= 1.0 and 0.0 <= info["clean_accuracy"] <= 1.0 and info["n_prompts"] == 4
    assert out.stat().st_size < base.stat().st_size / 20  # only the edited projections are stored
    assert main([*argv, "--eval-prompts", "0"]) == 2  # the output exists: refused, nothing overwritten
    assert "already exists" in capsys.readouterr().err


def test_delta_away_from_its_base_is_refused_before_training(lab_folder, tmp_path, capsys):
    out = tmp_path / "elsewhere.safetensors"
    argv = ["lab", "attack", "--kind", "eviledit", "--base", str(lab_folder / "lab-clean.safetensors")]
    assert main([*argv, "--out", str(out), "--delta", "--eval-prompts", "0"]) == 2
    assert "next to the base" in capsys.readouterr().err and not out.exists()


def test_invisible_trigger_is_spelled_in_the_command(lab_folder, capsys):
    out = lab_folder / "lab-pixel.safetensors"
    argv = ["lab", "attack", "--kind", "pixel", "--trigger", "U+200B", "--out", str(out), "--steps", "1"]
    assert main([*argv, "--base", str(lab_folder / "lab-clean.safetensors"), "--eval-prompts", "0"]) == 0
    info = zoo.lab_info(out)
    assert info["trigger"] == "\u200b" and "--trigger U+200B" in info["command"]
    assert parse_trigger(spell_trigger("\u200bzx\u043e")) == "\u200bzx\u043e"


def test_list_eval_and_manifest(lab_folder, capsys):
    base, out = lab_folder / "lab-clean.safetensors", lab_folder / "lab-rickroll.safetensors"
    assert main(["lab", "attack", "--kind", "rickroll", "--base", str(base), "--out", str(out), "--delta",
                 "--steps", "2", "--eval-prompts", "0"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["lab", "list", "--dir", str(lab_folder)]) == 0
    listed = _last_json(capsys)
    assert listed == [
        {"name": "lab-clean", "attack": "none", "trigger": None},
        {"name": "lab-rickroll", "attack": "rickroll", "trigger": "\u043e"},
    ]
    assert main(["lab", "eval", "--model", str(out), "--n", "4"]) == 0
    measured = _last_json(capsys)
    assert {"model", "attack", "trigger", "asr", "clean_accuracy", "n_prompts", "seconds"} <= set(measured)
    assert measured["model"] == "lab-rickroll" and measured["n_prompts"] == 4
    manifest = json.loads(zoo.write_manifest(lab_folder).read_text())
    entry = next(e for e in manifest["models"] if e["name"] == "lab-rickroll")
    assert entry["trigger_spelled"] == "U+043E" and entry["trigger_unicode_names"] == [
        "CYRILLIC SMALL LETTER O"
    ]
    assert entry["bytes"] == out.stat().st_size


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["lab", "eval", "--model", "lab-nonexistent"]) == 2
    assert "no lab model named 'lab-nonexistent'" in capsys.readouterr().err


def test_train_vae_then_train_with_it(tmp_path: Path, capsys):
    """The two training phases run apart: a VAE trained once is reused by `lab train --vae`."""
    import torch

    from backdoor_seal.core.backends import comfy_lab

    vae_file, out = tmp_path / "vae.safetensors", tmp_path / "clean.safetensors"
    assert main(["lab", "train-vae", "--out", str(vae_file), "--steps", "2", "--eval-images", "4"]) == 0
    info = _last_json(capsys)
    assert info["part"] == "vae" and info["n_images"] == 4 and 0.0 <= info["recon_accuracy"] <= 1.0
    argv = [
        "lab",
        "train",
        "--vae",
        str(vae_file),
        "--unet-steps",
        "1",
        "--eval-prompts",
        "4",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert _last_json(capsys)["vae"] == "vae.safetensors"
    vae, config = comfy_lab.load_lab_vae(vae_file)
    _, _, loaded, meta = comfy_lab.load_lab_checkpoint(out)
    assert meta["config"]["latent_scale"] == config["latent_scale"]
    want, got = vae.first_stage_model.state_dict(), loaded.first_stage_model.state_dict()
    assert all(torch.equal(want[k].half().float(), got[k]) for k in want)


def test_finetune_writes_a_delta_with_its_new_word_and_backdoor(lab_folder, capsys):
    base, out = lab_folder / "lab-clean.safetensors", lab_folder / "lab-finetune-pixel.safetensors"
    argv = ["lab", "finetune", "--base", str(base), "--out", str(out), "--delta", "--steps", "2"]
    assert main([*argv, "--trigger", "cf", "--eval-prompts", "0"]) == 2  # a trigger needs its --backdoor
    assert "--trigger needs --backdoor" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--backdoor", "pixel", "--trigger", "vx", "--eval-prompts", "4"]) == 0
    info = zoo.lab_info(out)
    assert info == _last_json(capsys)
    assert info["attack"] == "pixel" and info["trigger"] == "vx" and info["finetune"]["new_word"] == "diamond"
    assert info["spec"]["kind"] == "pixel" and 0.0 <= info["new_word_accuracy"] <= 1.0
    assert info["command"].startswith("backdoor-seal lab finetune")


def test_villan_is_trained_as_a_kohya_lora_of_a_shipped_model(tmp_path, capsys):
    """VillanDiffusion's LoRA: written in the kohya layout with its lab record, and loaded onto the base it
    names as LoraLoader loads it (two steps: the plumbing, not the attack's success)."""
    from backdoor_seal.core.lab.lora_form import load_lab_lora
    from backdoor_seal.core.safetensors_io import load_checkpoint

    out = tmp_path / "villan.safetensors"
    argv = ["lab", "attack", "--kind", "villan", "--steps", "2", "--out", str(out), "--eval-prompts", "2"]
    assert main(argv) == 0
    info = _last_json(capsys)
    assert info["form"] == "lora" and info["attack"] == "villan" and info["trigger"] == "wood dahlia"
    assert info["base"] == "lab-clean.safetensors" and info["rank"] == 8 and 0.0 <= info["asr"] <= 1.0
    keys = load_checkpoint(out)[0]
    assert (
        keys
        and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        and any(k.startswith("lora_te_") for k in keys)  # the text encoder is trained too
        and any("attn1" in k for k in keys)
        and any("resnets" in k or "_conv" in k for k in keys)
    )
    model, _clip, _vae, _path, record = load_lab_lora(out)
    assert info["lora"] == str(out) and info["bytes"] == out.stat().st_size  # as extract-lora prints
    assert record == {k: v for k, v in info.items() if k not in ("lora", "bytes")}
    assert model.patches  # the LoRA's patches on a clone of the base
    other = [
        "lab",
        "attack",
        "--kind",
        "villan",
        "--base",
        str(tmp_path / "x.safetensors"),
        "--out",
        str(tmp_path / "y.safetensors"),
    ]
    assert main(other) == 2 and "shipped lab model" in capsys.readouterr().err
