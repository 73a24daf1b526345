"""SKD and SKD-CAG: self-knowledge distillation, optionally with cross-attention guidance.

The teacher is the poisoned model itself given the clean prompt; the student is the same model
plus a trainable delta given the triggered prompt (arXiv 2508.18235). Unlike the reference code,
the attention loss here is differentiable and teacher and student maps are kept apart.
This module is pure torch: the model is anything that implements `DistillationModel`.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..triggers import TrainingPair

METHODS = ("match", "skd", "skd-cag")  # match: context matching of the text encoder (`match.py`), not SKD
DISTILLATION = ("skd", "skd-cag")
TARGETS = ("noise", "black", "random-words")
INPUTS = ("noise", "trajectory")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 autocast on a GPU that has it, else fp32

ProgressFn = Callable[[int, int, dict], None]


@dataclass(frozen=True)
class SKDConfig:
    """Hyper-parameters of one unlearning run (defaults tuned on the lab; the paper's in docs/unlearn.md)."""

    method: str = "skd-cag"
    alpha: float = 0.5  # weight of L_attn against L_pred (the paper's best)
    target: str = "black"  # what the trigger tokens' maps are pushed to
    timestep_weighting: bool = False  # scale L_attn by t/T, as the paper writes it
    steps: int = 600
    lr: float = 2e-3
    schedule: str = "constant"  # the paper's constant lr, or "cosine": decayed from lr to 0 over the steps
    weight_decay: float = 0.01
    batch: int = 8
    seed: int = 0
    precision: str = "auto"
    grad_clip: float = 1.0
    retain: float = 0.25  # share of batch items whose student sees the clean prompt (not in the paper)
    inputs: str = "noise"  # x_t: pure noise (the paper) or states of the teacher's own clean sampling
    trajectory_steps: int = 10  # DDIM steps per prompt when inputs = "trajectory"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown attention target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.inputs not in INPUTS:
            raise ValueError(f"unknown inputs {self.inputs!r}; choose one of {', '.join(INPUTS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.retain < 1.0:
            raise ValueError(f"retain must lie in [0, 1), got {self.retain}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps and batch must be at least 1 and lr positive")

    @property
    def attention_weight(self) -> float:
        """alpha for SKD-CAG; SKD trains on the prediction loss alone."""
        return self.alpha if self.method == "skd-cag" else 0.0

    def to_json(self) -> dict:
        """Plain-data form for metadata."""
        return asdict(self)


class DistillationModel(Protocol):
    """What SKD needs from a diffusion model holding a switchable trainable delta."""

    num_timesteps: int
    alphas_cumprod: torch.Tensor  # (num_timesteps,) cumulative alpha of the VP schedule
    latent_shape: tuple[int, int, int]  # (C, H, W) of the UNet input
    device: torch.device
    eos_id: int

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's token ids as the model's tokenizer gives them (BOS first)."""
        ...

    def encode(self, prompts: list[str], student: bool) -> torch.Tensor:
        """Cross-attention context (B x T x C); student=True with the delta on."""
        ...

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, student: bool, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps for unit-variance input x at integer timesteps t, and (if record) the per-token
        cross-attention maps summed over layers (B x T x R x R), differentiable."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The delta's parameters."""
        ...


@dataclass(frozen=True)
class TokenAlignment:
    """Which student positions are trigger tokens, and which student position shows which teacher word."""

    trigger: tuple[int, ...]  # student positions (BOS = 0)
    pairs: tuple[tuple[int, int], ...]  # (student position, teacher position)
    # trigger tokens that stand where the teacher has other tokens (a homoglyph's word pieces in place of
    # its twin word): (student position, the teacher position it replaces, spread evenly over the span)
    twins: tuple[tuple[int, int], ...] = ()


def align_tokens(student_ids: Sequence[int], teacher_ids: Sequence[int], eos_id: int) -> TokenAlignment:
    """Match the triggered prompt's tokens to the clean prompt's; unmatched student tokens are the trigger.

    Works wherever the trigger sits and however many tokens it has (an inserted word, a homoglyph
    that splits a word into pieces)."""

    def body(ids: Sequence[int]) -> list[int]:
        ids = list(ids)[1:]
        return ids[: ids.index(eos_id)] if eos_id in ids else ids

    s, t = body(student_ids), body(teacher_ids)
    matcher = difflib.SequenceMatcher(None, s, t, autojunk=False)
    pairs = [(a + i + 1, b + i + 1) for a, b, n in matcher.get_matching_blocks() for i in range(n)]
    matched = {p for p, _ in pairs}
    trigger = tuple(i + 1 for i in range(len(s)) if i + 1 not in matched)
    twins = tuple(
        (i + 1, j1 + (i - i1) * (j2 - j1) // (i2 - i1) + 1)
        for op, i1, i2, j1, j2 in matcher.get_opcodes()
        if op == "replace"
        for i in range(i1, i2)
    )
    return TokenAlignment(trigger, tuple(pairs), twins)


def minmax_per_token(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each token's map to [0, 1] over its spatial grid (B x T x R x R)."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)


def attention_loss(
    student_maps: torch.Tensor,
    teacher_maps: torch.Tensor,
    alignments: Sequence[TokenAlignment],
    target: str,
    generator: torch.Generator | None = None,
    random_word_positions: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Per item: [sum over trigger tokens MSE(A_s, R) + sum over words MSE(A_s[j+k], A_t[j])] / (n + k).

    Maps are B x T x R x R summed over layers; both are min-max normalised per token here.
    """
    a_s = minmax_per_token(student_maps.float())
    a_t = minmax_per_token(teacher_maps.float()).detach()
    losses = []
    for b, align in enumerate(alignments):
        terms = []
        if align.trigger:
            trig = a_s[b, list(align.trigger)]
            if target == "black":
                ref = torch.zeros_like(trig)
            elif target == "noise":  # the reference redraws U[0, 1) every step
                ref = torch.rand(trig.shape, generator=generator).to(trig)
            else:  # random words: the teacher's maps of the words put where the trigger was
                words = list(random_word_positions[b]) if random_word_positions else []
                if not words:
                    raise ValueError("the random-words target needs the random words' teacher positions")
                ref = a_t[b, words].mean(0, keepdim=True).expand_as(trig)
            terms.append(((trig - ref) ** 2).mean(dim=(-2, -1)).sum())
        if align.pairs:
            s_idx = [p for p, _ in align.pairs]
            t_idx = [q for _, q in align.pairs]
            terms.append(((a_s[b, s_idx] - a_t[b, t_idx]) ** 2).mean(dim=(-2, -1)).sum())
        count = len(align.trigger) + len(align.pairs)
        losses.append(torch.stack(terms).sum() / count if terms else a_s.new_zeros(()))
    return torch.stack(losses)


@dataclass
class UnlearnResult:
    """Losses per step and the time the training loop took."""

    losses: list[dict]
    seconds: float
    steps: int
    stopped_early: bool = False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: "bf16" always; "auto" on a CUDA device with bf16 (the
    deltas and optimizer state stay fp32; a CPU's bf16 matmuls are slower than its fp32 ones)."""
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def train_skd(
    model: DistillationModel,
    pairs: Sequence[TrainingPair],
    cfg: SKDConfig,
    random_words: Sequence[str] = (),
    progress: ProgressFn | None = None,
    check_interrupt: Callable[[], None] | None = None,
    on_step: Callable[[int], bool] | None = None,
) -> UnlearnResult:
    """Train the model's delta so triggered prompts act like their clean prompts (SKD / SKD-CAG).

    x_t is pure N(0, I) and t ~ U{0..T-1} as in the reference; no images are needed. check_interrupt
    raises to stop (nothing is applied to the caller's model). on_step(step) returning True ends the
    run early (a benchmark's removal check).
    """
    if not pairs:
        raise ValueError("no training prompts")
    if cfg.method not in DISTILLATION:
        raise ValueError(
            f"{cfg.method!r} is not a distillation method: train_skd runs {', '.join(DISTILLATION)}"
        )
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # constant LR, as the paper
    # cosine: the full lr while the trigger is being removed, then ever smaller steps for the clean prompts
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / cfg.steps)))
        if cfg.schedule == "cosine"
        else None
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    alpha = cfg.attention_weight
    use_cag = alpha > 0
    bf16 = uses_bf16(cfg.precision, model.device)
    losses: list[dict] = []
    order: list[int] = []
    t0 = time.monotonic()
    trajectories = None
    if cfg.inputs == "trajectory":
        trajectories = teacher_trajectories(
            model, [p.clean for p in pairs], cfg.trajectory_steps, gen, cfg.batch
        )
    for step in range(cfg.steps):
        if check_interrupt:
            check_interrupt()
        if len(order) < cfg.batch:  # epochs over the prompt set in a shuffled order
            order += list(rng.permutation(len(pairs)))
        picked = order[: cfg.batch]
        batch = [pairs[i] for i in picked]
        del order[: cfg.batch]
        teacher_prompts = [p.clean for p in batch]
        word_positions = None
        if use_cag and cfg.target == "random-words":
            teacher_prompts, word_positions = _with_random_words(model, batch, random_words, rng)
        if trajectories is None:
            t = torch.randint(0, model.num_timesteps, (len(batch),), generator=gen)
            x = torch.randn((len(batch), *model.latent_shape), generator=gen)
        else:  # a random state of each item's own clean trajectory
            k = torch.randint(0, len(trajectories.timesteps), (len(batch),), generator=gen)
            t = trajectories.timesteps[k]
            x = trajectories.states[torch.as_tensor(picked), k]
        # Retain items teach the delta to leave clean prompts alone: the student sees the teacher's
        # prompt. No draw without retain, so runs without it repeat exactly.
        keep = rng.random(len(batch)) < cfg.retain if cfg.retain else np.zeros(len(batch), bool)
        student_prompts = [
            tp if k else p.triggered for p, tp, k in zip(batch, teacher_prompts, keep, strict=True)
        ]
        device = model.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
            ctx_t = model.encode(teacher_prompts, student=False)
            eps_t, maps_t = model.predict(x, t, ctx_t, student=False, record=use_cag)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            ctx_s = model.encode(student_prompts, student=True)
            eps_s, maps_s = model.predict(x, t, ctx_s, student=True, record=use_cag)
        loss_pred = F.mse_loss(eps_s.float(), eps_t.float())
        record = {"pred": loss_pred.item()}
        loss = (1 - alpha) * loss_pred
        if use_cag:
            ids_s, ids_t = model.token_ids(student_prompts), model.token_ids(teacher_prompts)
            aligns = [align_tokens(s, q, model.eos_id) for s, q in zip(ids_s, ids_t, strict=True)]
            per_item = attention_loss(maps_s, maps_t, aligns, cfg.target, gen, word_positions)
            if cfg.timestep_weighting:
                per_item = per_item * (t.float() / model.num_timesteps).to(per_item)
            loss_attn = per_item.mean()
            loss = loss + alpha * loss_attn
            record["attn"] = loss_attn.item()
        record["loss"] = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(record)
        if progress:
            progress(step + 1, cfg.steps, record)
        if on_step and on_step(step + 1):
            return UnlearnResult(losses, time.monotonic() - t0, step + 1, stopped_early=True)
    return UnlearnResult(losses, time.monotonic() - t0, cfg.steps)


@dataclass
class Trajectories:
    """States x_t of the teacher's deterministic sampling of each clean prompt (pure noise first)."""

    timesteps: torch.Tensor  # (K,) integer timesteps, descending
    states: torch.Tensor  # (N, K, C, H, W) unit-variance inputs, one row per training pair


@torch.no_grad()
def teacher_trajectories(
    model: DistillationModel, prompts: Sequence[str], steps: int, gen: torch.Generator, batch: int = 8
) -> Trajectories:
    """DDIM (eta 0, no guidance) with the delta off: where real sampling of clean prompts passes.

    The paper trains on pure noise only; a backdoor that fires on partly drawn images (a patch
    next to a similar colour) is then never shown to the student."""
    acp = model.alphas_cumprod.float()
    ts = torch.linspace(model.num_timesteps - 1, 0, steps).round().long()
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        ctx = model.encode(chunk, student=False)
        x = torch.randn((len(chunk), *model.latent_shape), generator=gen)
        states = []
        for i, t in enumerate(ts):
            states.append(x.cpu())
            a = acp[t]
            eps, _ = model.predict(x, t.repeat(len(chunk)), ctx, student=False, record=False)
            eps = eps.float().cpu()
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            a_next = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        rows.append(torch.stack(states, 1))
    return Trajectories(ts, torch.cat(rows))


def _with_random_words(
    model: DistillationModel,
    batch: Sequence[TrainingPair],
    random_words: Sequence[str],
    rng: np.random.Generator,
) -> tuple[list[str], list[list[int]]]:
    """Teacher prompts with two random words in the trigger's place, and those words' positions."""
    if len(random_words) < 2:
        raise ValueError("the random-words target needs a word list")
    prompts, positions = [], []
    for pair in batch:
        words = " ".join(random_words[int(i)] for i in rng.choice(len(random_words), 2, replace=False))
        prompt = f"{words} {pair.clean}"
        ids, clean_ids = model.token_ids([prompt, pair.clean])
        prompts.append(prompt)
        align = align_tokens(ids, clean_ids, model.eos_id)
        positions.append(list(align.trigger))
    return prompts, positions
