"""One unlearning job on ComfyUI MODEL/CLIP objects: prompts, trigger insertion, training, outputs.

Shared by the SealUnlearn node, `backdoor-seal clean` and the benchmark. The input MODEL and CLIP
are never changed: training happens in weight wrappers on clones, and the outputs are fresh
clones carrying the trained LoRA exactly as ComfyUI's LoraLoader applies it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..tokens import latin_twin, readable, tokenize, trigger_report
from . import prompts as prompt_sets
from .skd import SKDConfig, TrainingPair, UnlearnResult, make_pairs, train_skd

BUILTIN_SETS = ("general", "lab", "none")


@dataclass(frozen=True)
class UnlearnOptions:
    """Everything that decides an unlearning run besides the model and trigger."""

    skd: SKDConfig = field(default_factory=SKDConfig)
    scope: str = "text"  # where every trigger enters; docs/unlearn.md has the sweep
    rank: int = 4  # 0 = a full-rank delta
    placement: str = "auto"  # auto | prepend | append | random | homoglyph
    builtin: str = "general"  # general | lab | none
    builtin_count: int = 64
    latent_hw: tuple[int, int] = (8, 8)

    def to_json(self) -> dict:
        """Plain-data form for metadata."""
        out = asdict(self)
        out["skd"] = self.skd.to_json()
        return out


def trigger_sha256(trigger: str) -> str:
    """The trigger's fingerprint for provenance (a saved model does not spell out its trigger)."""
    return hashlib.sha256(trigger.encode("utf-8")).hexdigest()


def trigger_from(text: str | None, report: Any = None) -> str:
    """The trigger to unlearn: the typed text, else the top trigger of a detection report."""
    if text:
        return text
    if isinstance(report, dict):
        if report.get("poisoned") is False:
            raise ValueError(
                "the connected detection report found no trigger above its threshold; type the trigger to "
                "unlearn one anyway"
            )
        candidate = report.get("trigger") or next(iter(report.get("candidates") or []), {}).get("text")
        if candidate:
            return str(candidate)
    raise ValueError("no trigger: type it, or connect a detection report that names one")


def training_prompts(user_prompts: Sequence[str], opts: UnlearnOptions) -> list[str]:
    """The user's prompts followed by the chosen built-in clean set."""
    prompts = [p.strip() for p in user_prompts if p.strip()]
    if opts.builtin == "general":
        prompts += prompt_sets.general_prompts(opts.builtin_count, opts.skd.seed)
    elif opts.builtin == "lab":
        prompts += prompt_sets.lab_prompts(opts.builtin_count, opts.skd.seed)
    elif opts.builtin != "none":
        raise ValueError(
            f"unknown built-in prompt set {opts.builtin!r}; choose one of {', '.join(BUILTIN_SETS)}"
        )
    if not prompts:
        raise ValueError("no clean prompts: give some, or choose a built-in prompt set")
    return prompts


def training_pairs(
    trigger: str,
    prompts: Sequence[str],
    placement: str,
    seed: int = 0,
    insert: Callable[[str], str] | None = None,
) -> list[TrainingPair]:
    """Clean/triggered pairs; `insert` overrides the placement (the lab's own attack insertion)."""
    if insert is None:
        placement = prompt_sets.default_placement(trigger) if placement == "auto" else placement
        rng = np.random.default_rng(seed)
        usable = list(prompts)
        if placement == "homoglyph":
            latin = latin_twin(trigger)
            usable = [p for p in prompts if latin in p]
            if not usable:
                raise ValueError(f"no clean prompt contains {latin!r} for the homoglyph trigger to replace")
        return make_pairs(usable, lambda p: prompt_sets.insert_trigger(p, trigger, placement, rng))
    return make_pairs(prompts, insert)


class UnlearnSession:
    """Set up a trainable clone, run SKD / SKD-CAG on it, and hand back patched clones and the LoRA."""

    def __init__(
        self,
        model,
        clip,
        trigger: str,
        user_prompts: Sequence[str] = (),
        opts: UnlearnOptions | None = None,
        insert: Callable[[str], str] | None = None,
        teacher: str = "switch",
    ) -> None:
        from ..backends.comfy_train import ComfyDistillation

        self.model, self.clip, self.trigger = model, clip, trigger
        self.opts = opts or UnlearnOptions()
        tok = _clip_tokenizer(clip)
        if tok is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = trigger_report(tok, trigger, warn=False)
            if report["vanished"]:
                raise ValueError(report["warning"])
        self.pairs = training_pairs(
            trigger,
            training_prompts(user_prompts, self.opts),
            self.opts.placement,
            self.opts.skd.seed,
            insert,
        )
        with torch.inference_mode(False):
            self.distillation = ComfyDistillation(
                model,
                clip,
                scope=self.opts.scope,
                rank=self.opts.rank or None,
                latent_hw=self.opts.latent_hw,
                teacher=teacher,
            )
        self.result: UnlearnResult | None = None

    def run(
        self,
        progress: Callable[[int, int, dict], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
        on_step: Callable[[int], bool] | None = None,
    ) -> UnlearnResult:
        """Train (outside inference mode, so it also works inside a ComfyUI node)."""
        with torch.inference_mode(False), torch.enable_grad():
            self.result = train_skd(
                self.distillation,
                self.pairs,
                self.opts.skd,
                random_words=_random_words(self.clip) if self.opts.skd.target == "random-words" else (),
                progress=progress,
                check_interrupt=check_interrupt,
                on_step=on_step,
            )
        return self.result

    def lora(self) -> dict[str, torch.Tensor]:
        """The trained delta as a LoRA state dict (fp32)."""
        return self.distillation.lora_state_dict()

    def outputs(self):
        """Patched MODEL and CLIP clones (the LoRA applied as LoraLoader applies it) and the LoRA."""
        from ..backends.comfy_train import apply_lora

        lora = self.lora()
        model, clip = apply_lora(self.model, self.clip, lora)
        return model, clip, lora

    def provenance(self) -> dict[str, Any]:
        """What a saved sanitized model records about how it was made."""
        from ... import __version__

        return {
            "method": self.opts.skd.method,
            "options": self.opts.to_json(),
            "trigger_sha256": trigger_sha256(self.trigger),
            "trigger_tokens": len(tokenize(tok, self.trigger))
            if (tok := _clip_tokenizer(self.clip))
            else None,
            "training_prompts": len(self.pairs),
            "steps_run": self.result.steps if self.result else 0,
            "pack_version": __version__,
        }

    def describe(self) -> str:
        """One line for logs and progress text."""
        return (
            f"{self.opts.skd.method} on {readable(self.trigger)!r}: {len(self.pairs)} prompts, "
            f"scope {self.opts.scope}, {'rank ' + str(self.opts.rank) if self.opts.rank else 'full delta'}"
        )


def _clip_tokenizer(clip):
    try:
        name = next(iter(clip.tokenize("").keys()))
        return getattr(clip.tokenizer, f"clip_{name}").tokenizer
    except (AttributeError, StopIteration):
        return None


def _random_words(clip) -> list[str]:
    """Whole words decoded from the tokenizer's vocabulary (the random-words attention target)."""
    tok = _clip_tokenizer(clip)
    vocab = tok.get_vocab()
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii()]
    return sorted(words)[:: max(1, len(words) // 5000)]
