"""One unlearning job on ComfyUI MODEL/CLIP objects: prompts, trigger insertion, training, outputs.

Shared by the SealUnlearn node, `backdoor-seal unlearn` and the benchmark. The input MODEL and CLIP
are never changed: training happens in weight wrappers on clones, and the outputs are fresh
clones carrying the trained LoRA exactly as ComfyUI's LoraLoader applies it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..prompts import builtin_prompts, with_builtin
from ..tokens import readable, tokenize, trigger_positions, trigger_report, whole_words
from ..triggers import TrainingPair, training_pairs, trigger_sha256
from ..version import __version__
from .match import KEEP_PROMPTS, MatchConfig, match_context
from .skd import SKDConfig, UnlearnResult, train_skd

# What Seal Unlearn and `unlearn` run unless told otherwise: context matching, in the default text scope.
# On the lab it removed every text-side attack at SSIM 0.98-0.99 in 25-75 steps; SKD-CAG after it undid
# lab-object's removal (docs/unlearn.md). SKD / SKD-CAG stay one choice away (and serve UNet scopes).
DEFAULT_METHOD = "match"


@dataclass(frozen=True)
class UnlearnOptions:
    """Everything that decides an unlearning run besides the model and trigger."""

    skd: SKDConfig = field(default_factory=SKDConfig)
    scope: str = "text"  # where every trigger enters; docs/unlearn.md has the sweep
    warm_start: bool = False  # a closed-form edit of the cross-attention k/v first (`closed_form.py`)
    match_steps: int = 150  # steps of method "match" (context matching of a text-encoder delta, `match.py`)
    rank: int = 4  # 0 = a full-rank delta
    placement: str = "auto"  # auto | prepend | append | random | homoglyph
    builtin: str = "general"  # general | lab | none
    builtin_count: int = 64
    latent_hw: tuple[int, int] = (8, 8)

    def __post_init__(self) -> None:
        if self.match_steps < 1:
            raise ValueError(f"match_steps must be at least 1, got {self.match_steps}")
        if self.rank < 0:
            raise ValueError(f"rank must be 0 (a full-rank delta) or more, got {self.rank}")

    def to_json(self) -> dict:
        """Plain-data form for metadata."""
        out = asdict(self)
        out["skd"] = self.skd.to_json()
        return out


def trains_text(scope: str) -> bool:
    """Whether a scope puts a delta in the text encoder(s) (`text`, or a UNet scope with `+text`)."""
    return scope == "text" or scope.endswith("+text")


class UnlearnSession:
    """Set up a trainable clone, run SKD / SKD-CAG on it, and hand back patched clones and the LoRA.

    `trigger` is one trigger or a set of them, unlearnt together in one run: each gets its own pairs (its
    own placement: a homoglyph replaces its twin, anything else goes first, or `insert`'s), and the pairs
    of all of them are shuffled into one training set. `insert` is one insertion for every trigger or a
    dict trigger -> insertion (a trigger not in it uses the placement). `keep`: the general clean prompts
    whose contexts context matching keeps beside the twins (default: `KEEP_PROMPTS` of the built-in set,
    the lab grammar when `opts.builtin` is "lab", everyday captions otherwise); prompts holding a
    trigger are left out."""

    def __init__(
        self,
        model,
        clip,
        trigger: str | Sequence[str],
        user_prompts: Sequence[str] = (),
        opts: UnlearnOptions | None = None,
        insert: Callable[[str], str] | dict[str, Callable[[str], str]] | None = None,
        teacher: str = "switch",
        keep: Sequence[str] | None = None,
    ) -> None:
        from ..backends.comfy import check_trigger_embeddings, tokenizer_info
        from ..backends.comfy_train import ComfyDistillation

        self.opts = opts or UnlearnOptions()
        if self.opts.skd.method == "match" and not trains_text(self.opts.scope):
            raise ValueError(
                f"method 'match' trains the text encoder's output, and scope {self.opts.scope!r} has no text "
                "encoder delta: use scope text (or attn2-kv+text), or method skd-cag"
            )
        self.triggers = [trigger] if isinstance(trigger, str) else list(dict.fromkeys(trigger))
        if not self.triggers:
            raise ValueError("no trigger to unlearn: give one, or a report that names some")
        self.model, self.clip, self.trigger = model, clip, self.triggers[0]
        self.tokenizer = tokenizer_info(clip).tokenizer
        prompts = with_builtin(user_prompts, self.opts.builtin, self.opts.builtin_count, self.opts.skd.seed)
        built: dict[str, list[TrainingPair]] = {}
        for i, trig in enumerate(self.triggers):  # every trigger checked before any model work
            check_trigger_embeddings(clip, trig)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = trigger_report(self.tokenizer, trig, warn=False)
            if report["vanished"]:
                raise ValueError(report["warning"])
            own = insert.get(trig) if isinstance(insert, dict) else insert
            pairs = training_pairs(trig, prompts, self.opts.placement, self.opts.skd.seed + i, own)
            built[trig] = fit_to_chunk(pairs, self.tokenizer, tokenizer_info(clip).length - 2)
        with torch.inference_mode(False):
            self.distillation = ComfyDistillation(
                model,
                clip,
                scope=self.opts.scope,
                rank=self.opts.rank or None,
                latent_hw=self.opts.latent_hw,
                teacher=teacher,
            )
        self.pairs_by_trigger = {t: _reaching_pairs(p, self.distillation, t) for t, p in built.items()}
        self.pairs = [p for pairs in self.pairs_by_trigger.values() for p in pairs]
        self.notes: list[str] = []  # what the caller should be told about the run as set up
        if self.opts.skd.batch > len(self.pairs):  # a step draws each pair at most about once
            self.notes.append(
                f"batch_size {self.opts.skd.batch} is more than the {len(self.pairs)} training prompt(s): "
                f"each step trains on about {len(self.pairs)}; add prompts (or a built-in set) for larger batches"
            )
            warnings.warn(self.notes[-1], stacklevel=2)
        self.keep: list[str] = []  # only context matching keeps a general set
        if self.matches:
            if keep is None:
                keep = builtin_prompts(self.opts.builtin == "lab", KEEP_PROMPTS, self.opts.skd.seed + 1)
            # a kept prompt that holds a trigger (token ids) would hold that trigger's context still
            self.keep = [
                p for p in keep if not any(trigger_positions(self.tokenizer, p, t) for t in self.triggers)
            ]
        self.result: UnlearnResult | None = None
        self.reverted: dict[str, Any] | None = None  # set by `revert_edit`

    @property
    def matches(self) -> bool:
        """Whether this run is context matching (method "match") rather than SKD / SKD-CAG."""
        return self.opts.skd.method == "match"

    @property
    def total_steps(self) -> int:
        """Training steps one `run` makes: context matching's or SKD's."""
        return self.opts.match_steps if self.matches else self.opts.skd.steps

    def match_config(self) -> MatchConfig:
        """Context matching's settings (lr, batch and seed are the SKD config's)."""
        skd = self.opts.skd
        return MatchConfig(steps=self.opts.match_steps, lr=skd.lr, batch=skd.batch, seed=skd.seed)

    def run(
        self,
        progress: Callable[[int, int, dict], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
        on_step: Callable[[int], bool] | None = None,
    ) -> UnlearnResult:
        """Train (outside inference mode, so it also works inside a ComfyUI node): context matching for
        method "match" (`match.py`), else SKD / SKD-CAG (with the closed-form k/v warm start first when
        asked). A second call trains on from where the first stopped."""
        with torch.inference_mode(False), torch.enable_grad():
            if self.matches:
                self.result = match_context(
                    self.distillation,
                    self.pairs,
                    self.match_config(),
                    progress,
                    check_interrupt,
                    on_step,
                    keep=self.keep,
                )
                return self.result
            if self.opts.warm_start and self.result is None:
                self.warm_start()
            self.result = train_skd(
                self.distillation,
                self.pairs,
                self.opts.skd,
                random_words=_random_words(self.tokenizer) if self.opts.skd.target == "random-words" else (),
                progress=progress,
                check_interrupt=check_interrupt,
                on_step=on_step,
            )
        return self.result

    def _kv_rows(self, prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned token rows (n x C) of up to `prompts` triggered training prompts and their clean twins,
        as the UNet's cross-attention reads them (`closed_form.aligned_rows`)."""
        from .closed_form import aligned_rows

        d = self.distillation
        pairs = self.pairs[:prompts]
        triggered, clean = [p.triggered for p in pairs], [p.clean for p in pairs]
        ids_t, ids_c = d.token_ids(triggered), d.token_ids(clean)
        length = len(ids_t[0])  # SDXL's packed context carries the pooled embedding in one more row
        ctx_t = d.encode(triggered, student=False)[:, :length]
        ctx_c = d.encode(clean, student=False)[:, :length]
        return aligned_rows(ctx_t, ctx_c, ids_t, ids_c, d.eos_id)

    @staticmethod
    def _set_delta(params: dict[str, torch.nn.Parameter], delta: torch.Tensor) -> None:
        """Write a to_k / to_v delta into its trained parameters (a full diff, or LoRA factors cut to rank)."""
        from .closed_form import lora_factors

        if "diff" in params:
            params["diff"].copy_(delta.to(params["diff"]))
            return
        up, down = params["lora_up.weight"], params["lora_down.weight"]
        scale = float(params["alpha"]) / up.shape[1] if "alpha" in params else 1.0
        u, v = lora_factors(delta / scale, up.shape[1])
        up.copy_(u.to(up))
        down.copy_(v.to(down))

    def warm_start(self, prompts: int = 64, lam: float = 0.1) -> int:
        """Set the cross-attention k/v deltas to the closed-form edit that makes triggered prompts' tokens
        project like their clean twins' (`closed_form.py`), from up to `prompts` training pairs, before
        SKD trains on. Returns the number of projections edited (0 when the scope trains none)."""
        from .closed_form import kv_map

        d = self.distillation
        layers = d.cross_attention_kv()
        if not layers:
            return 0
        with torch.no_grad():
            edit = kv_map(*self._kv_rows(prompts), lam)
            for _, weight, params in layers:
                self._set_delta(params, (weight.double() @ edit.to(weight.device)).float())
        d.switch.on = True
        return len(layers)

    def revert_edit(self, base_model, share: float | None = None, prompts: int = 64) -> dict[str, Any]:
        """Undo, in closed form and without training, the part of a cross-attention edit the triggers excite.

        For every trained to_k / to_v, the change against `base_model` (the MODEL the suspect was made
        from; LoRA patches on either side included) is split by SVD and the components that the triggered
        training prompts excite beyond their clean twins, holding `share` of that excess (default
        `closed_form.REVERT_SHARE`), become the delta with the opposite sign (`closed_form.excited_part`),
        so the saved LoRA carries exactly that. Meant for a suspect whose only change is in
        the cross-attention keys and values (EvilEdit, UCE-style edits), where that change is the backdoor's
        whole mechanism. Sets `result` (0 steps). Returns {"projections", "ranks" (components reverted per
        projection), "truncated" (projections whose part exceeded the LoRA's rank)}.
        Raises ValueError when the scope trains no cross-attention key or value."""
        from ..backends.comfy_checkpoint import weight_pairs
        from ..backends.comfy_train import UNET_MODULE_PREFIX
        from .closed_form import REVERT_SHARE, excited_part

        share = REVERT_SHARE if share is None else share
        t0 = time.monotonic()
        d = self.distillation
        layers = d.cross_attention_kv()
        if not layers:
            raise ValueError(f"scope {self.opts.scope!r} trains no cross-attention key or value to revert")
        key_of = {name: f"unet.{name[len(UNET_MODULE_PREFIX) :]}.weight" for name, _, _ in layers}
        wanted = set(key_of.values())
        with torch.no_grad():
            changes = {
                k: (suspect.float() - base.float())
                for k, base, suspect in weight_pairs(
                    base_model, None, self.model, None, select=wanted.__contains__
                )
            }
            rows = self._kv_rows(prompts)
            ranks, truncated = [], 0
            for name, _, params in layers:
                part, rank = excited_part(changes[key_of[name]], *rows, share=share)
                ranks.append(rank)
                width = params["lora_up.weight"].shape[1] if "lora_up.weight" in params else None
                truncated += int(width is not None and rank > width)
                self._set_delta(params, -part)
        d.switch.on = True
        self.result = UnlearnResult(losses=[], seconds=time.monotonic() - t0, steps=0)
        self.reverted = {"projections": len(layers), "ranks": ranks, "truncated": truncated, "share": share}
        return self.reverted

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
        return {
            "method": "revert" if self.reverted is not None else self.opts.skd.method,
            "options": self.opts.to_json(),
            "trigger_sha256": trigger_sha256(self.trigger),
            "trigger_tokens": len(tokenize(self.tokenizer, self.trigger)),
            # a set: each trigger's hash, never its text (a saved model should not teach its triggers)
            **(
                {"triggers_sha256": [trigger_sha256(t) for t in self.triggers]}
                if len(self.triggers) > 1
                else {}
            ),
            "training_prompts": len(self.pairs),
            **({"kept_prompts": len(self.keep)} if self.matches else {}),
            "steps_run": self.result.steps if self.result else 0,
            "pack_version": __version__,
        }

    def describe(self) -> str:
        """One line for logs and progress text."""
        what = ", ".join(repr(readable(t)) for t in self.triggers)
        return (
            f"{self.opts.skd.method} on {what}: {len(self.pairs)} prompts, "
            f"scope {self.opts.scope}, {'rank ' + str(self.opts.rank) if self.opts.rank else 'full delta'}"
        )


def _random_words(tokenizer) -> list[str]:
    """Whole words decoded from the tokenizer's vocabulary (the random-words attention target)."""
    words = whole_words(tokenizer)
    return words[:: max(1, len(words) // 5000)]


def fit_to_chunk(pairs: Sequence[TrainingPair], tokenizer, length: int = 75) -> list[TrainingPair]:
    """Pairs whose triggered prompt is longer than one chunk, cut to the words around the trigger.

    ComfyUI encodes every 77-token chunk (75 tokens between BOS and EOS) on its own, so the chunk that
    holds the trigger is what carries the backdoor; training sees one chunk, so a long prompt is cut
    to a window of whole words around the words the trigger changed (the same words kept in the
    clean twin). Without this a trigger past token 75 never reaches training: the loss is exactly 0.
    """
    out = []
    for pair in pairs:
        if len(tokenize(tokenizer, pair.triggered)) <= length:
            out.append(pair)
            continue
        clean, triggered = pair.clean.split(" "), pair.triggered.split(" ")
        pre = 0
        while pre < min(len(clean), len(triggered)) and clean[pre] == triggered[pre]:
            pre += 1
        suf = 0
        while suf < min(len(clean), len(triggered)) - pre and clean[-1 - suf] == triggered[-1 - suf]:
            suf += 1
        left, right = pre, suf  # words kept on each side of the changed words

        def window(words: list[str], lo: int, hi: int) -> str:
            return " ".join(words[lo : len(words) - hi])

        lo, hi = left, right
        while lo > 0 or hi > 0:
            grown = False
            for side in ("left", "right"):
                tlo, thi = (lo - 1, hi) if side == "left" else (lo, hi - 1)
                if min(tlo, thi) < 0:
                    continue
                if len(tokenize(tokenizer, window(triggered, tlo, thi))) <= length:
                    lo, hi, grown = tlo, thi, True
            if not grown:
                break
        out.append(TrainingPair(window(clean, lo, hi), window(triggered, lo, hi)))
    return out


def _reaching_pairs(pairs: Sequence[TrainingPair], distillation, trigger: str) -> list[TrainingPair]:
    """The pairs whose triggered prompt differs from its clean twin in the chunk training encodes."""
    kept = []
    for pair in pairs:
        ids_t, ids_c = distillation.token_ids([pair.triggered, pair.clean])
        if ids_t != ids_c:
            kept.append(pair)
    if not kept:
        raise ValueError(
            f"the trigger {readable(trigger)!r} does not reach the 77-token chunk training encodes in any "
            "prompt (it sits past a long prompt's first chunk); use shorter prompts or place it earlier"
        )
    if len(kept) < len(pairs):
        warnings.warn(
            f"{len(pairs) - len(kept)} prompt(s) left out: the trigger is not in their first chunk",
            stacklevel=3,
        )
    return kept
