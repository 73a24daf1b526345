"""`backdoor-seal bench unlearn`: SKD and SKD-CAG on every attacked lab model, against the reference setup.

For each model: the attack's success and the clean images before; per method, an unlearning run
whose removal is checked as it trains (time until ASR <= 1% on check prompts, check time excluded),
then ASR, clean accuracy and SSIM fidelity on held-out prompts. The reference configuration (full
UNet, fp32, batch 1, a deep-copied teacher) runs in the same process for the time ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

# Which weights to train per attack: the text encoder holds a Rickrolling backdoor, the cross-
# attention key/value projections the others' trigger routes (see docs/unlearn.md for the sweep).
DEFAULT_SCOPE = {"rickroll": "text"}
CHECK_PROMPTS = 32
CHECK_SEED = 9000


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 RGB images (scikit-image)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


class RemovalClock:
    """An on_step hook: every `every` steps, sample the check prompts with the training clone and stop
    the clock (training time only) once the attack fires on at most `threshold` of them."""

    def __init__(
        self,
        asr_of: Callable[[], float],
        every: int,
        threshold: float = 0.01,
        budget_s: float | None = None,
        stop_when_removed: bool = False,
    ) -> None:
        self.asr_of, self.every, self.threshold = asr_of, every, threshold
        self.budget_s, self.stop_when_removed = budget_s, stop_when_removed
        self.t0 = time.monotonic()
        self.check_s = 0.0
        self.removed_at_s: float | None = None
        self.removed_at_step: int | None = None
        self.history: list[tuple[int, float, float]] = []  # (step, training seconds, check ASR)

    def training_seconds(self) -> float:
        """Seconds spent training so far (checks excluded)."""
        return time.monotonic() - self.t0 - self.check_s

    def __call__(self, step: int) -> bool:
        if step % self.every == 0 and self.removed_at_s is None:
            trained = self.training_seconds()
            t = time.monotonic()
            asr = self.asr_of()
            self.check_s += time.monotonic() - t
            self.history.append((step, round(trained, 2), asr))
            if asr <= self.threshold:
                self.removed_at_s, self.removed_at_step = trained, step
                return self.stop_when_removed
        return self.budget_s is not None and self.training_seconds() >= self.budget_s


def _images(model, clip, vae, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    import torch

    from ..lab.evaluate import sample_images

    with torch.no_grad():  # a training clone's deltas require grad; sampling must not build a graph
        return sample_images(model, clip, vae, prompts, seeds)


def _asr(spec, images, scenes) -> float:
    from ..lab import attacks

    return float(
        np.mean([attacks.attack_succeeded(spec, im, s) for im, s in zip(images, scenes, strict=True)])
    )


def _clean_set(n: int, seed: int = 1234) -> tuple[list, list[str], list[int]]:
    from ..lab import world

    n_rich = n // 4
    scenes = world.scene_dataset(n - n_rich, seed=seed, split="eval") + world.scene_dataset(
        n_rich, seed=seed + 1, split="eval", rich=True
    )
    return scenes, [s.caption for s in scenes], list(range(seed, seed + n))


def _accuracy(images, scenes) -> float:
    from ..lab import detectors

    return float(np.mean([detectors.scene_correct(im, s) for im, s in zip(images, scenes, strict=True)]))


def _session(model, clip, spec, opts, teacher: str = "switch"):
    from ..lab import attacks
    from ..unlearn.session import UnlearnSession

    rng = np.random.default_rng(opts.skd.seed)
    prompts = [s.caption for s in attacks.train_scenes(spec, opts.builtin_count, rng)]
    return UnlearnSession(
        model,
        clip,
        spec.trigger,
        prompts,
        replace(opts, builtin="none"),
        insert=lambda p: attacks.triggered_prompt(spec, p),
        teacher=teacher,
    )


def bench_model(name: str, args: argparse.Namespace) -> Iterator[dict]:
    """One JSON record per method for one attacked lab model."""
    from ..lab import attacks
    from ..unlearn.cli import load_model, options_from_args

    model, clip, vae, info = load_model(f"lab:{name}")
    spec = attacks.AttackSpec(**info["spec"])
    trig_scenes = attacks.eval_scenes(spec, args.n, seed=4321)
    trig_prompts = [attacks.triggered_prompt(spec, s.caption) for s in trig_scenes]
    trig_seeds = list(range(4321, 4321 + args.n))
    check_scenes = attacks.eval_scenes(spec, CHECK_PROMPTS, seed=CHECK_SEED)
    check_prompts = [attacks.triggered_prompt(spec, s.caption) for s in check_scenes]
    check_seeds = list(range(CHECK_SEED, CHECK_SEED + CHECK_PROMPTS))
    clean_scenes, clean_prompts, clean_seeds = _clean_set(args.n)

    asr_before = _asr(spec, _images(model, clip, vae, trig_prompts, trig_seeds), trig_scenes)
    clean_before = _images(model, clip, vae, clean_prompts, clean_seeds)
    acc_before = _accuracy(clean_before, clean_scenes)

    def checker(session) -> Callable[[], float]:
        def asr_now() -> float:
            d = session.distillation
            d.switch.on = True
            return _asr(spec, _images(d.model, d.clip, vae, check_prompts, check_seeds), check_scenes)

        return asr_now

    ours_removal_s: float | None = None
    for method in args.methods:
        opts = options_from_args(args, lab=True)
        scope = args.scope or DEFAULT_SCOPE.get(spec.kind, "attn2-kv")
        opts = replace(opts, scope=scope, skd=replace(opts.skd, method=method), builtin_count=args.prompts)
        session = _session(model, clip, spec, opts)
        clock = RemovalClock(checker(session), args.check_every)
        t0 = time.monotonic()
        result = session.run(on_step=clock)
        seconds = time.monotonic() - t0 - clock.check_s
        new_model, new_clip, _ = session.outputs()
        trig_after = _images(new_model, new_clip, vae, trig_prompts, trig_seeds)
        clean_after = _images(new_model, new_clip, vae, clean_prompts, clean_seeds)
        asr_after = _asr(spec, trig_after, trig_scenes)
        record = {
            "model": name,
            "method": method,
            "attack": spec.kind,
            "scope": scope,
            "rank": opts.rank,
            "asr_before": asr_before,
            "asr_after": asr_after,
            "removal_accuracy": 1.0 - asr_after,
            "clean_fidelity_ssim": float(
                np.mean([ssim(a, b) for a, b in zip(clean_before, clean_after, strict=True)])
            ),
            "clean_accuracy_before": acc_before,
            "clean_accuracy": _accuracy(clean_after, clean_scenes),
            "steps": result.steps,
            "batch": opts.skd.batch,
            "lr": opts.skd.lr,
            "seconds": round(seconds, 2),
            "time_to_removal_s": None if clock.removed_at_s is None else round(clock.removed_at_s, 2),
            "removal_step": clock.removed_at_step,
            "check_history": clock.history,  # (step, training seconds, ASR on the check prompts)
            "n_prompts": args.n,
        }
        if method == args.methods[-1]:
            ours_removal_s = clock.removed_at_s
        if method == args.methods[-1] and args.reference:
            record.update(reference_run(model, clip, spec, args, checker, ours_removal_s))
        yield record


def reference_run(model, clip, spec, args, checker, ours_s: float | None) -> dict:
    """The reference configuration until ASR <= 1% or ten times our time to removal."""
    from ..unlearn.cli import options_from_args

    opts = options_from_args(args, lab=True)
    opts = replace(
        opts,
        scope="unet" if spec.kind != "rickroll" else "text",
        rank=0,
        builtin_count=args.prompts,
        skd=replace(opts.skd, batch=1, precision="fp32", lr=args.reference_lr, steps=10**9),
    )
    if ours_s is None:
        return {"time_to_removal_ratio": None, "reference_note": "ours did not reach ASR <= 1%"}
    cap = 10.0 * ours_s
    session = _session(model, clip, spec, opts, teacher="copy")
    clock = RemovalClock(checker(session), args.reference_check_every, budget_s=cap, stop_when_removed=True)
    session.run(on_step=clock)
    if clock.removed_at_s is None:
        return {
            "reference_time_to_removal_s": None,
            "time_to_removal_ratio": round(clock.training_seconds() / ours_s, 2),
            "reference_capped": True,
            "reference_lr": args.reference_lr,
        }
    return {
        "reference_time_to_removal_s": round(clock.removed_at_s, 2),
        "time_to_removal_ratio": round(clock.removed_at_s / ours_s, 2),
        "reference_capped": False,
        "reference_lr": args.reference_lr,
    }


def run(args: argparse.Namespace) -> Iterator[dict]:
    """Records for every requested (or every attacked shipped) lab model."""
    from ..lab import zoo

    names = args.models or [m["name"] for m in zoo.listing() if m["attack"] != "none"]
    if not names:
        raise FileNotFoundError("no attacked lab models are shipped; run `backdoor-seal lab attack` first")
    for name in names:
        yield from bench_model(name, args)
