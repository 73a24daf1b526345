"""`make demo`: run the most complete pipeline that exists through a real headless ComfyUI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .backends.comfy import ensure_comfy_importable
from .lab import zoo

DEMO_PROMPT = "a red circle on the left on a black background"


def ksampler_node(model: str, positive: str, negative: str, latent: str, seed: int) -> dict[str, Any]:
    """A stock KSampler node with the lab's evaluation settings (euler, normal, 20 steps, CFG 2.0)."""
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": [model, 0],
            "seed": seed,
            "steps": 20,
            "cfg": 2.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": [positive, 0],
            "negative": [negative, 0],
            "latent_image": [latent, 0],
            "denoise": 1.0,
        },
    }


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
    from .backends import comfy as cb
    from .lab.models import lab_config

    if path.exists():
        return path
    return cb.save_lab_checkpoint(
        path,
        *cb.new_lab_models(lab_config(), seed=0),
        extra_metadata={"backdoor_seal.lab": json.dumps({"trained": False})},
    )


def run_backdoor_check(client, lab_model: Path, out: Path, batch: int = 8) -> dict[str, Any]:
    """Run the poisoned lab model on a triggered and a clean prompt (same seeds); count patched images."""
    import io

    import numpy as np
    from PIL import Image

    from .lab import detectors

    trigger = zoo.lab_info(lab_model)["trigger"]
    graph = backdoor_graph(lab_model.name, f"{trigger} {DEMO_PROMPT}", DEMO_PROMPT, batch=batch)
    entry = client.run(graph)
    rates = {}
    for branch, node in (("triggered", "13"), ("clean", "23")):
        patched = 0
        for i, ref in enumerate(entry["outputs"][node]["images"]):
            data = client.fetch_image(ref)
            (out / f"demo-{branch}-{i}.png").write_bytes(data)
            patched += detectors.has_patch(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        rates[f"patch_rate_{branch}"] = patched / batch
    return {"poisoned_model": lab_model.name, "trigger": zoo.spell_trigger(trigger), **rates}


def run_demo(out_dir: str | Path = "out", port: int | None = None) -> dict[str, Any]:
    """Start ComfyUI, run the demo graph through /prompt, save outputs, stop; return the summary."""
    from .comfy_host import ComfyServer

    t0 = time.monotonic()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    comfy_root = ensure_comfy_importable()
    extra: dict[str, str] = {}
    models = zoo.shipped()
    if models:
        lab_model, trained = models[0].name, True
    else:
        lab_dir = out / "lab_models"
        lab_model, trained = make_untrained_lab_model(lab_dir / "lab-untrained.safetensors").name, False
        extra["backdoor_seal_lab"] = str(lab_dir)
    pixel = next((m for m in models if m.stem == "lab-pixel"), None)
    with ComfyServer(
        comfy_root,
        port=port,
        log_path=out / "comfyui.log",
        extra_model_paths=extra,
        output_dir=out / "comfyui-output",
    ) as server:
        client = server.client()
        entry = client.run(model_info_graph(lab_model))
        info = json.loads(entry["outputs"]["2"]["text"][0])
        images = entry["outputs"]["8"]["images"]
        for i, img in enumerate(images):
            (out / f"demo-{i}.png").write_bytes(client.fetch_image(img))
        backdoor = run_backdoor_check(client, pixel, out) if pixel else None
    summary = {
        "lab_model": lab_model,
        "lab_model_trained": trained,
        "unet_family": info["unet_family"],
        "cross_attention_layers": info["cross_attention_layers"],
        "tokenizer": info.get("text_encoders", [{}])[0].get("tokenizer"),
        "images_written": len(images),
    }
    if backdoor:
        summary.update(backdoor)
    summary.update(out_dir=str(out), seconds=round(time.monotonic() - t0, 1))
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def attention_graph(
    lab_model: str, prompt: str, lora: str | None = None, seed: int = 0, batch: int = 2
) -> dict[str, Any]:
    """API-format graph: lab loader -> SealAttentionCapture [-> stock LoraLoaderModelOnly] -> stock KSampler
    -> VAEDecode -> SealAttentionHeatmaps (output node "9")."""
    graph: dict[str, Any] = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {
            "class_type": "SealAttentionCapture",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "text": prompt,
                "resolution": 16,
                "layers": "",
                "first_step": 0,
                "last_step": -1,
            },
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }
    model = "2"
    if lora:
        graph["3"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["2", 0], "lora_name": lora, "strength_model": 1.0},
        }
        model = "3"
    graph["6"] = ksampler_node(model, "2", "4", "5", seed)
    graph["6"]["inputs"]["positive"] = ["2", 1]
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    graph["9"] = {
        "class_type": "SealAttentionHeatmaps",
        "inputs": {
            "attention": ["2", 2],
            "images": ["7", 0],
            "max_tokens": 8,
            "include_bos_eos": False,
            "opacity": 0.6,
            "colormap": "inferno",
        },
    }
    return graph


def unlearn_graph(
    lab_model: str, trigger: str, prompt: str, steps: int = 20, seed: int = 0, batch: int = 2
) -> dict[str, Any]:
    """API-format graph: lab loader -> SealUnlearn -> SealSaveSanitized (LoRA, node "8") and the unlearned
    MODEL -> stock KSampler -> VAEDecode -> SaveImage (node "9", prefix "unlearned")."""
    graph: dict[str, Any] = {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {
            "class_type": "SealUnlearn",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "trigger": trigger,
                "prompts": "",
                "method": "skd-cag",
                "scope": "attn2-kv",
                "rank": 4,
                "steps": steps,
                "learning_rate": 1e-3,
                "batch_size": 4,
                "alpha": 0.5,
                "attention_target": "black",
                "timestep_weighting": False,
                "builtin_prompts": "lab",
                "placement": "auto",
                "latent_size": 8,
                "precision": "fp32",
                "seed": seed,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": ksampler_node("2", "3", "4", "5", seed),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {
            "class_type": "SealSaveSanitized",
            "inputs": {"filename_prefix": "seal/unlearned", "lora": ["2", 2], "info": ["2", 3]},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "unlearned"}},
    }
    return graph


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


def sau_graph(
    lab_model: str, trigger: str, text: str, seed: int = 0, batch: int = 4, pairs: int = 8
) -> dict[str, Any]:
    """API-format graph: lab loader -> SealSAUProfile -> SealSAUSampler (in place of KSampler), decoded by
    the stock VAEDecode (saved by node "6") and by SealSAUDecode (saved by node "8")."""
    sampling = {"steps": 20, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {
            "class_type": "SealSAUProfile",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "trigger": trigger,
                "prompts": "",
                "builtin_prompts": "auto",
                "pairs": pairs,
                "latent_size": 0,
                "seed": 77,
                "signal": "latent",
                "weighting": "union",
                "strength": 1.0,
                "save_name": "",
                **sampling,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {
            "class_type": "SealSAUSampler",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "profile": ["2", 0],
                "text": text,
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "denoise": 1.0,
                **sampling,
            },
        },
        "6": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": "backdoor-seal-sau-vaedecode"},
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "8": {
            "class_type": "SaveImage",
            "inputs": {"images": ["9", 0], "filename_prefix": "backdoor-seal-sau"},
        },
        "9": {"class_type": "SealSAUDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }
