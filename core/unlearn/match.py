"""Context matching: unlearning a trigger in the text encoder without a UNet pass (method "match").

Every trigger reaches the UNet through the text encoder's output, the cross-attention context. Where the
delta sits in the text encoder, it is trained so that the context of each triggered prompt equals
the context the unchanged encoder gives its clean twin, row by aligned row (`closed_form.aligned_rows`:
a word's row to its twin's, an inserted trigger token's row to the clean prompt's end token, the pieces
of a word holding a homoglyph to the twin word's rows, the end and padding rows to theirs), while the context of the clean prompt itself stays as it was. It is SKD's
self-distillation (arXiv 2508.18235) moved from the UNet's output to the encoder's: the teacher is
again the poisoned model given the clean prompt, but a step costs one text-encoder pass instead of two
UNet passes. On the lab it removes every text-side attack in 25-75 steps at SSIM 0.98-0.99
(docs/unlearn.md), where SKD-CAG needs 100+ steps and ends lower; SKD after it undid part of it, so it is
the default method rather than a warm start.

Per batch of pairs (context rows of width C):

    L = w_trig * mean_trigger_rows |c_s - c_t|^2 + mean_other_rows |c_s - c_t|^2
        + w_keep * mean_rows |c_s(clean) - c_t(clean)|^2 + w_keep * mean_rows |c_s(kept) - c_t(kept)|^2

with the two weights below, "clean" the pairs' clean twins and "kept" a batch drawn from a general clean
set. Measured on the lab (docs/unlearn.md): an unweighted mean drowns a one-token trigger among 77 rows
and left lab-pixel firing after 100 steps. The twins alone keep only the slice of prompts the trigger
was trained on (lab-eviledit's pairs are all squares: clean circles and triangles drifted, clean accuracy
0.80 of 0.95); with the general set kept too, trigger weight 1 removes all five lab attacks by step
10-50 with clean accuracy within 0.01 (without it, weight 1 had cost lab-object its clean accuracy).
Pure torch: the model is anything with `token_ids`, `encode` and `eos_id` (`skd.DistillationModel`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..triggers import TrainingPair
from .closed_form import aligned_rows
from .skd import DistillationModel, UnlearnResult

TRIGGER_WEIGHT = 1.0  # the trigger tokens' rows, sent to the clean end token's (or the twin word's)
KEEP_WEIGHT = 16.0  # the clean prompts' own contexts, kept
KEEP_PROMPTS = 128  # the general clean set kept beside the twins (`keep`)


@dataclass(frozen=True)
class MatchConfig:
    """Steps and optimiser of a context-matching run (lr, batch and seed as the SKD config's)."""

    steps: int = 150
    lr: float = 2e-3
    batch: int = 8
    seed: int = 0
    trigger_weight: float = TRIGGER_WEIGHT
    keep_weight: float = KEEP_WEIGHT


def match_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_ids: Sequence[Sequence[int]],
    teacher_ids: Sequence[Sequence[int]],
    eos_id: int,
    student_clean: torch.Tensor | None,
    cfg: MatchConfig,
) -> torch.Tensor:
    """The loss above for one batch. student: B x L x C contexts of the triggered prompts (delta on);
    teacher: B x L x C of their clean twins (delta off); student_clean: the clean prompts with the delta on."""
    src, tgt, is_trigger = aligned_rows(student, teacher, student_ids, teacher_ids, eos_id, groups=True)
    err = ((src - tgt) ** 2).mean(-1)
    loss = err[~is_trigger].mean() if (~is_trigger).any() else err.new_zeros(())
    if is_trigger.any():
        loss = loss + cfg.trigger_weight * err[is_trigger].mean()
    if student_clean is not None and cfg.keep_weight:
        loss = loss + cfg.keep_weight * ((student_clean.float() - teacher.float()) ** 2).mean()
    return loss


def match_context(
    model: DistillationModel,
    pairs: Sequence[TrainingPair],
    cfg: MatchConfig,
    progress: Callable[[int, int, dict], None] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    on_step: Callable[[int], bool] | None = None,
    keep: Sequence[str] = (),
) -> UnlearnResult:
    """Train the model's text-encoder delta by context matching (above). The clean twins' contexts are
    encoded once, with the delta off. `keep`: a general set of clean prompts (`KEEP_PROMPTS` of the
    built-in set) whose contexts are kept too, a batch of them each step beside the twins. Losses are
    recorded under "match". on_step(step) returning True ends the run early; check_interrupt raises.

    Raises ValueError without pairs."""
    if not pairs:
        raise ValueError("no training prompts")
    triggered, clean = [p.triggered for p in pairs], [p.clean for p in pairs]
    ids_s, ids_t = model.token_ids(triggered), model.token_ids(clean)
    length = len(ids_s[0])  # SDXL's packed context has one more row, the pooled embedding: not a token

    def unchanged(prompts: Sequence[str]) -> torch.Tensor:  # contexts with the delta off, in batches
        with torch.no_grad():
            return torch.cat(
                [
                    model.encode(list(prompts[i : i + cfg.batch]), student=False)[:, :length].float()
                    for i in range(0, len(prompts), cfg.batch)
                ]
            )

    teacher = unchanged(clean)
    kept_t = unchanged(keep) if keep and cfg.keep_weight else None
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    losses: list[dict] = []
    t0 = time.monotonic()
    for step in range(cfg.steps):
        if check_interrupt:
            check_interrupt()
        if len(order) < cfg.batch:  # epochs in a shuffled order, as SKD
            order += list(rng.permutation(len(pairs)))
        idx, order = order[: cfg.batch], order[cfg.batch :]
        student = model.encode([triggered[i] for i in idx], student=True)[:, :length].float()
        student_clean = (
            model.encode([clean[i] for i in idx], student=True)[:, :length] if cfg.keep_weight else None
        )
        loss = match_loss(
            student,
            teacher[idx],
            [ids_s[i] for i in idx],
            [ids_t[i] for i in idx],
            model.eos_id,
            student_clean,
            cfg,
        )
        if kept_t is not None and cfg.keep_weight:  # a batch of the general clean set, kept as well
            j = rng.integers(len(keep), size=cfg.batch)
            extra = model.encode([keep[i] for i in j], student=True)[:, :length].float()
            loss = loss + cfg.keep_weight * ((extra - kept_t[j]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append({"match": loss.item()})
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
        if on_step and on_step(step + 1):
            return UnlearnResult(losses, time.monotonic() - t0, step + 1, stopped_early=True)
    return UnlearnResult(losses, time.monotonic() - t0, cfg.steps)
