"""Compare a suspect (a fine-tune, or the base with a LoRA loaded) with its base: what changed, and which
tokens the change is about. One session, run by `backdoor-seal diff`.

Phases: (1) read every weight pair and measure the changes (`weights.weight_changes`); (2) the weight-space
ranking of the whole vocabulary, with no sampling: the cross-attention to_k / to_v change applied to every
token's contextual embedding, and the text encoder's change on the words that follow each token
(`weights.cross_attention_scores`, `weights.text_encoder_scores`). Each signal is a robust z-score over
the vocabulary; a token's rank is by its largest. The behavioural stage (sampling) is not built yet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import weights as W

ProgressFn = Callable[[int, int, str], None]

# Words the text-encoder stage puts after a token: a spread of objects, attributes and scenes, so a trigger
# that rewrites the rest of the prompt shows whatever follows it.
PROBE_PHRASES = (
    "a red circle on the left",
    "a photo of a dog in the park",
    "a painting of a house by the sea",
    "a blue square and a green triangle",
)
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


@dataclass
class RankedToken:
    """One token of the weight-space ranking: its robust z per signal and the largest of them."""

    token_id: int
    text: str
    score: float
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class DiffReport:
    """What changed (per component and the largest tensors) and the weight-space token ranking."""

    components: dict[str, dict[str, Any]]
    largest_changes: list[dict[str, Any]]
    signals: list[str]
    ranking: list[RankedToken]
    ranks: dict[int, int]  # token id -> 1-based rank, for every ranked token
    seconds: float = 0.0

    def rank_of(self, token_ids: Sequence[int]) -> int | None:
        """The best rank among these token ids (a trigger's tokens), None if none was ranked."""
        found = [self.ranks[t] for t in token_ids if t in self.ranks]
        return min(found) if found else None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the ranking's top entries, not the whole vocabulary)."""
        return {
            "components": self.components,
            "largest_changes": self.largest_changes,
            "signals": self.signals,
            "ranking": [t.__dict__ for t in self.ranking],
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

    def rank(
        self,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        text_changed: bool,
        progress: ProgressFn | None = None,
    ) -> tuple[list[str], dict[str, torch.Tensor], list[int]]:
        """Robust z per signal over the vocabulary: 'cross_attention' (to_k / to_v changed: the change's
        action on each token's own context after each prefix) and 'text_words' (text encoder changed: how
        far the token makes the two encoders disagree on the probe phrases after it). Returns the signal
        names, their (V,) z-scores, the ids."""
        s = self.settings
        ids = self.vocabulary()
        raw: dict[str, torch.Tensor] = {}
        prefixes = [self._ids(p) for p in s.prefixes]
        chunks = range(0, len(ids), s.batch)
        follows = [self._ids(phrase)[1:] for phrase in s.probe_phrases]
        alone: list[tuple[torch.Tensor, torch.Tensor]] = []
        if text_changed:  # the probe phrases without a token in front, in both encoders
            for follow in follows:
                plain = [[self.tok.bos, *follow]]
                alone.append(
                    (self._encode(self.base_clip, plain)[:, 1:], self._encode(self.clip, plain)[:, 1:])
                )
        cross, words = [], []
        for n, start in enumerate(chunks):
            part = ids[start : start + s.batch]
            if kv:
                suspect = torch.stack([self._contexts(self.clip, part, p)[:, 0] for p in prefixes], 1)
                cross.append(W.cross_attention_scores(kv, suspect))
            if text_changed:
                per = []
                for follow, (bo, so) in zip(follows, alone, strict=True):
                    bw = self._contexts(self.base_clip, part, [self.tok.bos], follow)[:, 1:]
                    sw = self._contexts(self.clip, part, [self.tok.bos], follow)[:, 1:]
                    per.append(W.text_encoder_scores(bw, sw, bo, so))
                words.append(torch.stack(per, -1).mean(-1))
            if progress:
                progress(n + 1, len(chunks), "vocabulary")
        if kv:
            raw["cross_attention"] = torch.cat(cross)
        if text_changed:
            raw["text_words"] = torch.cat(words)
        z = {name: W.robust_z(v) for name, v in raw.items()}
        return list(z), z, ids

    def run(self, progress: ProgressFn | None = None) -> DiffReport:
        """Both phases; the report ranks the vocabulary by each token's largest signal."""
        import time

        t0 = time.monotonic()
        changes, totals, kv = self.changes()
        components = W.summarize(changes, totals)
        text_changed = components["text_encoder"]["changed"] > 0
        names, z, ids = self.rank(kv, text_changed, progress)
        ranking: list[RankedToken] = []
        ranks: dict[int, int] = {}
        if names:
            best = torch.stack([z[n] for n in names], -1).amax(-1)
            order = torch.argsort(best, descending=True).tolist()
            ranks = {ids[i]: r + 1 for r, i in enumerate(order)}
            for i in order[: self.settings.top]:
                ranking.append(
                    RankedToken(
                        token_id=ids[i],
                        text=self.tok.tokenizer.decode([ids[i]]),
                        score=float(best[i]),
                        signals={n: round(float(z[n][i]), 2) for n in names},
                    )
                )
        return DiffReport(
            components=components,
            largest_changes=[c.to_json() for c in changes[:10]],
            signals=names,
            ranking=ranking,
            ranks=ranks,
            seconds=time.monotonic() - t0,
        )
