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

from ..evaluate.metrics import ssim

# Per attack, what SKD / SKD-CAG train (docs/unlearn.md has the sweep): the text encoder, where every
# trigger enters, except for EvilEdit, a closed-form edit of the cross-attention keys and values, which
# distillation undoes there (its text-encoder runs lost clean accuracy). Context matching always trains
# the text encoder: with a general clean set kept beside the twins it removes EvilEdit there too.
# Style trains at lr 5e-3: removed by step 10 (30 at 2e-3) inside the fidelity targets. Rickrolling at
# 5e-3 was removed by step 70 (100 at 2e-3) but fell under its clean-accuracy target (0.859 < 0.861).
RECIPES: dict[str, dict] = {
    "eviledit": {"scope": "attn2-kv", "lr": 4e-3},
    "style": {"scope": "text", "lr": 5e-3},
}
DEFAULT_RECIPE = {"scope": "text", "lr": 2e-3}
CHECK_PROMPTS = 32
REMOVED_ASR = 0.01  # the "removed": ASR at most 1% on the check prompts
CHECK_SEED = 9000


class RemovalClock:
    """An on_step hook: every `every` steps, sample the check prompts with the training clone and stop
    the clock (training time only) once the attack fires on at most `threshold` of them."""

    def __init__(
        self,
        asr_of: Callable[[], float],
        every: int,
        threshold: float = REMOVED_ASR,
        stop_when_removed: bool = False,
        budget_steps: int | None = None,
    ) -> None:
        self.asr_of, self.every, self.threshold = asr_of, every, threshold
        self.stop_when_removed, self.budget_steps = stop_when_removed, budget_steps
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
        return self.budget_steps is not None and step >= self.budget_steps


def step_seconds(sessions: dict, rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Median seconds per training step of each session, measured in alternating rounds.

    The machine's speed drifts by several times within a run; alternating short rounds lets the
    drift hit every configuration alike, so the ratio of the medians is what the run can trust. A round
    times its steps from the end of its first to the end of its last: what a run pays once (ComfyUI
    loading a model back after another session ran, context matching encoding its clean prompts) would
    otherwise count ten times over in a ten-step round."""
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            ends: list[float] = []

            def on_step(step: int, ends=ends) -> bool:
                ends.append(time.monotonic())
                return step >= steps + 1

            session.run(on_step=on_step)
            times[key].append((ends[-1] - ends[0]) / (len(ends) - 1))
    return {key: float(np.median(v)) for key, v in times.items()}


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
    from ..prompts import lab_prompts
    from ..unlearn.match import KEEP_PROMPTS
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
        keep=lab_prompts(KEEP_PROMPTS, opts.skd.seed + 1),  # the lab's grammar, as a lab user's built-in set
    )


def bench_model(name: str, args: argparse.Namespace) -> Iterator[dict]:
    """One JSON record per method for one attacked lab model."""
    from ..lab import attacks
    from ..models import load_model
    from ..unlearn.session import trains_text

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
    # The attacked model shows its target on a few prompts WITHOUT the trigger too (fine-tuning
    # leaks). Self-distillation's teacher is that model, so no method that makes triggered prompts
    # act like clean ones goes below this floor; removal counts from there.
    asr_floor = _asr(
        spec, _images(model, clip, vae, [s.caption for s in trig_scenes], trig_seeds), trig_scenes
    )
    check_floor = _asr(
        spec, _images(model, clip, vae, [s.caption for s in check_scenes], check_seeds), check_scenes
    )
    threshold = max(REMOVED_ASR, check_floor)
    clean_before = _images(model, clip, vae, clean_prompts, clean_seeds)
    acc_before = _accuracy(clean_before, clean_scenes)

    def checker(session) -> Callable[[], float]:
        def asr_now() -> float:
            d = session.distillation
            d.switch.on = True
            return _asr(spec, _images(d.model, d.clip, vae, check_prompts, check_seeds), check_scenes)

        return asr_now

    records: list[dict] = []
    options = {}
    recipe = {**DEFAULT_RECIPE, **RECIPES.get(spec.kind, {})}
    scope, lr = args.scope or recipe["scope"], args.lr or recipe["lr"]
    schedule = getattr(args, "lr_schedule", None) or recipe.get("schedule", "constant")
    base = _options(args, scope=scope, lr=lr, schedule=schedule)
    for method in args.methods:
        opts = replace(base, skd=replace(base.skd, method=method))
        if method == "match" and not trains_text(scope):
            if args.scope:
                continue  # asked for a scope without a text-encoder delta: matching has nothing to train
            opts = replace(opts, scope="text")  # matching trains the text encoder whatever SKD's recipe is
        options[method] = opts
        session = _session(model, clip, spec, opts)
        clock = RemovalClock(checker(session), args.check_every, threshold=threshold)
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
            "scope": opts.scope,
            "rank": opts.rank,
            "asr_before": asr_before,
            "asr_floor": asr_floor,  # the attacked model on the same prompts without the trigger
            "removal_threshold": threshold,  # check ASR that counts as removed: max(1%, its floor)
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
            "lr_schedule": opts.skd.schedule,
            "retain": opts.skd.retain,
            "alpha": opts.skd.attention_weight,
            "seconds": round(seconds, 2),
            "time_to_removal_s": None,  # removal step x median seconds per step (filled with the reference)
            "wall_time_to_removal_s": None if clock.removed_at_s is None else round(clock.removed_at_s, 2),
            "removal_step": clock.removed_at_step,
            "check_history": clock.history,  # (step, training seconds, ASR on the check prompts)
            "n_prompts": args.n,
            "check_every": args.check_every,
        }
        records.append(record)
    # Time to removal = the step at which the check prompts came clean x the configuration's median
    # seconds per step, measured alternately with the reference's (the raw clock is kept too).
    if args.reference:
        ref_opts = reference_options(args, spec)
        costs = step_seconds(
            {
                **{m: _session(model, clip, spec, o) for m, o in options.items()},
                "reference": _session(model, clip, spec, ref_opts, teacher="copy"),
            }
        )
        for r in records:
            r["step_seconds"] = round(costs[r["method"]], 4)
            if r["removal_step"] is not None:
                r["time_to_removal_s"] = round(r["removal_step"] * costs[r["method"]], 2)
        ours = [r["time_to_removal_s"] for r in records if r["removal_step"] is not None]
        reference = (
            reference_run(
                model, clip, spec, ref_opts, args, checker, costs["reference"], max(ours), threshold
            )
            if ours
            else None
        )
    for r in records:
        if not args.reference:
            yield r
            continue
        if r["removal_step"] is None:
            r.update(
                time_to_removal_ratio=None,
                reference_note="ours did not reach the removal threshold on the check prompts",
            )
        else:
            r.update(time_to_removal_ratio(reference, r["time_to_removal_s"]))
        yield r


def time_to_removal_ratio(reference: dict, ours_s: float) -> dict:
    """Reference / ours time to removal; past ten times ours the reference counts as capped (ratio 10)."""
    ref_s = reference["reference_time_to_removal_s"]
    capped = ref_s is None or ref_s > 10.0 * ours_s
    return {
        **{k: v for k, v in reference.items() if k.startswith("reference_")},
        "time_to_removal_ratio": 10.0 if capped else round(ref_s / ours_s, 2),
        "reference_capped": capped,
    }


def _options(args: argparse.Namespace, scope: str, lr: float, schedule: str = "constant"):
    """UnlearnOptions from the command line with this scope, lr and lr schedule, on the lab's training prompts."""
    from ..unlearn.cli import options_from_args

    given = {**vars(args), "scope": scope, "lr": lr, "lr_schedule": schedule}
    opts = options_from_args(argparse.Namespace(**given), lab=True)
    return replace(opts, builtin_count=args.prompts)


def reference_options(args: argparse.Namespace, spec):
    """The reference configuration: full UNet (the text encoder for Rickrolling), fp32, batch 1, no retain;
    SKD-CAG, the paper's method."""
    opts = _options(args, scope="unet" if spec.kind != "rickroll" else "text", lr=args.reference_lr)
    skd = replace(opts.skd, method="skd-cag", batch=1, precision="fp32", steps=10**9, retain=0.0)
    return replace(opts, rank=0, skd=skd)


def reference_run(
    model, clip, spec, opts, args, checker, step_s: float, ours_s: float, threshold: float
) -> dict:
    """The reference until the check ASR reaches `threshold`, or for the steps ten times `ours_s` buys it."""
    budget = int(np.ceil(10.0 * ours_s / step_s))
    session = _session(model, clip, spec, opts, teacher="copy")
    clock = RemovalClock(
        checker(session),
        args.reference_check_every,
        threshold=threshold,
        budget_steps=budget,
        stop_when_removed=True,
    )
    session.run(on_step=clock)
    step = clock.removed_at_step
    return {
        "reference_removal_step": step,
        "reference_step_seconds": round(step_s, 4),
        "reference_time_to_removal_s": None if step is None else round(step * step_s, 2),
        "reference_wall_time_to_removal_s": None
        if clock.removed_at_s is None
        else round(clock.removed_at_s, 2),
        "reference_lr": args.reference_lr,
        "reference_scope": opts.scope,
    }


def run(args: argparse.Namespace) -> Iterator[dict]:
    """Records for every requested (or every attacked shipped) lab model."""
    from ..lab import zoo

    names = args.models or [m["name"] for m in zoo.listing() if m["attack"] != "none"]
    if not names:
        raise FileNotFoundError("no attacked lab models are shipped; run `backdoor-seal lab attack` first")
    for name in names:
        yield from bench_model(name, args)
