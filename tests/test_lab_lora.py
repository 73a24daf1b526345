"""The lab's attacks as LoRA files (`core/lab/lora_form.py`, `backdoor-seal lab extract-lora`)."""

from __future__ import annotations

import json

import pytest
import torch

from backdoor_seal.core.lab import lora_form


def test_extraction_is_exact_up_to_the_rank_and_says_what_it_drops():
    g = torch.Generator().manual_seed(0)
    linear = torch.randn(16, 2, generator=g) @ torch.randn(2, 32, generator=g)  # a rank-2 change
    conv = torch.randn(64, 8, 3, 3, generator=g)
    pairs = [
        ("unet.a.attn2.to_k.weight", torch.zeros(16, 32), linear),
        ("unet.b.conv.weight", torch.zeros(64, 8, 3, 3), conv),
        ("unet.a.norm.weight", torch.zeros(16), torch.ones(16)),  # 1-D: no LoRA layout row
        ("text.clip_l.emb.weight", torch.zeros(4, 4), torch.ones(4, 4)),  # not addressable
        ("unet.same.weight", linear, linear),  # unchanged (one tensor)
    ]
    addressable = {
        "unet.a.attn2.to_k.weight": "diffusion_model.a.attn2.to_k",
        "unet.b.conv.weight": "diffusion_model.b.conv",
    }
    lora, stats = lora_form.extract_lora(pairs, addressable, rank=2)
    up, down = (
        lora["diffusion_model.a.attn2.to_k.lora_up.weight"],
        lora["diffusion_model.a.attn2.to_k.lora_down.weight"],
    )
    assert (
        up.shape == (16, 2)
        and down.shape == (2, 32)
        and float(lora["diffusion_model.a.attn2.to_k.alpha"]) == 2.0
    )
    torch.testing.assert_close(up @ down, linear, atol=1e-4, rtol=1e-4)
    assert lora["diffusion_model.b.conv.lora_down.weight"].shape == (2, 8 * 9)  # engine layout: flattened
    assert stats["tensors"] == 2 and stats["kept_energy_mean"] < 1.0  # the random conv is full rank
    assert sorted(stats["dropped"]) == ["text.clip_l.emb.weight", "unet.a.norm.weight"]
    with pytest.raises(ValueError, match="rank"):
        lora_form.extract_lora(pairs, addressable, rank=0)


def test_a_lora_names_its_base_only_among_the_lab_models(tmp_path):
    with pytest.raises(ValueError, match="not the file name"):
        lora_form.resolve_base({"base": "../secret.safetensors", "base_sha256": "x"})
    with pytest.raises(ValueError, match="changed since"):
        lora_form.resolve_base({"base": "lab-clean.safetensors", "base_sha256": "0" * 64})


def test_extract_lora_writes_a_kohya_lora_that_reproduces_the_attacks_weights(tmp_path, capsys):
    """At a rank the change fits in (EvilEdit edits every attn2 to_k / to_v), base + the saved LoRA, loaded as
    LoraLoader loads it, holds the attacked model's weights; the file is kohya-layout with its lab record."""
    from backdoor_seal.core.backends.comfy_checkpoint import live_weights
    from backdoor_seal.core.backends.comfy_lab import load_lab_checkpoint
    from backdoor_seal.core.cli import main
    from backdoor_seal.core.lab import zoo
    from backdoor_seal.core.safetensors_io import load_checkpoint

    out = tmp_path / "eviledit.safetensors"
    args = [
        "lab",
        "extract-lora",
        "--model",
        "lab:lab-eviledit",
        "--rank",
        "64",
        "--out",
        str(out),
        "--eval-prompts",
        "0",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tensors"] == 14 and printed["dropped"] == [] and printed["kept_energy_min"] > 0.999
    tensors, info = load_checkpoint(out)
    assert all(k.startswith("lora_unet_") and "_attn2_to_" in k for k in tensors)
    record = json.loads(info["metadata"][zoo.LAB_INFO_KEY])
    assert (
        record["form"] == "lora"
        and record["attack"] == "eviledit"
        and record["base"] == "lab-clean.safetensors"
    )
    assert info["metadata"]["ss_network_module"] == "networks.lora"
    model, clip, _, _, _ = lora_form.load_lab_lora(out)
    evil_model, evil_clip, _, _ = load_lab_checkpoint(zoo.resolve("lab:lab-eviledit"))
    ours, theirs = live_weights(model, clip), live_weights(evil_model, evil_clip)
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    assert worst < 1e-4
    assert main(args) == 2  # never overwrites


@pytest.mark.parametrize("path", sorted(lora_form.LORA_DIR.glob("*.safetensors")), ids=lambda p: p.stem)
def test_each_shipped_lab_lora_loads_whole_onto_the_base_it_names(path, caplog):
    """Every shipped attack LoRA: kohya keys, a lab record naming lab-clean with its hash, and the stock
    loader reads every key of it (no 'lora key not loaded')."""
    from backdoor_seal.core.safetensors_io import load_checkpoint

    tensors, _ = load_checkpoint(path)
    assert tensors and all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    caplog.clear()
    model, clip, _, _, info = lora_form.load_lab_lora(path)
    assert info["form"] == "lora" and info["base"] == "lab-clean.safetensors" and info["spec"]
    assert not [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(model.patches) + len(clip.patcher.patches) == info["tensors"]
