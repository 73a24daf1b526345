"""SealUnlearn and SealSaveSanitized as a library: outputs, provenance, atomic numbered saves, reload."""

from __future__ import annotations

import json

import pytest
import torch

NODE_ARGS = dict(
    trigger="zx9",
    prompts="a red circle on the left\n\na blue square",
    method="skd-cag",
    scope="attn2-kv",
    rank=4,
    steps=3,
    learning_rate=1e-3,
    batch_size=2,
    alpha=0.5,
    attention_target="black",
    timestep_weighting=False,
    builtin_prompts="lab",
    placement="auto",
    latent_size=8,
    precision="fp32",
    seed=0,
)


def _unlearn(comfy_root, **overrides):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.nodes.nodes_unlearn import SealUnlearn

    model, clip, vae = comfy_lab.new_lab_models(lab_config())
    out = SealUnlearn.execute(model=model, clip=clip, **dict(NODE_ARGS, **overrides))
    return model, clip, vae, out


def test_unlearn_node_returns_patched_clones_a_lora_info_and_a_loss_plot(comfy_root):
    model, clip, _vae, out = _unlearn(comfy_root)
    new_model, new_clip, lora, info, plot = out.result
    assert new_model is not model and new_clip is clip  # the text encoder is not in this scope
    assert len(new_model.patches) == 14  # to_k and to_v of the 7 cross-attention layers
    assert not model.patches
    assert info["provenance"]["steps_run"] == 3 and len(info["losses"]) == 3
    assert info["provenance"]["training_prompts"] == 2 + 64  # the user's two prompts + the lab set
    assert plot.ndim == 4 and plot.shape[-1] == 3 and plot.shape[0] == 1
    assert all(k.startswith("diffusion_model.") for k in lora)


def test_report_supplies_the_trigger_and_an_empty_trigger_is_refused(comfy_root):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.nodes.nodes_unlearn import SealUnlearn

    model, clip, _ = comfy_lab.new_lab_models(lab_config())
    args = dict(NODE_ARGS, trigger="", steps=1)
    out = SealUnlearn.execute(model=model, clip=clip, report={"trigger": "cf"}, **args)
    assert out.result[3]["provenance"]["trigger_tokens"] == 1
    with pytest.raises(ValueError, match="no trigger"):
        SealUnlearn.execute(model=model, clip=clip, **args)


def test_save_writes_numbered_files_with_provenance_and_never_overwrites(comfy_root, output_dir):
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.safetensors_io import read_metadata
    from backdoor_seal.core.unlearn.save import PROVENANCE_KEY
    from backdoor_seal.nodes.nodes_unlearn import SealSaveSanitized

    model, clip, vae, out = _unlearn(comfy_root, learning_rate=3e-2)
    new_model, new_clip, lora, info, _ = out.result
    first = SealSaveSanitized.execute("clean/lab", new_model, new_clip, vae, lora, info).result[0]
    second = SealSaveSanitized.execute("clean/lab", None, None, None, lora, info).result[0]
    paths = first.splitlines() + second.splitlines()
    assert paths == [
        "clean/lab_00001_.safetensors",
        "clean/lab_lora_00001_.safetensors",
        "clean/lab_lora_00002_.safetensors",
    ]
    meta = read_metadata(output_dir / paths[0])
    provenance = json.loads(meta[PROVENANCE_KEY])
    assert provenance["method"] == "skd-cag" and provenance["options"]["scope"] == "attn2-kv"
    assert len(provenance["trigger_sha256"]) == 64 and "zx9" not in meta[PROVENANCE_KEY]
    # the sanitized lab checkpoint loads back as a lab model and computes what the patched MODEL does
    reloaded, reclip, _, _ = comfy_lab.load_lab_checkpoint(output_dir / paths[0])
    cond = torch.cat([clip.encode_from_tokens(clip.tokenize("zx9 a red circle"))])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0])

    def eps(m):
        import comfy.model_management as mm

        mm.load_models_gpu([m])
        with torch.no_grad():
            return m.model.apply_model(x, sigma, c_crossattn=cond)

    assert (eps(reloaded) - eps(new_model)).abs().max() < 2e-2  # fp16 file
    assert (eps(reloaded) - eps(model)).abs().max() > (eps(reloaded) - eps(new_model)).abs().max()
    with pytest.raises(ValueError, match="nothing to save"):
        SealSaveSanitized.execute("x")


def test_save_refuses_an_existing_explicit_name(tmp_path, comfy_root):
    from backdoor_seal.core.unlearn.save import save_sanitized

    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        save_sanitized(target, lora={"a.lora_up.weight": torch.zeros(1)})
    assert target.read_bytes() == b"keep me"
