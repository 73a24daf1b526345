"""Real-workflow faults (#35 item 6) rerun through a real ComfyUI server: textual-inversion embeddings in
every node's prompts, renamed inputs of old workflows, messages that name what exists, a batch larger than
the prompts, and a very long prompt's chart."""

from __future__ import annotations

from typing import Any

import pytest

from backdoor_seal.core.comfy_host import ComfyError

LAB = "lab-untrained.safetensors"
EMBEDDING = "sealemb"  # in every test server's embeddings folder (conftest.embeddings_dir)
SAMPLING = {"seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}


def _unlearn(trigger: str, prompts: str, method: str, scope: str) -> dict[str, Any]:
    return {
        "class_type": "SealUnlearn",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "trigger": trigger,
            "prompts": prompts,
            "method": method,
            "scope": scope,
            "rank": 2,
            "steps": 1,
            "match_steps": 1,
            "learning_rate": 1e-3,
            "batch_size": 2,
            "alpha": 0.5,
            "attention_target": "black",
            "timestep_weighting": False,
            "builtin_prompts": "none",
            "placement": "auto",
            "latent_size": 8,
            "precision": "fp32",
            "seed": 0,
        },
    }


def embedding_graph() -> dict[str, Any]:
    """Every node that reads prompts, on the lab model, with `embedding:sealemb` in its prompts (and as a
    trigger): Detect, Attention Capture, Unlearn (each method; an embedding trigger too), SAU Profile and
    Sampler, Evaluate."""
    emb = f"embedding:{EMBEDDING}"
    prompts = f"a red circle {emb} on the left\na blue square ({emb}:1.2) at the top"
    model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    graph: dict[str, Any] = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": {
            "class_type": "SealDetectPrompt",
            "inputs": {
                "model": model,
                "clip": clip,
                "prompts": f"zq {prompts.splitlines()[0]}",
                "clean_prompts": "a green triangle\na red square",
                "builtin_prompts": "lab",
                "latent_size": 8,
                "calibration_prompts": 0,
            },
        },
        "3": {
            "class_type": "SealAttentionCapture",
            "inputs": {
                "model": model,
                "clip": clip,
                "text": f"zq a red circle {emb}",
                "resolution": 8,
                "layers": "",
                "first_step": 0,
                "last_step": -1,
            },
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["3", 0],
                "positive": ["3", 1],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
                **SAMPLING,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": vae}},
        "8": {
            "class_type": "SealAttentionHeatmaps",
            "inputs": {
                "attention": ["3", 2],
                "images": ["7", 0],
                "max_tokens": 4,
                "include_bos_eos": False,
                "opacity": 0.6,
                "colormap": "inferno",
            },
        },
        "20": _unlearn("zq", prompts, "match", "text"),
        "21": _unlearn("zq", prompts, "skd", "text"),
        "22": _unlearn("zq", prompts, "skd-cag", "attn2-kv"),
        "23": _unlearn(emb, "a red circle on the left\na blue square at the top", "match", "text"),
        "30": {
            "class_type": "SealSAUProfile",
            "inputs": {
                "model": model,
                "clip": clip,
                "trigger": emb,
                "prompts": "a red circle on the left",
                "builtin_prompts": "lab",
                "pairs": 1,
                "latent_size": 8,
                "signal": "latent",
                "weighting": "union",
                "strength": 1.0,
                "save_name": "",
                **SAMPLING,
            },
        },
        "31": {
            "class_type": "SealSAUSampler",
            "inputs": {
                "model": model,
                "clip": clip,
                "profile": ["30", 0],
                "text": f"a blue square {emb} at the top",
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
                **SAMPLING,
            },
        },
        "40": {
            "class_type": "SealEvaluate",
            "inputs": {
                "original_model": model,
                "clip": clip,
                "vae": vae,
                "trigger": "zq",
                "prompts": prompts,
                "builtin_prompts": "lab",
                "count": 2,
                "lab_detector": "none",
                "latent_size": 8,
                "unlearned_model": ["22", 0],
                "unlearned_clip": ["22", 1],
                "target": ["41", 0],
                **SAMPLING,
            },
        },
    }
    graph["41"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    }
    images = {"2": 1, "8": 0, "20": 4, "21": 4, "22": 4, "23": 4, "40": 1}  # each node's IMAGE output
    for node, output in images.items():  # a preview each makes every branch run
        graph[f"9{node}"] = {"class_type": "PreviewImage", "inputs": {"images": [node, output]}}
    graph["931"] = {"class_type": "SealSAUDecode", "inputs": {"samples": ["31", 0], "vae": vae}}
    graph["932"] = {"class_type": "PreviewImage", "inputs": {"images": ["931", 0]}}
    return graph


@pytest.mark.server
def test_embeddings_in_every_nodes_prompts(host_server):
    """Every node that reads prompts runs with a textual-inversion embedding ComfyUI resolves in them (Seal
    Unlearn raised `only one element tensors can be converted to Python scalars` with every method); an
    embedding as the trigger is found by its ids. Seal Sanitize and the comparisons read no prompts."""
    entry = host_server.client().run(embedding_graph(), timeout=600)
    out = entry["outputs"]
    texts = {k: " ".join(v.get("text", [])) for k, v in out.items()}
    assert all(out[f"9{n}"]["images"] for n in ("2", "8", "20", "21", "22", "23", "40"))
    assert f"embedding:{EMBEDDING}" in texts["2"]  # the checked prompt, with its embedding
    assert texts["31"].startswith("trigger found"), texts["31"]  # the embedding trigger, taken out by ids
    assert "at the top" in texts["31"] and "embedding" not in texts["31"]
    assert texts["30"].startswith(f"SAU profile for embedding:{EMBEDDING}")
    assert "attack success" in texts["40"]


def test_embedding_ids_encode_as_comfyui_encodes_the_embedding(comfy_root, lab_dir, embeddings_dir):
    """Training's own text encoder (token ids in, with gradient) reads an embedding id as its vectors:
    the context equals ComfyUI's encoding of the prompt; the same embedding has the same ids everywhere."""
    import torch

    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends.comfy_lab import load_lab_checkpoint

    _, clip, _, _ = load_lab_checkpoint(lab_dir / LAB, str(embeddings_dir))
    prompt = f"a red circle embedding:{EMBEDDING} on the left"
    ids = cb.chunk_ids(clip, prompt)
    special = [i for i in ids if cb.is_embedding_id(i)]
    assert len(special) == 2 and len(set(special)) == 2  # two vectors, two ids
    again = cb.chunk_ids(clip, f"embedding:{EMBEDDING} a blue square")
    assert [i for i in again if cb.is_embedding_id(i)] == special
    ours = cb.encode_token_ids(clip, torch.tensor([ids]))
    theirs = clip.encode_from_tokens({k: v[:1] for k, v in clip.tokenize(prompt).items()})
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    plain = cb.encode_token_ids(clip, torch.tensor([cb.chunk_ids(clip, "a red circle on the left")]))
    assert not torch.allclose(ours[:, 4], plain[:, 4], atol=1e-3)  # the vectors are really read
    labels = cb.clip_position_labels(clip, prompt)  # Seal Attention Heatmaps' token names
    assert labels[4:6] == [f"embedding:{EMBEDDING}"] * 2 and labels[6] == "on"


@pytest.mark.server
def test_unlearn_with_a_missing_embedding_as_trigger_says_so(comfy_server):
    graph = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": _unlearn("embedding:missing", "a red circle on the left", "match", "text"),
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 4]}},
    }
    with pytest.raises(ComfyError) as err:
        comfy_server.client().run(graph, timeout=120)
    message = str(err.value)
    assert "'missing'" in message and "does not find" in message and "embeddings" in message
    assert "chunk" not in message and "longer" not in message  # it blamed the prompts' length


def _display_names(server) -> set[str]:
    return {v.get("display_name") or "" for v in server.client().get_json("/object_info").values()}


def _assert_nodes_exist(server, named: list[str]) -> None:
    """Every node a message names is one of the server's node display names."""
    names = _display_names(server)
    assert all(any(d.startswith(n) for d in names) for n in named), (named, sorted(names))


def _named_nodes(message: str) -> list[str]:
    import re

    return re.findall(r"Seal(?: [A-Z][A-Za-z]*)+", message)


@pytest.mark.server
def test_sanitize_given_a_prompt_report_names_nodes_that_exist(comfy_server):
    graph = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": {
            "class_type": "SealDetectPrompt",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "prompts": "zq a red circle",
                "clean_prompts": "a green triangle\na red square",
                "builtin_prompts": "lab",
                "latent_size": 8,
                "calibration_prompts": 0,
            },
        },
        "3": {
            "class_type": "SealSanitize",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "report": ["2", 0]},
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 5]}},
    }
    with pytest.raises(ComfyError, match="prompt report") as err:
        comfy_server.client().run(graph, timeout=300)
    named = _named_nodes(str(err.value).split("exception_type")[0])
    assert "Seal Scan Model" in named
    _assert_nodes_exist(comfy_server, named)


@pytest.mark.server
def test_compare_lora_given_a_checkpoint_names_the_node_input(host_server):
    graph = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": {
            "class_type": "SealCompareLora",
            "inputs": {
                "base_model": ["1", 0],
                "base_clip": ["1", 1],
                "lora_name": "a-checkpoint.safetensors",
                "behaviour": False,
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    with pytest.raises(ComfyError, match="is a checkpoint, not a LoRA") as err:
        host_server.client().run(graph, timeout=120)
    message = str(err.value).split("exception_type")[0]
    assert "--model" not in message and "Seal Compare Models" in message
    _assert_nodes_exist(host_server, _named_nodes(message))


def _evaluate(**links) -> dict[str, Any]:
    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {
            "class_type": "SealEvaluate",
            "inputs": {
                "original_model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "trigger": "zq",
                "prompts": "a red circle",
                "builtin_prompts": "lab",
                "count": 1,
                "lab_detector": "none",
                "latent_size": 8,
                "target": ["2", 0],
                **SAMPLING,
                **links,
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }


@pytest.mark.server
def test_evaluate_runs_a_workflow_saved_with_its_old_input_names(host_server):
    """`cleaned_model` / `cleaned_clip` (before the rename to unlearned_*) passed /prompt, then execute
    raised a TypeError; they now mean unlearned_model / unlearned_clip. An input no version had is one
    line naming it."""
    client = host_server.client()
    entry = client.run(_evaluate(cleaned_model=["1", 0], cleaned_clip=["1", 1]), timeout=300)
    assert "clean fidelity: SSIM 1.000" in " ".join(entry["outputs"]["3"]["text"])  # the same model
    with pytest.raises(ComfyError, match="has no input 'scrubbed_model'"):
        client.run(_evaluate(scrubbed_model=["1", 0]), timeout=300)


@pytest.mark.server
def test_unlearn_notes_a_batch_larger_than_its_prompts(comfy_server):
    prompts = "a red circle on the left\na blue square at the top"
    big, fitting = _unlearn("zq", prompts, "match", "text"), _unlearn("zq", prompts, "match", "text")
    big["inputs"]["batch_size"] = 256
    graph = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": big,
        "3": fitting,
    }
    graph["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 4]}}
    graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 4]}}
    out = comfy_server.client().run(graph, timeout=300)["outputs"]
    note = " ".join(out["2"].get("text", []))
    assert "batch_size 256" in note and "2 training prompt" in note
    assert "batch_size" not in " ".join(out["3"].get("text", []))  # a batch of 2 for 2 prompts: no note


def test_a_long_prompts_chart_keeps_the_highest_tokens_and_the_trigger():
    from backdoor_seal.core.detect.report import MAX_BARS, charted_tokens, short_prompt

    tokens = [
        {"text": f"w{i}", "position": i, "unet": float(i % 97), "hijack": float(-i)} for i in range(3010)
    ]
    tokens[1500]["text"] = "zq"
    drawn, note = charted_tokens({"tokens": tokens, "trigger_token": "zq"}, ("unet", "hijack"))
    kept = {t["position"] for t in drawn}
    assert len(drawn) <= MAX_BARS and "3,010" in note
    assert 1500 in kept and {96, 193, 0, 1} <= kept  # the trigger, the top UNet and top hijack scores
    assert [t["position"] for t in drawn] == sorted(kept)  # in prompt order
    assert charted_tokens({"tokens": tokens[:10], "trigger_token": "zq"}, ("unet",)) == (tokens[:10], "")
    assert len(short_prompt("word " * 2760)) < 100 and short_prompt("a cat") == "a cat"


@pytest.mark.server
def test_a_long_prompt_draws_a_readable_chart_and_a_short_text(comfy_server):
    long = " ".join(["a red circle on the left of a blue square"] * 12)  # 120 tokens, 2 chunks
    graph = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": LAB}},
        "2": {
            "class_type": "SealDetectPrompt",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "prompts": long,
                "clean_prompts": "a green triangle\na red square",
                "builtin_prompts": "lab",
                "latent_size": 8,
                "calibration_prompts": 0,
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }
    client = comfy_server.client()
    out = client.run(graph, timeout=600)["outputs"]
    (chart,) = client.fetch_rgb(out["3"]["images"])
    assert chart.shape[1] <= 2200, chart.shape  # 120 bars drew about 5,500 pixels wide
    text = " ".join(out["2"]["text"])
    assert len(text) < 200 and f"{len(long):,} characters" in text
