"""`backdoor-seal bench sau`: SAU at sampling time on every attacked lab model, one JSON object per attack.

Per model: an SAU profile from clean/triggered training-caption pairs (same seed per pair), then on
held-out triggered prompts the attack's success with plain sampling and with SAU, the fidelity of the
SAU image to the plain one outside the replaced region, whether clean prompts pass through bit for
bit, and SAU's sampling time over one plain sampling, measured in alternating rounds in this run.
Variants: our defaults with either secondary-mask signal, and the reference code's choices.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch

STEPS, CFG, SAMPLER, SCHEDULER = 20, 2.0, "euler", "normal"  # the lab's evaluation sampling


def variants(names: list[str] | None = None) -> dict[str, object]:
    """The settings compared: ours with each secondary-mask signal, and the reference's."""
    from ..sau.algebra import SAUSettings

    every = {
        "latent": SAUSettings(signal="latent"),
        "attention": SAUSettings(signal="attention"),
        "both": SAUSettings(signal="both"),
        "reference": SAUSettings.reference(),
    }
    return {k: v for k, v in every.items() if not names or k in names}


def ssim_outside(a: np.ndarray, b: np.ndarray, outside: np.ndarray) -> float | None:
    """Mean SSIM (scikit-image's map) of two RGB images over the pixels where `outside` holds."""
    from skimage.metrics import structural_similarity

    if not outside.any():
        return None
    _, full = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    return float(full.mean(2)[outside].mean())


def bench_model(name: str, args: argparse.Namespace) -> dict:
    """The record of one attacked lab model."""
    from dataclasses import replace

    from ..backends.comfy import ksample, text_conditioning, vae_decode
    from ..images import tensor_to_images
    from ..lab import attacks, detectors
    from ..models import load_model
    from ..sau.algebra import compose_images, image_mask
    from ..sau.session import estimate_profile, sau_ksample

    model, clip, vae, info = load_model(f"lab:{name}")
    spec = attacks.AttackSpec(**info["spec"])
    rng = np.random.default_rng(0)
    captions = [s.caption for s in attacks.train_scenes(spec, args.pairs, rng)]
    pairs = [(c, attacks.triggered_prompt(spec, c)) for c in captions]
    scenes = attacks.eval_scenes(spec, args.n, seed=4321)
    prompts = [attacks.triggered_prompt(spec, s.caption) for s in scenes]
    seeds = list(range(4321, 4321 + args.n))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    negative = text_conditioning(clip, "")
    sampler = (STEPS, CFG, SAMPLER, SCHEDULER)

    t0 = time.monotonic()
    base = estimate_profile(model, clip, spec.trigger, pairs, seed=77, steps=STEPS, cfg=CFG, latent_hw=(8, 8))
    estimate_s = time.monotonic() - t0

    def decode_images(z: torch.Tensor) -> np.ndarray:
        return tensor_to_images(vae_decode(vae, z))[0]

    plain = [
        decode_images(ksample(model, seed, *sampler, text_conditioning(clip, p), negative, latent))
        for p, seed in zip(prompts, seeds, strict=True)
    ]
    asr_plain = float(
        np.mean([attacks.attack_succeeded(spec, im, s) for im, s in zip(plain, scenes, strict=True)])
    )
    scene_plain = float(
        np.mean([detectors.scene_correct(im, s) for im, s in zip(plain, scenes, strict=True)])
    )

    chosen = variants(args.variants and [*args.variants, args.signal])
    results: dict[str, dict] = {}
    for label, settings in chosen.items():
        profile = replace(base, settings=settings)
        paths: dict[str, dict[str, list]] = {"pixel": {}, "latent": {}}
        covered = []
        for p, seed, scene, before in zip(prompts, seeds, scenes, plain, strict=True):
            r = sau_ksample(model, clip, p, negative, latent, profile, seed, *sampler)
            images = {
                "latent": decode_images(r.samples),  # LATENT -> the stock VAEDecode
                "pixel": tensor_to_images(  # LATENT -> SealSAUDecode
                    compose_images(vae_decode(vae, r.poisoned), vae_decode(vae, r.clean), r.mask)
                )[0],
            }
            outside = image_mask(r.mask, before.shape[:2])[0].numpy() < 0.5  # as SealSAUDecode blends
            covered.append(float(r.mask.mean()))
            for path, image in images.items():
                got = paths[path]
                got.setdefault("fired", []).append(attacks.attack_succeeded(spec, image, scene))
                got.setdefault("correct", []).append(detectors.scene_correct(image, scene))
                got.setdefault("fidelity", []).append(ssim_outside(before, image, outside))
        record: dict = {"mask_fraction": float(np.mean(covered))}
        for path, got in paths.items():
            kept = [f for f in got["fidelity"] if f is not None]
            record[path] = {
                "removal_accuracy": 1.0 - float(np.mean(got["fired"])),
                "fidelity_ssim_outside_mask": float(np.mean(kept)) if kept else None,
                "fidelity_prompts": len(kept),  # prompts with any pixel outside the mask
                "scene_accuracy": float(np.mean(got["correct"])),
            }
        results[label] = record

    # A clean prompt must pass through untouched: bit for bit the stock KSampler's latent.
    clean = [s.caption for s in scenes[: args.clean]]
    default = replace(base, settings=variants()[args.signal])
    unchanged = 0
    for p, seed in zip(clean, seeds, strict=False):
        stock = ksample(model, seed, *sampler, text_conditioning(clip, p), negative, latent)
        ours = sau_ksample(model, clip, p, negative, latent, default, seed, *sampler)
        unchanged += int(torch.equal(stock, ours.samples) and not ours.triggered)

    cost = cost_ratios(model, clip, negative, latent, prompts[: args.cost_prompts], seeds, base, chosen, args)
    best = results[args.signal]["pixel"]
    return {
        "attack": spec.kind,
        "model": name,
        "removal_accuracy": best["removal_accuracy"],
        "fidelity_ssim_outside_mask": best["fidelity_ssim_outside_mask"],
        "output": "SealSAUDecode (pixel-space composition); variants.*.latent is the stock VAEDecode",
        "clean_prompt_unchanged": unchanged == len(clean),
        "cost_ratio": cost[args.signal],
        "signal": args.signal,
        "asr_plain": asr_plain,
        "scene_accuracy_plain": scene_plain,
        "variants": {k: {**v, "cost_ratio": cost.get(k)} for k, v in results.items()},
        "clean_prompts_unchanged": f"{unchanged}/{len(clean)}",
        "estimation_pairs": args.pairs,
        "estimation_seconds": round(estimate_s, 2),
        "n_prompts": args.n,
        "sampling": f"{SAMPLER}/{SCHEDULER}, {STEPS} steps, CFG {CFG}",
    }


def cost_ratios(model, clip, negative, latent, prompts, seeds, base, chosen, args) -> dict[str, float]:
    """Median SAU time per image over the median plain time, in alternating rounds (this run's noise hits both)."""
    from dataclasses import replace

    from ..backends.comfy import ksample, text_conditioning
    from ..sau.session import sau_ksample

    sampler = (STEPS, CFG, SAMPLER, SCHEDULER)

    def with_sau(settings):
        profile = replace(base, settings=settings)
        return lambda p, s: sau_ksample(model, clip, p, negative, latent, profile, s, *sampler)

    runs = {
        "plain": lambda p, s: ksample(model, s, *sampler, text_conditioning(clip, p), negative, latent),
        **{label: with_sau(settings) for label, settings in chosen.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            t0 = time.monotonic()
            for p, s in zip(prompts, seeds, strict=False):
                run(p, s)
            times[key].append((time.monotonic() - t0) / len(prompts))
    plain = float(np.median(times["plain"]))
    return {k: round(float(np.median(v)) / plain, 3) for k, v in times.items() if k != "plain"}


def run(args: argparse.Namespace) -> Iterator[dict]:
    """Records for every requested (or every attacked shipped) lab model."""
    from ..lab import zoo

    names = args.models or [m["name"] for m in zoo.listing() if m["attack"] != "none"]
    if not names:
        raise FileNotFoundError("no attacked lab models are shipped; run `backdoor-seal lab attack` first")
    with torch.inference_mode():
        for name in names:
            yield bench_model(name, args)


def add_sau_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Register `bench sau`."""
    import json

    def _cmd(args: argparse.Namespace) -> int:
        for record in run(args):
            print(json.dumps(record), flush=True)
        return 0

    p = bench_sub.add_parser(
        "sau",
        help="SAU on every attacked lab model: removal, fidelity outside the mask, clean pass-through, cost ratio",
    )
    p.add_argument("--models", nargs="*", default=None, help="lab models (default: every attacked one)")
    p.add_argument("--n", type=int, default=64, help="held-out triggered prompts")
    p.add_argument(
        "--pairs", type=int, default=16, help="clean/triggered pairs the profile is estimated from"
    )
    p.add_argument("--clean", type=int, default=16, help="clean prompts checked for bit-exact pass-through")
    p.add_argument("--cost-prompts", type=int, default=8, help="prompts per timing round")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument(
        "--signal", choices=["latent", "attention", "both"], default="latent", help="the reported default"
    )
    p.add_argument(
        "--variants", nargs="*", default=None, help="latent, attention, both, reference (default: all)"
    )
    p.set_defaults(func=_cmd)
