"""`backdoor-seal bench capture`: what cross-attention capture costs, and proof it changes nothing."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch

from ..attention import CaptureSettings, CrossAttentionRecorder


# Stable Diffusion 1.5's UNet as ComfyUI builds it (860M parameters); random weights suffice for timing.
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure_overhead(run_plain, run_captured, repeats: int) -> dict[str, float]:
    """Alternate plain and captured runs (order flipped each round); median time ratio and parity."""
    run_plain(), run_captured()  # warm-up: first calls pay for allocation and dispatch caches
    ratios, plain_s, captured_s, parity = [], [], [], 0.0
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        times, outs = {}, {}
        for captured in order:
            t = time.perf_counter()
            outs[captured] = (run_captured if captured else run_plain)()
            times[captured] = time.perf_counter() - t
        ratios.append(times[True] / times[False])
        plain_s.append(times[False])
        captured_s.append(times[True])
        parity = max(parity, (outs[True] - outs[False]).abs().max().item())
    return {
        "overhead_ratio": statistics.median(ratios),
        "parity_max_abs": parity,
        "plain_seconds_median": statistics.median(plain_s),
        "capture_seconds_median": statistics.median(captured_s),
    }


def bench_lab(
    model_name: str | None, batch: int, steps: int, repeats: int, settings: CaptureSettings
) -> dict[str, Any]:
    """Overhead and parity on a lab model, sampled as the lab evaluates (euler, normal, CFG 1)."""
    from ..backends import comfy as cb
    from ..backends import comfy_lab
    from ..lab import world, zoo
    from ..lab.models import lab_config

    cb.ensure_comfy_importable()
    if model_name is None and (zoo.LAB_MODELS / f"{zoo.CLEAN_NAME}.safetensors").is_file():
        model_name = zoo.CLEAN_NAME
    if model_name:
        path = zoo.resolve(model_name)
        model, clip, _vae, _ = comfy_lab.load_lab_checkpoint(path)
        label = path.stem
    else:
        model, clip, _vae = comfy_lab.new_lab_models(lab_config())
        label = "lab (untrained weights)"
    prompts = [s.caption for s in world.scene_dataset(batch, seed=1234, split="eval")]
    seeds = list(range(batch))
    backend = cb.ComfyBackend(model, clip)
    recorder = CrossAttentionRecorder(settings)

    def plain():
        return backend.sample(prompts, seeds, steps, 1.0)

    def captured():
        return backend.sample(prompts, seeds, steps, 1.0, recorder=recorder)

    out = measure_overhead(plain, captured, repeats)
    maps = recorder.maps()
    return {
        "model": label,
        **out,
        "layers": len(maps.per_layer),
        "steps": steps,
        "batch": batch,
        "sampler": "euler/normal, CFG 1.0",
        "resolution": settings.resolution,
    }


def bench_sd15(steps: int, repeats: int, settings: CaptureSettings) -> dict[str, Any]:
    """Overhead and parity on an SD1.5-architecture UNet (random weights), 32x32 latents, CFG 7."""
    from ..backends import comfy as cb
    from ..backends.comfy_families import build_model

    model = build_model("sd15", "full")
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    latent = torch.zeros(1, 4, 32, 32)
    noise = cb.seeded_noise(latent, [0])
    recorder = CrossAttentionRecorder(settings)
    patched = cb.attach_attention_recorder(model, recorder)

    def run(m):
        return cb.sample(m, noise, latent, cond, uncond, steps, 7.0, seed=0)

    out = measure_overhead(lambda: run(model), lambda: run(patched), repeats)
    return {f"sd15_{k}": v for k, v in out.items()} | {
        "sd15_layers": len(recorder.maps().per_layer),
        "sd15_steps": steps,
    }


def run(args) -> dict[str, Any]:
    """The `bench capture` JSON object."""
    torch.manual_seed(0)
    settings = CaptureSettings(resolution=args.resolution)
    result = bench_lab(args.model, args.batch, args.steps, args.repeats, settings)
    if not args.skip_sd15:
        result |= bench_sd15(args.sd15_steps, args.sd15_repeats, settings)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    result["torch_threads"] = torch.get_num_threads()
    return result
