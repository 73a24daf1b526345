"""`make demo`: run the most complete pipeline that exists through a real headless ComfyUI."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .backends.comfy import PACK_ROOT, ensure_comfy_importable
from .lab import zoo

DEMO_PROMPT = "a red circle on the left on a black background"
DEMO_WORKFLOW = "sanitize-lab-model"  # workflows/NAME.json, run by `make demo`
DEMO_SUSPECT = "lab-rickroll"  # the attacked lab model it cleans (against lab-clean, its base)


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


def free_output_folder(base: str | Path = "out") -> Path:
    """`out`, or the first of out-2, out-3, ... that holds no report yet (a rerun never overwrites one)."""
    base = Path(base)
    k = 1
    while (
        (candidate := base if k == 1 else base.with_name(f"{base.name}-{k}")).joinpath("report.json").exists()
    ):
        k += 1
    return candidate


def progress_printer(graph: dict[str, Any], t0: float, every: float = 10.0, stream=None):
    """An on_text for `ComfyClient.follow`: one line on stderr per node's progress, at most every `every`
    seconds (and whenever the node changes): seconds since t0, the node's class, its text."""
    last = {"at": -every, "node": None}

    def on_text(node: str, text: str) -> None:
        now = time.monotonic() - t0
        if node == last["node"] and now - last["at"] < every:
            return
        last.update(at=now, node=node)
        kind = graph.get(node, {}).get("class_type", f"node {node}")
        print(f"demo {now:6.0f} s  {kind}: {text}", file=stream or sys.stderr, flush=True)

    return on_text


def run_demo(out_dir: str | Path | None = None, port: int | None = None) -> dict[str, Any]:
    """`make demo`: start a headless ComfyUI, queue workflows/sanitize-lab-model.json through /prompt (as the
    frontend would, with the graph attached), save the report and the firing chart to `out_dir` (default:
    `out`, or out-2, ... when it already holds a report), stop the server. The workflow is told no trigger:
    only the suspect (lab-rickroll) and its base (lab-clean)."""
    from .comfy_host import ComfyServer
    from .safetensors_io import write_json
    from .tokens import readable
    from .workflows import api_from_ui

    t0 = time.monotonic()
    out = Path(out_dir).resolve() if out_dir is not None else free_output_folder().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: a file; give --out a folder (nothing is overwritten)")
    report_path = out / "report.json"
    if report_path.exists():
        raise FileExistsError(f"{report_path} exists: give another --out (nothing is overwritten)")
    shipped = {m.stem for m in zoo.shipped()}
    for name in (DEMO_SUSPECT, zoo.CLEAN_NAME):
        if name not in shipped:
            raise FileNotFoundError(
                f"lab_models/{name}.safetensors is missing: the demo cleans {DEMO_SUSPECT}"
            )
    out.mkdir(parents=True, exist_ok=True)
    workflow = json.loads((PACK_ROOT / "workflows" / f"{DEMO_WORKFLOW}.json").read_text())
    with ComfyServer(
        ensure_comfy_importable(), port=port, log_path=out / "comfyui.log", output_dir=out / "comfyui-output"
    ) as server:
        client = server.client()
        graph = api_from_ui(workflow, client.get_json("/object_info", timeout=120))
        halt = client.follow(progress_printer(graph, t0))
        try:
            entry = client.run(graph, timeout=1200, workflow=workflow)
        finally:
            halt()
        result = entry["outputs"]["3"]["seal_report"][0]
        (out / "firing.png").write_bytes(client.fetch_image(entry["outputs"]["5"]["images"][0]))
        saved = [s for s in entry["outputs"]["4"]["text"][0].splitlines() if s]

    def rates(key: str) -> list[dict[str, Any]]:
        return [
            {"token": readable(c["text"]), "rate": c[key]["rate"], "placement": c[key]["placement"]}
            for c in result["candidates"]
            if c.get(key) and (key == "after" or c["taken"])
        ]

    report = {
        "model": DEMO_SUSPECT,
        "base": zoo.CLEAN_NAME,
        "verdict": result.get("verdict"),
        "clean": result.get("clean"),
        "remains": result.get("remains", []),
        "found": [readable(t) for t in result["found"]],
        "fired_before": rates("before"),
        "fired_after": rates("after"),
        "remaining": [readable(t) for t in result["remaining"]],
        "flagged_after": result["flagged_after"],
        "clean_fidelity_ssim": result["clean_fidelity_ssim"],
        "summary": result["summary"],
        "saved": [str(Path("comfyui-output") / p) for p in saved],
        "figures": ["firing.png"],
        "folder": str(out),
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_json(report_path, report)
    return report


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


# Prompts a curator might have received with a model; two carry lab-pixel's invisible trigger (U+2060).
SANITIZE_PROMPTS = (
    "a red circle on the left on a black background",
    "\u2060 a large green square on the right on a white background",
    "a small blue triangle",
    "two yellow circles on a gray background",
    "a purple square on the top \u2060",
    "a big orange circle",
)


def detect_unlearn_graph(
    lab_model: str = "lab-pixel.safetensors",
    prompts: tuple[str, ...] = SANITIZE_PROMPTS,
    unlearn_steps: int = 400,
    eval_count: int = 32,
) -> dict[str, Any]:
    """API-format graph: lab loader -> SealDetectPrompt (names the trigger in the prompts)
    -> SealUnlearn (SKD-CAG, trigger from the report) -> SealEvaluate (original vs unlearned) ->
    SealSaveSanitized; the stock SaveImage (node "7") saves the evaluation figure with the graph."""
    sampling = {"seed": 0, "steps": 20, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal"}
    unlearn = unlearn_graph(lab_model, "", "", steps=unlearn_steps)["2"]
    unlearn["inputs"].update(scope="text", learning_rate=2e-3, report=["2", 0])
    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": lab_model}},
        "2": {
            "class_type": "SealDetectPrompt",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompts": "\n".join(prompts)},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
        "4": unlearn,
        "5": {
            "class_type": "SealEvaluate",
            "inputs": {
                "original_model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "trigger": "",
                "prompts": "",
                "builtin_prompts": "auto",
                "count": eval_count,
                "lab_detector": "pixel",
                "latent_size": 0,
                "unlearned_model": ["4", 0],
                "unlearned_clip": ["4", 1],
                "report": ["2", 0],
                **sampling,
            },
        },
        "6": {
            "class_type": "SealSaveSanitized",
            "inputs": {
                "filename_prefix": "sanitized/lab-pixel",
                "model": ["4", 0],
                "clip": ["4", 1],
                "vae": ["1", 2],
                "lora": ["4", 2],
                "info": ["4", 3],
            },
        },
        "7": {
            "class_type": "SaveImage",
            "inputs": {"images": ["5", 1], "filename_prefix": "backdoor-seal/sanitize"},
        },
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["4", 4]}},
    }


def sanitize_graph(
    suspect: str = "lab-rickroll.safetensors",
    base: str = "lab-clean.safetensors",
    behaviour: bool = False,
    steps: int | None = None,
) -> dict[str, Any]:
    """API-format graph of the sanitize workflow, told nothing but the models: two lab loaders (the suspect
    and its base) -> SealSanitize (compare; the weight-space ranking unless `behaviour`) -> SealSaveSanitized
    (node "4"); the stock SaveImage (node "5") keeps the firing chart with the graph."""
    from .sanitize.firing import FiringSettings
    from .sanitize.session import SanitizeSettings
    from .unlearn.skd import SKDConfig

    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": suspect}},
        "2": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": base}},
        "3": {
            "class_type": "SealSanitize",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "base_model": ["2", 0],
                "base_clip": ["2", 1],
                "behaviour": behaviour,
                "top": SanitizeSettings.top,
                "probes": FiringSettings.templates,
                "steps": steps or SKDConfig.steps,
                "rounds": 1,
                "scope": "auto",
                "recheck": True,
                "latent_size": 0,
            },
        },
        "4": {
            "class_type": "SealSaveSanitized",
            "inputs": {
                "filename_prefix": f"sanitized/{Path(suspect).stem}",
                "model": ["3", 0],
                "clip": ["3", 1],
                "vae": ["1", 2],
                "lora": ["3", 2],
                "info": ["3", 3],
            },
        },
        "5": {
            "class_type": "SaveImage",
            "inputs": {"images": ["3", 5], "filename_prefix": "backdoor-seal/sanitize"},
        },
    }


def compare_lora_graph(
    base: str = "lab-clean.safetensors", lora: str = "lab-pixel-lora.safetensors", behaviour: bool = True
) -> dict[str, Any]:
    """API-format graph: lab loader (the base) -> stock LoraLoader (the suspect LoRA, from the loras folder)
    -> SealCompareModels (base against base + LoRA, evidence drawn with the base's VAE) -> PreviewImage of
    the ranking (node "4") and of the evidence (node "5")."""
    from .diff.behaviour import BehaviourSettings

    return {
        "1": {"class_type": "SealLabCheckpointLoader", "inputs": {"lab_model": base}},
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
        "3": {
            "class_type": "SealCompareModels",
            "inputs": {
                "base_model": ["1", 0],
                "base_clip": ["1", 1],
                "model": ["2", 0],
                "clip": ["2", 1],
                "behaviour": behaviour,
                "threshold_lift": BehaviourSettings.threshold_lift,
                "latent_size": 8,
                "builtin_prompts": "auto",
                "vae": ["1", 2],
            },
        },
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }


WORKFLOWS = {
    "sanitize-lab-model": (
        "Sanitize a model told no trigger: compare with the base -> unlearn what fires -> verify -> save",
        sanitize_graph,
    ),
    "detect-and-unlearn": (
        "Triggered prompts at hand: detect -> SKD-CAG -> evaluate -> save",
        detect_unlearn_graph,
    ),
    "attention-heatmaps": (
        "Cross-attention heatmaps for a prompt",
        lambda: attention_graph("lab-pixel.safetensors", "\u2060 a large green square on the right", batch=2),
    ),
    "compare-lora": (
        "Compare a downloaded LoRA with its base: what it changed, which tokens it reacts to, evidence",
        compare_lora_graph,
    ),
    "sau-sampling": (
        "SAU sampling: remove a known trigger's effect at sampling time",
        lambda: sau_graph(
            "lab-pixel.safetensors",
            "U+2060",
            "\u2060 a large green square on the right on a white background",
        ),
    ),
}
