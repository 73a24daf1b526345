"""API-format graphs the server tests queue (the example workflows' graphs live in core/demo.py), and an
untrained lab checkpoint for tests that need only its shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backdoor_seal.core.demo import DEMO_PROMPT, ksampler_node, unlearn_graph


def model_info_graph(
    lab_model: str, prompt: str = DEMO_PROMPT, seed: int = 0, batch: int = 4
) -> dict[str, Any]:
    """API-format graph: lab loader -> SealModelInfo, and stock text encode -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {"class_type": "SealModelInfo", "inputs": {"model": ["1", 0], "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": ksampler_node("1", "3", "4", "5", seed),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": "backdoor-seal-demo"},
        },
    }


def backdoor_graph(
    lab_model: str, triggered: str, clean: str, seed: int = 0, batch: int = 8
) -> dict[str, Any]:
    """API-format graph: one lab model, the same seeds, a triggered and a clean prompt through stock nodes."""
    graph: dict[str, Any] = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    for branch, (prompt, first) in {"triggered": (triggered, 10), "clean": (clean, 20)}.items():
        graph[str(first)] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}}
        graph[str(first + 1)] = ksampler_node("1", str(first), "2", "3", seed)
        graph[str(first + 2)] = {
            "class_type": "VAEDecode",
            "inputs": {"samples": [str(first + 1), 0], "vae": ["1", 2]},
        }
        graph[str(first + 3)] = {
            "class_type": "SaveImage",
            "inputs": {"images": [str(first + 2), 0], "filename_prefix": f"backdoor-seal-{branch}"},
        }
    return graph


def make_untrained_lab_model(path: Path) -> Path:
    """A randomly initialised lab checkpoint (used only until trained lab models ship)."""
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config

    if path.exists():
        return path
    return comfy_lab.save_lab_checkpoint(
        path,
        *comfy_lab.new_lab_models(lab_config(), seed=0),
        extra_metadata={"backdoor_seal.lab": json.dumps({"trained": False})},
    )


def lora_graph(lab_model: str, lora: str, prompt: str, seed: int = 0, batch: int = 2) -> dict[str, Any]:
    """API-format graph: lab loader -> stock LoraLoader -> KSampler -> VAEDecode -> SaveImage (node "9")."""
    graph: dict[str, Any] = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": ksampler_node("2", "3", "4", "5", seed),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "via-lora"}},
    }
    return graph


def detect_graph(lab_model: str, prompts: list[str], unlearn_steps: int = 2) -> dict[str, Any]:
    """API-format graph: lab loader -> SealDetectPrompt (node "2"; chart previewed by node "3") whose
    report names the trigger for SealUnlearn (node "4"), whose loss plot node "5" previews."""
    graph = unlearn_graph(lab_model, "", prompts[0], steps=unlearn_steps)
    unlearn = graph["2"]
    unlearn["inputs"].update(scope="text", report=["2", 0])
    return {
        "1": graph["1"],
        "2": {
            "class_type": "SealDetectPrompt",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompts": "\n".join(prompts)},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
        "4": unlearn,
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}},
    }
