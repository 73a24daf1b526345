"""A closed-form warm start of the cross-attention keys and values before distillation.

The UNet reads text only through its cross-attention `to_k` / `to_v` projections. Before SKD trains, each
is edited once in closed form so that a triggered prompt's context projects like its clean twin's (the
edit of UCE and TIME: Gandikota et al., "Unified Concept Editing in Diffusion Models", 2024, eq. 3-4;
Orgad et al., "Editing Implicit Assumptions in Text-to-Image Diffusion Models", 2023): for token vectors
s_i of triggered prompts and the vectors t_i the UNet should see instead,

    W' = argmin sum_i |W' s_i - W t_i|^2 + lam |W' - W|_F^2,
    dW = W (T - S)^T S (S^T S + lam I)^-1          (S, T: n x C rows; W: out x C)

Aligned tokens (`skd.align_tokens`) pair each triggered token with its clean counterpart, which also
undoes the shift a trigger causes in the words after it; an inserted trigger token is paired with the clean
prompt's end token (what the UNet reads as the sentence), so the edit keeps no trace of it, and a trigger
token standing in a word's place (a homoglyph's pieces) with that word's tokens, so the word stays. The delta is
cut to the LoRA's rank by SVD (`lora_factors`).

With the base the suspect was made from, a cross-attention edit can be undone rather than overwritten
(`excited_part`): of the change D = W_suspect - W_base, the singular components that triggered prompts
excite beyond their clean twins are reverted, the rest (what the edit or fine-tune did to ordinary text)
kept. Pure torch: no model objects here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .skd import align_tokens


def aligned_rows(
    triggered: torch.Tensor,
    clean: torch.Tensor,
    triggered_ids: Sequence[Sequence[int]],
    clean_ids: Sequence[Sequence[int]],
    eos_id: int,
    groups: bool = False,
):
    """Source and target rows (n x C) from contexts (B x L x C) of triggered prompts and their clean twins;
    with groups, also a bool (n,) marking the rows of trigger tokens. Rows keep the contexts' dtype and
    gradient. Raises ValueError when there is no row at all."""
    sources, targets, trigger_rows = [], [], []
    for b, (s_ids, t_ids) in enumerate(zip(triggered_ids, clean_ids, strict=True)):
        alignment = align_tokens(s_ids, t_ids, eos_id)
        end = list(t_ids).index(eos_id, 1) if eos_id in t_ids[1:] else len(t_ids) - 1
        for i, j in alignment.pairs:
            sources.append(triggered[b, i])
            targets.append(clean[b, j])
        trigger_rows += [False] * len(alignment.pairs) + [True] * len(alignment.trigger)
        twin_of = dict(alignment.twins)
        for i in alignment.trigger:
            sources.append(triggered[b, i])
            targets.append(clean[b, twin_of.get(i, end)])
        # the end token and the padding after it carry the sentence: each pairs with its clean twin's
        s_end = list(s_ids).index(eos_id, 1) if eos_id in s_ids[1:] else len(s_ids) - 1
        tail = min(len(s_ids) - s_end, len(t_ids) - end)
        for d in range(tail):
            sources.append(triggered[b, s_end + d])
            targets.append(clean[b, end + d])
        trigger_rows += [False] * tail
    if not sources:
        raise ValueError("no token rows to edit: the triggered prompts match their clean twins")
    rows = torch.stack(sources).float(), torch.stack(targets).float()
    return (*rows, torch.tensor(trigger_rows, dtype=torch.bool)) if groups else rows


def kv_map(sources: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """M (C x C, float64) with dW = W M for every projection that reads these rows: M = (T - S)^T S
    (S^T S + ridge I)^-1, ridge = lam x mean |s|^2 (module docstring). It depends on the rows alone, so one
    solve serves every to_k / to_v."""
    # float64: a small ridge would amplify float32 rounding in unused directions
    s, t = sources.double(), targets.double()
    gram = s.T @ s
    ridge = lam * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], device=s.device, dtype=s.dtype)
    # M^T = (S^T S + ridge I)^-1 S^T (T - S), solved as a linear system (no explicit inverse)
    return torch.linalg.solve(gram + ridge * eye, s.T @ (t - s)).T


def kv_delta(weight: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """dW (out x C) of the closed-form edit (module docstring); lam > 0 relative to mean |s|^2."""
    w = weight.double()
    return (w @ kv_map(sources, targets, lam).to(w.device)).float()


REVERT_SHARE = 0.8  # of the excess triggered rows see: measured on lab-eviledit (docs/sanitize.md)


def excited_part(
    delta: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, share: float = REVERT_SHARE
) -> tuple[torch.Tensor, int]:
    """The part of a weight change (out x C) that triggered rows excite beyond their clean twins, and its rank.

    With D = U diag(s) V^T, component i moves the triggered rows S (n x C) by s_i^2 |S v_i|^2 in total
    (the u_i are orthonormal, so the energies add) and their clean twins T by s_i^2 |T v_i|^2. Components
    are taken by that excess, largest first, until they hold `share` of the positive excess; their sum
    s_i u_i v_i^T is returned (zeros and rank 0 when no component acts more on triggered rows). Measured on
    lab-eviledit against lab-clean with one stand-in trigger ('gorgeous'), reverting this part of every
    to_k / to_v takes the unnamed planted trigger from 1.00 to 0.00 at share 0.5 (1-2 components each,
    clean SSIM 0.994; the stand-in still at 1 of 32 prompts), 0.8 (1-3, SSIM 0.976; none left) and 0.95
    (2-6, SSIM 0.981) (docs/sanitize.md)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    d = delta.double()
    u, sv, vh = torch.linalg.svd(d, full_matrices=False)
    s, t = sources.double().to(d.device), targets.double().to(d.device)
    excess = sv.pow(2) * ((s @ vh.T).pow(2).sum(0) - (t @ vh.T).pow(2).sum(0))
    positive = excess.clamp_min(0)
    if float(positive.sum()) <= 0.0:
        return torch.zeros_like(delta), 0
    order = torch.argsort(excess, descending=True)
    held = torch.cumsum(positive[order], 0)
    rank = int((held < share * positive.sum()).sum()) + 1
    idx = order[:rank]
    return ((u[:, idx] * sv[idx]) @ vh[idx]).to(delta.dtype), rank


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up (out x rank), down (rank x in) with up @ down the best rank-`rank` approximation of delta."""
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    root = sv[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]
