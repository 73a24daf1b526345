"""Compare a suspect (a fine-tune, or the base with a LoRA loaded) with its base: what changed, and which
tokens the change is about. One session, run by `backdoor-seal diff`.

Phases: (1) read every weight pair and measure the changes (`weights.weight_changes`); (2) the weight-space
ranking of the whole vocabulary, with no sampling: the cross-attention to_k / to_v change applied to every
token's contextual embedding, and the text encoder's change on the words that follow each token
(`weights.cross_attention_scores`, `weights.text_encoder_scores`). Each signal is a robust z-score over
the vocabulary; a token's rank is by its largest. (3) The behavioural differential (`behaviour.py`): what
each token does to the suspect's prediction minus what it does to the base's, its candidate stage joined by
the weight-space stage's best; it ranks and flags, within the blind scan's UNet-evaluation budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tokens import assemble
from . import weights as W
from .behaviour import BehaviourReport, BehaviourScan, BehaviourSettings

ProgressFn = Callable[[int, int, str], None]

# Words the text-encoder stage puts after a token: a spread of objects, attributes and scenes, so a trigger
# that rewrites the rest of the prompt shows whatever follows it.
PROBE_PHRASES = (
    "a red circle on the left",
    "a photo of a dog in the park",
    "a painting of a house by the sea",
    "a blue square and a green triangle",
)
# The residual check's run of the weight-space stage reads other words after and before each token, so it
# is no replay of the first run (core/sanitize/session.py, `SanitizeSession.find(fresh=True)`).
RESIDUAL_PROBE_PHRASES = (
    "a small green triangle at the top",
    "a cat sleeping on a wooden chair",
    "an oil portrait of a woman in a garden",
    "a yellow circle over a white background",
)
RESIDUAL_PREFIXES = ("", "the", "a small blue")
# What the token follows when its contextual embedding is read: the start of a prompt (where BadT2I puts
# its trigger), after an article, and inside a description (where EvilEdit / Rickrolling put theirs).
PREFIXES = ("", "a", "a large red")


@dataclass
class DiffSettings:
    """How much work each stage does; the defaults rank CLIP's 49,408 tokens of a lab model in seconds."""

    prefixes: tuple[str, ...] = PREFIXES
    probe_phrases: tuple[str, ...] = PROBE_PHRASES
    batch: int = 4096
    top: int = 25
    token_ids: tuple[int, ...] | None = None  # rank only these ids (tests)
    # rank multi-piece look-alike and invisible characters as units too (`sequence_units`); None: unless
    # token_ids narrows the ranking
    sequences: bool | None = None
    lab: bool | None = (
        None  # probe with the lab grammar's shapes or everyday objects (None: lab for lab models)
    )
    # the behavioural stage (None: weight space only, no UNet evaluation)
    behaviour: BehaviourSettings | None = field(default_factory=BehaviourSettings)


@dataclass
class RankedToken:
    """One ranked token: its score (the behavioural stage's lift, or the largest weight-space z), its value
    per signal, and whether it is flagged."""

    token_id: int  # the best-ranked id of the sequence
    text: str  # encodes to exactly token_ids
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    flagged: bool = False
    token_ids: tuple[
        int, ...
    ] = ()  # the candidate trigger's ids (a look-alike's byte pieces); () = (token_id,)

    def __post_init__(self) -> None:
        self.token_ids = tuple(self.token_ids) or (self.token_id,)


@dataclass
class DiffReport:
    """What changed (per component and the largest tensors), the weight-space ranking, and the final ranking
    (the behavioural stage's when it ran) with its flagged tokens."""

    components: dict[str, dict[str, Any]]
    largest_changes: list[dict[str, Any]]
    signals: list[str]
    ranking: list[RankedToken]
    ranks: dict  # token id (or a multi-piece unit's tuple) -> 1-based final rank, for every ranked one
    weight_ranks: dict = field(default_factory=dict)  # the weight-space stage alone
    behaviour: BehaviourReport | None = None
    seconds: float = 0.0

    @property
    def flagged(self) -> list[RankedToken]:
        """Flagged tokens, strongest first."""
        return [t for t in self.ranking if t.flagged]

    @property
    def unet_evals(self) -> int:
        """UNet evaluations the comparison made (the weight-space stage makes none)."""
        return self.behaviour.unet_evals if self.behaviour else 0

    @staticmethod
    def _best(ranks: dict, token_ids: Sequence[int]) -> int | None:
        """The rank of the sequence itself when it was ranked as one unit, else its best id's."""
        ids = tuple(int(t) for t in token_ids)
        if len(ids) > 1 and ids in ranks:
            return ranks[ids]
        found = [ranks[t] for t in ids if t in ranks]
        return min(found) if found else None

    def rank_of(self, token_ids: Sequence[int]) -> int | None:
        """The best final rank among these token ids (a trigger's tokens), None if none was ranked."""
        return self._best(self.ranks, token_ids)

    def weight_rank_of(self, token_ids: Sequence[int]) -> int | None:
        """The best rank among these ids in the weight-space stage alone."""
        return self._best(self.weight_ranks, token_ids)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict, the report type the nodes pass on (SealUnlearn reads 'poisoned', 'trigger' and
        'candidates'): the ranking's top entries, not the whole vocabulary."""
        flagged = self.flagged
        b = self.behaviour
        return {
            "kind": "diff",
            # the weight space ranks but does not judge: undecided (None) without the behavioural stage,
            # unless nothing changed at all
            "poisoned": bool(flagged)
            if b or not any(c["changed"] for c in self.components.values())
            else None,
            "trigger": flagged[0].text if flagged else None,
            # a finder alone never says clean: that needs the firing test and the residual check (sanitize)
            "verdict": "poisoned" if flagged and b else "inconclusive",
            "flagged": [t.text for t in flagged],
            "candidates": [
                {
                    "text": t.text,
                    "token_id": t.token_id,
                    "token_ids": list(t.token_ids),
                    "score": round(t.score, 2),
                    "flagged": t.flagged,
                }
                for t in self.ranking
            ],
            "threshold_lift": b.threshold_lift if b else None,
            "min_effect": b.min_effect if b else None,
            "null_effect": round(b.null_effect, 4) if b else None,
            "null_max_lift": round(b.null_max_lift, 2) if b else None,
            "unet_evals": self.unet_evals,
            "components": self.components,
            "largest_changes": self.largest_changes,
            "signals": self.signals,
            "ranking": [{**t.__dict__, "token_ids": list(t.token_ids)} for t in self.ranking],
            "seconds": round(self.seconds, 2),
        }


class DiffSession:
    """One comparison of a suspect with its base (ComfyUI MODEL / CLIP objects, through the backends)."""

    def __init__(self, base_model, base_clip, model, clip, settings: DiffSettings | None = None) -> None:
        from ..backends.comfy import supported_family, tokenizer_info

        supported_family(base_model)
        supported_family(model)
        self.base_model, self.base_clip, self.model, self.clip = base_model, base_clip, model, clip
        self.settings = settings or DiffSettings()
        self.tok = tokenizer_info(clip)
        from ..models import prompt_set

        lab = self.settings.lab
        self.lab = prompt_set(base_model) == "lab" if lab is None else lab

    # ---- phase 1: the weights
    def changes(self) -> tuple[list[W.WeightChange], dict[str, int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every changed tensor, the tensor counts, and the changed cross-attention to_k / to_v pairs."""
        from ..backends.comfy_checkpoint import weight_pairs

        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def pairs():
            for key, b, s in weight_pairs(self.base_model, self.base_clip, self.model, self.clip):
                if b is not s and key.endswith(".weight") and W.component_of(key) == "cross_attention_kv":
                    if not torch.equal(b.to(s.dtype), s):
                        kv.append((b.detach().float(), s.detach().float()))
                yield key, b, s

        changes, totals = W.weight_changes(pairs())
        return changes, totals, kv

    # ---- phase 2: the vocabulary
    def _ids(self, text: str) -> list[int]:
        """BOS and the words of a phrase, no EOS."""
        return self.tok.tokenizer(text)["input_ids"][:-1] if text else [self.tok.bos]

    def vocabulary(self) -> list[int]:
        """The token ids ranked: every id but the special ones."""
        if self.settings.token_ids is not None:
            return list(self.settings.token_ids)
        special = {self.tok.bos, self.tok.eos, self.tok.pad}
        return [i for i in range(len(self.tok.tokenizer.get_vocab())) if i not in special]

    @staticmethod
    def _encode(clip, rows: list[list[int]]) -> torch.Tensor:
        """Contexts (N x L x C, float) of equal-length id prefixes."""
        from ..backends.comfy import encode_prefix_ids

        return encode_prefix_ids(clip, torch.tensor(rows, dtype=torch.long)).float()

    def _contexts(self, clip, ids: list[int], after: list[int], follow: list[int] = ()) -> torch.Tensor:
        """Contexts of [after..., token, follow...] for each token: (N x (1 + len(follow)) x C), the token's
        row first."""
        return self._encode(clip, [[*after, t, *follow] for t in ids])[:, len(after) :]

    def sequence_units(self) -> list[tuple[int, ...]]:
        """Triggers no single id stands for, ranked beside the vocabulary: every look-alike of a Latin letter
        in Unicode's confusables data and every zero-width or format character that the tokenizer splits into
        several byte-level pieces (a finder scoring single ids sees only a fragment's own context, not the
        character's: a planted Fraktur 'N' ranked 13,224th by its best piece, 458th as one unit)."""
        if not (
            self.settings.sequences
            if self.settings.sequences is not None
            else self.settings.token_ids is None
        ):
            return []
        from ..tokens import encode_ids, look_alikes

        chars = [c for group in look_alikes().values() for c in group]
        chars += [chr(c) for c in (0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF)]
        units = {tuple(encode_ids(self.tok.tokenizer, c)) for c in chars}
        return sorted(u for u in units if len(u) >= 2)

    def _raw(
        self,
        units: list[tuple[int, ...]],
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        text_changed: bool,
        alone: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Raw scores of units of one length: 'cross_attention' over the unit's own positions after each
        prefix (its largest), 'text_words' on the probe phrases after it."""
        s = self.settings
        n = len(units[0])
        prefixes = [self._ids(p) for p in s.prefixes]
        follows = [self._ids(phrase)[1:] for phrase in s.probe_phrases]
        out: dict[str, torch.Tensor] = {}
        if kv:
            rows = [
                self._encode(self.clip, [[*p, *u] for u in units])[:, len(p) : len(p) + n] for p in prefixes
            ]
            out["cross_attention"] = W.cross_attention_scores(kv, torch.cat(rows, 1))
        if text_changed:
            per = []
            for follow, (bo, so) in zip(follows, alone, strict=True):
                rows = [[self.tok.bos, *u, *follow] for u in units]
                bw = self._encode(self.base_clip, rows)[:, 1 + n :]
                sw = self._encode(self.clip, rows)[:, 1 + n :]
                per.append(W.text_encoder_scores(bw, sw, bo, so))
            out["text_words"] = torch.stack(per, -1).mean(-1)
        return out

    def rank(
        self,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        text_changed: bool,
        progress: ProgressFn | None = None,
    ) -> tuple[list[str], dict[str, torch.Tensor], list[int | tuple[int, ...]]]:
        """Robust z per signal over the vocabulary: 'cross_attention' (to_k / to_v changed: the change's
        action on each token's own context after each prefix) and 'text_words' (text encoder changed: how
        far the token makes the two encoders disagree on the probe phrases after it). Multi-piece look-alike
        and invisible characters (`sequence_units`) are scored beside the ids, on the same scale (the single
        ids' median and spread). Returns the signal names, their z-scores and the units (an id, or a tuple
        of ids), in the same order."""
        s = self.settings
        ids = self.vocabulary()
        follows = [self._ids(phrase)[1:] for phrase in s.probe_phrases]
        alone: list[tuple[torch.Tensor, torch.Tensor]] = []
        if text_changed:  # the probe phrases without a token in front, in both encoders
            for follow in follows:
                plain = [[self.tok.bos, *follow]]
                alone.append(
                    (self._encode(self.base_clip, plain)[:, 1:], self._encode(self.clip, plain)[:, 1:])
                )
        if not kv and not text_changed:
            return [], {}, list(ids)
        sequences = self.sequence_units()
        groups = [[(t,) for t in ids[k : k + s.batch]] for k in range(0, len(ids), s.batch)]
        for length in sorted({len(u) for u in sequences}):
            same = [u for u in sequences if len(u) == length]
            groups += [same[k : k + s.batch] for k in range(0, len(same), s.batch)]
        parts: dict[str, list[torch.Tensor]] = {}
        for n, group in enumerate(groups):
            for name, v in self._raw(group, kv, text_changed, alone).items():
                parts.setdefault(name, []).append(v)
            if progress:
                progress(n + 1, len(groups), "vocabulary")
        units: list[int | tuple[int, ...]] = [*ids, *[u for g in groups if len(g[0]) > 1 for u in g]]
        z = {}
        for name, chunks in parts.items():
            raw = torch.cat(chunks)
            single = raw[: len(ids)]
            med = single.median()
            mad = (single - med).abs().median() * 1.4826
            z[name] = (raw - med) / mad.clamp_min(1e-12 + 1e-6 * float(med.abs()))
        return list(z), z, units

    def behaviour(
        self,
        weight_candidates: Sequence[int],
        progress: ProgressFn | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> BehaviourReport:
        """The behavioural differential of both models on the probe templates (phase 3)."""
        from ..backends.comfy_probe import ComfyProbe
        from ..prompts import probe_templates

        b = self.settings.behaviour or BehaviourSettings()
        if self.settings.token_ids is not None and b.token_ids is None:
            from dataclasses import replace

            b = replace(b, token_ids=self.settings.token_ids)
        hw = tuple(b.latent_shape[-2:])
        base = ComfyProbe(self.base_model, self.base_clip, latent_hw=hw)
        suspect = ComfyProbe(self.model, self.clip, latent_hw=hw)
        scan = BehaviourScan(
            base,
            suspect,
            probe_templates(self.lab),
            b,
            progress=(lambda done, total: progress(done, total, "behaviour")) if progress else None,
            check_interrupt=check_interrupt,
        )
        return scan.run(weight_candidates)

    def run(
        self, progress: ProgressFn | None = None, check_interrupt: Callable[[], None] | None = None
    ) -> DiffReport:
        """Every phase; the report ranks by the behavioural stage when it ran, else by the weight space."""
        import time

        t0 = time.monotonic()
        changes, totals, kv = self.changes()
        components = W.summarize(changes, totals)
        text_changed = components["text_encoder"]["changed"] > 0
        names, z, ids = self.rank(kv, text_changed, progress)
        weight_order: list[int] = []
        best = torch.zeros(0)
        if names:
            best = torch.stack([z[n] for n in names], -1).amax(-1)
            weight_order = torch.argsort(best, descending=True).tolist()
        weight_ranks = {ids[i]: r + 1 for r, i in enumerate(weight_order)}
        index = {t: i for i, t in enumerate(ids)}

        def weight_signals(token: int) -> dict[str, float]:
            i = index.get(token)
            return {n: round(float(z[n][i]), 2) for n in names} if i is not None else {}

        report = None
        if self.settings.behaviour is not None and any(c["changed"] for c in components.values()):
            # the behavioural stage scores single ids: a multi-piece unit hands it its pieces
            top_weight = list(
                dict.fromkeys(
                    t
                    for i in weight_order[: self.settings.behaviour.weight_candidates]
                    for t in (ids[i] if isinstance(ids[i], tuple) else (ids[i],))
                )
            )
            report = self.behaviour(top_weight, progress, check_interrupt)
            scored = {t.token_id: t for t in report.tokens}
            order = report.order()
            ranking = [
                RankedToken(
                    token_id=t.token_id,
                    text=seq.text,
                    score=t.lift,
                    signals={
                        "behaviour": round(t.score_z, 2),
                        "effect": round(t.effect, 3),
                        "lift": round(t.lift, 2),
                        "stage1": round(t.stage1_z, 2),
                        **weight_signals(t.token_id),
                    },
                    flagged=t.flagged,
                    token_ids=seq.ids,
                )
                for seq in assemble(self.tok.tokenizer, order, max(self.settings.top, len(report.flagged)))
                if (t := scored.get(seq.lead)) is not None
            ]
            ranks = {t: r + 1 for r, t in enumerate(order)}
        else:
            order = [ids[i] for i in weight_order]
            ranking = [
                RankedToken(
                    seq.ids[0],
                    seq.text,
                    float(best[index[seq.lead]]),
                    weight_signals(seq.lead),
                    token_ids=seq.ids,
                )
                for seq in assemble(self.tok.tokenizer, order, self.settings.top)
            ]
            ranks = weight_ranks
        return DiffReport(
            components=components,
            largest_changes=[c.to_json() for c in changes[:10]],
            signals=names,
            ranking=ranking,
            ranks=ranks,
            weight_ranks=weight_ranks,
            behaviour=report,
            seconds=time.monotonic() - t0,
        )


DIFFERENTIAL_CALIBRATION_FORMAT = 1  # part of a cached calibration's key: raise it when the scores change


def detect_with_base(
    base_model,
    base_clip,
    model,
    clip,
    prompts: Sequence[str],
    calibration: Sequence[str],
    opts,
    tick: Callable[[], None] | None = None,
    cache: bool = True,
) -> dict:
    """Seal Detect Prompt with a base: calibrate the differential on clean prompts, then check each prompt.
    `opts` is the prompt detector's `DetectOptions` (its latent side). Returns the prompt-set report.

    With `cache`, a calibration of the same two models (weights fingerprints), prompts, probe templates
    and settings made before is read from the cache folder (`core.cache`) instead of being scored again
    (each calibration token costs stage-2 UNet evaluations of both models); the report's
    "calibration_cached" says which happened."""
    from dataclasses import asdict

    from ..backends.comfy import latent_channels, weights_fingerprint
    from ..backends.comfy_probe import ComfyProbe
    from ..cache import cached
    from ..detect.prompts import most_supported_trigger
    from ..prompts import probe_templates
    from .prompts import PromptDifferential

    side = opts.latent_side
    settings = BehaviourSettings(stage2_seeds=1, latent_shape=(latent_channels(model), side, side))
    hw = (side, side)
    templates = probe_templates(opts.lab)
    differential = PromptDifferential(
        ComfyProbe(base_model, base_clip, latent_hw=hw),
        ComfyProbe(model, clip, latent_hw=hw),
        templates,
        settings,
    )

    def compute() -> dict:
        differential.calibrate(calibration, tick)
        return differential.calibration_state()

    if cache:
        key = {
            "format": DIFFERENTIAL_CALIBRATION_FORMAT,
            "base": weights_fingerprint(base_model, base_clip),
            "suspect": weights_fingerprint(model, clip),
            "prompts": list(calibration),
            "templates": list(templates),
            "settings": asdict(settings),
        }
        state, hit = cached("differential-calibration", key, compute)
        if hit:
            differential.load_calibration(state)
            for _ in calibration if tick else ():
                tick()
    else:
        state, hit = compute(), False
    thresholds = {"threshold_z": settings.threshold_z, "min_effect": settings.min_effect}
    reports = []
    for prompt in prompts:
        reports.append(differential.check(prompt))
        if tick:
            tick()
    flagged = [r for r in reports if r["poisoned"]]
    return {
        "kind": "prompt",
        "detector": "differential",
        "poisoned": bool(flagged),
        "trigger": most_supported_trigger(reports),
        "thresholds": thresholds,
        "unet_evals": differential.unet_evals,
        "calibration_cached": hit,
        "prompts": reports,
    }
