"""What a fine-tune or a LoRA changed, read from the weights alone: pure torch, no sampling.

Two questions, each answered against the base the suspect was made from:
- Which weights changed, and how (`weight_changes`): per tensor, the Frobenius norm of the change, its size
  relative to the base weight, and its effective rank (Roy & Vetterli 2007, "The effective rank: a measure
  of effective dimensionality", eq. 2: exp of the entropy of the normalised singular values). A LoRA or a
  closed-form edit (EvilEdit, UCE) is a low-rank change; a full fine-tune is not.
- Which tokens the change is about (`cross_attention_scores`, `text_encoder_scores`). A cross-attention
  edit W' = W + D (EvilEdit, UCE, ReFACT-style) acts on a token only through D c, where c is the token's
  contextual embedding: the relative size |D c| / |W c| over the whole vocabulary names the tokens the
  edit was fitted on. A text-encoder backdoor (Rickrolling) moves the embeddings of the words around its
  trigger: the change of those words' embeddings between suspect and base, with the token present, names it.

Scores are turned into robust z-scores against the vocabulary's own median and spread (`robust_z`), the
same statistic the blind scan uses (core/detect/scan.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Component names, in the order reports list them.
COMPONENTS = ("text_encoder", "cross_attention_kv", "cross_attention_q_out", "self_attention", "unet_other")


def component_of(key: str) -> str:
    """The component a live-weight key ('text.<name>' or 'unet.<name>', backends' `live_weights`) belongs to."""
    if key.startswith("text."):
        return "text_encoder"
    if ".attn2.to_k." in key or ".attn2.to_v." in key:
        return "cross_attention_kv"
    if ".attn2." in key:
        return "cross_attention_q_out"
    if ".attn1." in key:
        return "self_attention"
    return "unet_other"


def effective_rank(delta: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of a weight change (matrix; a conv kernel is read as out x (in*kh*kw);
    a vector has rank 1): exp(H(p)), p = singular values / their sum. 0.0 for a zero change."""
    if delta.ndim < 2:
        return 1.0 if bool(delta.any()) else 0.0
    s = torch.linalg.svdvals(delta.detach().float().flatten(1))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class WeightChange:
    """One changed tensor: `norm` = |D|_F, `relative` = |D|_F / |W_base|_F, `effective_rank` of D."""

    key: str
    component: str
    shape: tuple[int, ...]
    norm: float
    relative: float
    effective_rank: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def weight_changes(
    pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]], rank_below: int = 4096
) -> tuple[list[WeightChange], dict[str, int]]:
    """Every tensor whose value differs between base and suspect, largest relative change first, and the
    tensor count per component. pairs: (key, base weight, suspect weight), as the backends' `weight_pairs`
    yields them (the same tensor object twice for a weight nothing changed). Effective rank is computed for
    matrices whose smaller side is at most `rank_below` (-1 elsewhere: that SVD costs more than it tells).

    Raises ValueError when a pair's shapes differ: the two are not the same architecture."""
    changes, totals = [], {}
    for key, b, s in pairs:
        comp = component_of(key)
        totals[comp] = totals.get(comp, 0) + 1
        if b is s:
            continue
        if b.shape != s.shape:
            raise ValueError(
                f"base and suspect are different architectures ({key}: {tuple(b.shape)} vs {tuple(s.shape)})"
            )
        d = s.detach().float() - b.detach().float()
        norm = float(d.norm())
        if norm == 0.0:
            continue
        small = min(d.flatten(1).shape) if d.ndim >= 2 else 1
        changes.append(
            WeightChange(
                key=key,
                component=comp,
                shape=tuple(s.shape),
                norm=norm,
                relative=norm / max(float(b.detach().float().norm()), 1e-12),
                effective_rank=effective_rank(d) if small <= rank_below else -1.0,
            )
        )
    return sorted(changes, key=lambda c: -c.relative), totals


def summarize(changes: Iterable[WeightChange], totals: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Per component: how many tensors changed of how many, the largest relative change, the median
    effective rank of the changed matrices. totals: component -> tensor count in the model."""
    out: dict[str, dict[str, Any]] = {}
    by: dict[str, list[WeightChange]] = {}
    for c in changes:
        by.setdefault(c.component, []).append(c)
    for comp in COMPONENTS:
        items = by.get(comp, [])
        ranks = sorted(c.effective_rank for c in items if c.effective_rank >= 0 and len(c.shape) >= 2)
        out[comp] = {
            "tensors": totals.get(comp, 0),
            "changed": len(items),
            "max_relative": max((c.relative for c in items), default=0.0),
            "median_effective_rank": ranks[len(ranks) // 2] if ranks else None,
        }
    return out


def robust_z(scores: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD): how far each score sits out of the population's bulk (V,) -> (V,)."""
    x = scores.float()
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    return (x - med) / mad.clamp_min(1e-12 + 1e-6 * float(med.abs()))


def cross_attention_scores(
    edits: Iterable[tuple[torch.Tensor, torch.Tensor]], contexts: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    """How much a cross-attention change acts on each token: the mean over changed to_k / to_v projections
    of |D c| / |W_base c|, for each contextual embedding c. (V,) scores.

    edits: (W_base (out x C), W_suspect (out x C)) per changed projection.
    contexts: (V x K x C) K contexts per token (the token after K different prefixes); a token's score is
    its largest over K, since an edit fitted on one wording acts there first."""
    edits = [(b.float(), (s.float() - b.float())) for b, s in edits]
    if not edits:
        return torch.zeros(contexts.shape[0])
    out = torch.zeros(contexts.shape[0])
    for start in range(0, contexts.shape[0], chunk):
        c = contexts[start : start + chunk].float()
        acc = torch.zeros(c.shape[:2])
        for w, d in edits:
            acc += (c @ d.T).norm(dim=-1) / (c @ w.T).norm(dim=-1).clamp_min(1e-12)
        out[start : start + chunk] = (acc / len(edits)).amax(-1)
    return out


def text_encoder_scores(
    base_with: torch.Tensor,
    suspect_with: torch.Tensor,
    base_without: torch.Tensor,
    suspect_without: torch.Tensor,
) -> torch.Tensor:
    """How much a token makes the suspect's encoder disagree with the base's on the words after it, for one
    probe phrase.

    base_with / suspect_with: (V x L x C) the phrase's L word contexts with each token in front, encoded by
    each model; base_without / suspect_without: (1 x L x C) the same words without a token. Score:
    |S_with - B_with| / |B_with| over the words, minus the same for the words alone (the fine-tune's drift
    that every token shares). (V,) scores."""

    def moved(b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (s - b).flatten(-2).norm(dim=-1) / b.flatten(-2).norm(dim=-1).clamp_min(1e-12)

    return moved(base_with, suspect_with) - moved(base_without, suspect_without)
