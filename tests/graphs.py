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


FAMILY_TRIGGER = "cf"
FAMILY_PROMPTS = ("a red cat on the left", "a blue dog in a garden", "a green car at night")
FAMILY_SCOPES = ("text", "attn2-kv")


def family_graph(
    family: str, prediction: str = "eps", seed: int = 3, profile_name: str = ""
) -> dict[str, Any]:
    """API-format graph: SealLabFamilyModel (a tiny random-weight SD15 / SD20 / SDXL) through every node of the
    pack that takes a MODEL or CLIP, at an 8x8 latent and 2 sampling / training steps:
    "2" SealModelInfo; "3" SealAttentionCapture -> "6" stock KSampler -> "7" VAEDecode -> "8" SealAttentionHeatmaps;
    "9" SealDetectPrompt ("10" previews its chart);
    per scope s in FAMILY_SCOPES (k = 0, 1): "2k+20" SealUnlearn -> "2k+21" SealSaveSanitized (checkpoint +
    kohya LoRA); "30" SealSAUProfile -> "31" SealSAUSampler -> "32" SealSAUDecode ("33" previews);
    "40" SealEvaluate (original against the text-scope unlearned model, a black target image "41"; "42" previews
    its figure); "50" SealCompareModels (weight space) -> "52" SealSanitize ("53" previews its chart)."""
    sampling = {"seed": seed, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
    prompts = "\n".join(FAMILY_PROMPTS)
    model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    graph: dict[str, Any] = {
        "1": {
            "class_type": "SealLabFamilyModel",
            "inputs": {"family": family, "prediction": prediction, "seed": seed},
        },
        "2": {"class_type": "SealModelInfo", "inputs": {"model": model, "clip": clip}},
        "3": {
            "class_type": "SealAttentionCapture",
            "inputs": {
                "model": model,
                "clip": clip,
                "text": f"{FAMILY_TRIGGER} {FAMILY_PROMPTS[0]}",
                "resolution": 16,
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
                **sampling,
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
        "9": {
            "class_type": "SealDetectPrompt",
            "inputs": {
                "model": model,
                "clip": clip,
                "prompts": f"{FAMILY_TRIGGER} {FAMILY_PROMPTS[0]}\n{FAMILY_PROMPTS[1]}",
                "clean_prompts": prompts,
                "builtin_prompts": "general",
                "latent_size": 8,
            },
        },
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 1]}},
    }
    for k, scope in enumerate(FAMILY_SCOPES):
        unlearn, save = str(20 + 2 * k), str(21 + 2 * k)
        graph[unlearn] = {
            "class_type": "SealUnlearn",
            "inputs": {
                "model": model,
                "clip": clip,
                "trigger": FAMILY_TRIGGER,
                "prompts": prompts,
                "method": "skd-cag",
                "scope": scope,
                "rank": 4,
                "steps": 2,
                "learning_rate": 1e-2,
                "batch_size": 2,
                "alpha": 0.5,
                "attention_target": "black",
                "timestep_weighting": False,
                "builtin_prompts": "none",
                "placement": "auto",
                "latent_size": 8,
                "precision": "fp32",
                "seed": seed,
            },
        }
        graph[save] = {
            "class_type": "SealSaveSanitized",
            "inputs": {
                "filename_prefix": f"families/{family}-{scope}",
                "model": [unlearn, 0],
                "clip": [unlearn, 1],
                "vae": vae,
                "lora": [unlearn, 2],
                "info": [unlearn, 3],
                "dtype": "fp16",
                "lora_layout": "kohya",
            },
        }
    graph["30"] = {
        "class_type": "SealSAUProfile",
        "inputs": {
            "model": model,
            "clip": clip,
            "trigger": FAMILY_TRIGGER,
            "prompts": prompts,
            "builtin_prompts": "general",
            "pairs": 2,
            "latent_size": 8,
            "signal": "latent",
            "weighting": "union",
            "strength": 1.0,
            "save_name": profile_name,
            **sampling,
        },
    }
    graph["31"] = {
        "class_type": "SealSAUSampler",
        "inputs": {
            "model": model,
            "clip": clip,
            "profile": ["30", 0],
            "text": f"{FAMILY_TRIGGER} {FAMILY_PROMPTS[1]}",
            "negative": ["4", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
            **sampling,
        },
    }
    graph["32"] = {"class_type": "SealSAUDecode", "inputs": {"samples": ["31", 0], "vae": vae}}
    graph["33"] = {"class_type": "PreviewImage", "inputs": {"images": ["32", 0]}}
    graph["41"] = {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    }
    graph["40"] = {
        "class_type": "SealEvaluate",
        "inputs": {
            "original_model": model,
            "clip": clip,
            "vae": vae,
            "trigger": FAMILY_TRIGGER,
            "prompts": prompts,
            "builtin_prompts": "general",
            "count": 2,
            "lab_detector": "none",
            "latent_size": 8,
            "unlearned_model": ["20", 0],
            "unlearned_clip": ["20", 1],
            "target": ["41", 0],
            **sampling,
        },
    }
    graph["42"] = {"class_type": "PreviewImage", "inputs": {"images": ["40", 1]}}  # makes SealEvaluate run
    # the family model against its attn2-kv unlearned copy: weight space only (the behavioural stage scores
    # all 49,408 tokens in both models, minutes on a CPU; it runs on lab models in tests/test_nodes_diff.py)
    graph["50"] = {
        "class_type": "SealCompareModels",
        "inputs": {
            "base_model": model,
            "base_clip": clip,
            "model": ["22", 0],
            "clip": ["22", 1],
            "behaviour": False,
            "threshold_lift": 5.0,
            "latent_size": 8,
            "builtin_prompts": "general",
        },
    }
    graph["51"] = {"class_type": "PreviewImage", "inputs": {"images": ["50", 1]}}
    # Seal Sanitize on the same pair from that report: the firing test on its best candidate, at 8x8
    graph["52"] = {
        "class_type": "SealSanitize",
        "inputs": {
            "model": ["22", 0],
            "clip": ["22", 1],
            "vae": vae,
            "base_model": model,
            "base_clip": clip,
            "report": ["50", 0],
            "top": 1,
            "probes": 2,
            "steps": 2,
            "recheck": False,
            "latent_size": 8,
        },
    }
    graph["53"] = {"class_type": "PreviewImage", "inputs": {"images": ["52", 5]}}
    return graph


def profile_reload_graph(family: str, prediction: str, seed: int, profile: str) -> dict[str, Any]:
    """API-format graph: a saved SAU profile through SealLoadSAUProfile -> SealSAUSampler on SealLabFamilyModel's
    model -> SealSAUDecode (previewed by node "7")."""
    sampling = {"seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
    return {
        "1": {
            "class_type": "SealLabFamilyModel",
            "inputs": {"family": family, "prediction": prediction, "seed": seed},
        },
        "2": {"class_type": "SealLoadSAUProfile", "inputs": {"profile": profile}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "SealSAUSampler",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "profile": ["2", 0],
                "text": f"{FAMILY_TRIGGER} a small house",
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
                **sampling,
            },
        },
        "6": {"class_type": "SealSAUDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
