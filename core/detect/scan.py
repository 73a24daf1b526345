"""Blind scan: rank every token of the vocabulary by how strongly inserting it hijacks the model.

No triggered prompt is needed. Each token is put in front of clean probe prompts (where BadT2I-style
attacks put their trigger) and the model takes ONE denoising step; what moves is the denoised
prediction x0, the image the model is heading to.

- Stage 1 (whole vocabulary): a few probes, one step each, batched: how far x0 moves, and how much
  the other words' text embeddings move (a text-encoder backdoor rewrites the whole prompt).
  Both are robust z-scores against the vocabulary's own median and spread.
- Stage 2 (the best candidates, plus random tokens as a null sample): many probes and two noise
  draws. The score is the size of the x0 change that every probe shares, times how alike the
  probes' changes point: a backdoor's target does not depend on the prompt, an ordinary word's
  effect does. Scores are robust z-scores against every token stage 2 scored on the same model
  (so the scale is the model's own); a flagged token is an outlier even among the strongest ones.

Tokens that the clean calibration prompts themselves use are the model's ordinary vocabulary: they
are scored and shown, but they cannot be candidates (a prompt that contains the trigger is not clean).
Nothing here depends on the lab: a real SD checkpoint is scanned the same way, only slower.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from ..tokens import assemble
from .masking import ProbeModel, content_end


class ScanProbe(ProbeModel, Protocol):
    """What the scan needs beyond the masking detector's probe."""

    def vocabulary_size(self) -> int:
        """Number of token ids."""
        ...

    def token_text(self, token_id: int) -> str:
        """Readable text of one token."""
        ...

    def x0(self, context: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Denoised prediction of one step."""
        ...


@dataclass
class ScanSettings:
    """How much work each stage does; the defaults scan a lab model's 49,408 tokens in a few minutes."""

    stage1_probes: int = 2
    stage2_probes: int = 16
    stage2_seeds: int = 2
    candidates: int = 512  # stage-1 survivors that stage 2 scores (about the top 1% of CLIP's vocabulary)
    null_tokens: int = (
        64  # tokens stage 2 also scores as its null: random ones of stage-1 ranks just below the candidates
    )
    threshold_z: float = (
        8.0  # stage-2 robust z (against the model's own stage-2 population) that flags a token
    )
    t_fraction: float = 0.7
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    batch: int = 256
    seed: int = 0
    token_ids: tuple[int, ...] | None = None  # scan only these ids (tests, focused rescans)

    def timestep(self, num_timesteps: int) -> int:
        """The integer timestep probed."""
        return min(num_timesteps - 1, max(0, round(self.t_fraction * (num_timesteps - 1))))


@dataclass
class ScanCandidate:
    """One token the scan ranks: its stage-1 and stage-2 robust z-scores."""

    token_id: int
    text: str
    stage1_z: float
    text_z: float
    score_z: float  # stage 2
    flagged: bool = False
    token_ids: tuple[
        int, ...
    ] = ()  # the candidate trigger's ids (a look-alike's byte pieces); () = (token_id,)

    def __post_init__(self) -> None:
        self.token_ids = tuple(self.token_ids) or (self.token_id,)


@dataclass
class ScanReport:
    """The ranked candidates (stage-2 order), the calibrated threshold and the cost of the scan."""

    candidates: list[ScanCandidate]
    threshold_z: float
    null_max_z: float
    scanned_tokens: int
    unet_evals: int
    ordinary_tokens: list[int] = field(default_factory=list)
    stage1: dict[int, float] = field(default_factory=dict)  # every scanned token's stage-1 z

    @property
    def flagged(self) -> list[ScanCandidate]:
        """Candidates above the threshold, strongest first."""
        return [c for c in self.candidates if c.flagged]

    def rank_of(self, token_ids: Sequence[int]) -> int | None:
        """1-based rank of the best-ranked of these ids among all scanned tokens (stage 2 first)."""
        order = [c.token_id for c in self.candidates]
        in_stage2 = set(order)
        order += sorted((i for i in self.stage1 if i not in in_stage2), key=lambda i: -self.stage1[i])
        rank = {token: k + 1 for k, token in enumerate(order)}
        ranks = [rank[i] for i in token_ids if i in rank]
        return min(ranks) if ranks else None

    def to_dict(self, top: int = 20) -> dict:
        """A JSON-ready summary (the report type the nodes pass on): trigger, candidates, threshold."""
        flagged = self.flagged
        return {
            "kind": "scan",
            "poisoned": bool(flagged),
            "trigger": flagged[0].text if flagged else None,
            "threshold_z": self.threshold_z,
            "null_max_z": self.null_max_z,
            "scanned_tokens": self.scanned_tokens,
            "unet_evals": self.unet_evals,
            "candidates": [{**asdict(c), "token_ids": list(c.token_ids)} for c in self.candidates[:top]],
        }


def robust_z(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / (1.4826 MAD) of the reference (the values themselves by default)."""
    ref = values if reference is None else reference
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med))) * 1.4826
    return (values - med) / max(mad, 1e-12)


def _inserted(base: list[int], units: Sequence[int | Sequence[int]]) -> list[list[int]]:
    """Copies of a padded id row with each token (or run of tokens: a word, an embedding) put right after
    BOS; the row keeps its length."""
    out = []
    for unit in units:
        ids = [int(unit)] if isinstance(unit, int | np.integer) else [int(i) for i in unit]
        out.append(base[:1] + ids + base[1 : len(base) - len(ids)])
    return out


class VocabularyScanner:
    """Runs both stages on a probe model; `progress(done, total)` and `interrupted()` let nodes show and stop it."""

    def __init__(
        self,
        probe: ScanProbe,
        clean_prompts: Sequence[str],
        settings: ScanSettings | None = None,
        progress: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.probe, self.settings = probe, settings or ScanSettings()
        prompts = [p for p in clean_prompts if p.strip()]
        need = max(self.settings.stage1_probes, self.settings.stage2_probes)
        if len(prompts) < need:
            raise ValueError(f"the scan needs at least {need} clean prompts, got {len(prompts)}")
        self.prompts = prompts
        self.progress = progress or (lambda done, total: None)
        self.check_interrupt = check_interrupt or (lambda: None)
        self.t = self.settings.timestep(probe.num_timesteps)
        limit = getattr(probe, "batch_limit", None)  # sized to the device's free memory
        self.batch = limit(self.settings.batch, self.settings.latent_shape) if limit else self.settings.batch
        self.unet_evals = 0
        self._references: dict[tuple[int, int], tuple[list[int], torch.Tensor]] = {}

    def _noise(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.settings.seed * 1000 + seed)
        return torch.randn((1, *self.settings.latent_shape), generator=g)

    def ordinary_tokens(self) -> set[int]:
        """Token ids the clean prompts use: the model's ordinary vocabulary, never candidates."""
        out: set[int] = set()
        for p in self.prompts:
            ids = self.probe.token_ids(p)
            out.update(ids[1 : content_end(ids, self.probe.eos)])
        return out

    def vocabulary(self) -> list[int]:
        """The ids scanned: all but the special tokens (or the settings' explicit list)."""
        special = {self.probe.bos, self.probe.eos, self.probe.pad}
        ids = self.settings.token_ids or range(self.probe.vocabulary_size())
        return [int(i) for i in ids if int(i) not in special]

    def _x0(self, rows: list[list[int]], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = self.probe.encode_rows(rows)
        self.unet_evals += len(rows)
        return self.probe.x0(context, noise, self.t).flatten(1), context

    def _reference(self, probe_index: int, noise_seed: int) -> tuple[list[int], torch.Tensor]:
        """A probe's ids and its own x0 for one noise draw, computed once (the transplant detector asks per prompt)."""
        key = (probe_index, noise_seed)
        if key not in self._references:
            base = self.probe.token_ids(self.prompts[probe_index])
            self._references[key] = (base, self._x0([base], self._noise(noise_seed))[0])
        return self._references[key]

    def stage1(self, vocab: list[int], on_chunk: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
        """Per token: mean x0 change over the first probes, and the change of the probes' own word embeddings."""
        s = self.settings
        x0_change = np.zeros(len(vocab))
        text_change = np.zeros(len(vocab))
        for p in range(s.stage1_probes):
            base = self.probe.token_ids(self.prompts[p])
            end = content_end(base, self.probe.eos)
            noise = self._noise(p)
            ref_x0, ref_ctx = self._x0([base], noise)
            words = ref_ctx[0, 1:end]
            for start in range(0, len(vocab), self.batch):
                self.check_interrupt()
                chunk = vocab[start : start + self.batch]
                out, ctx = self._x0(_inserted(base, chunk), noise)
                x0_change[start : start + len(chunk)] += (out - ref_x0).norm(dim=1).numpy()
                moved = (ctx[:, 2 : end + 1] - words.unsqueeze(0)).flatten(1).norm(dim=1) / words.norm()
                text_change[start : start + len(chunk)] += moved.numpy()
                on_chunk(len(chunk))
        return x0_change / s.stage1_probes, text_change / s.stage1_probes

    def stage2(
        self, token_ids: list[int] | list[Sequence[int]], on_chunk: Callable[[int], None]
    ) -> np.ndarray:
        """Per token (or run of tokens, put in together): size of the x0 change every probe shares times how
        alike the probes' changes point.

        For unit vectors u_i of n probes, the mean pairwise cosine is (|sum u_i|^2 - n) / (n (n - 1)).
        """
        s = self.settings
        n = s.stage2_probes
        score = np.zeros(len(token_ids))
        for seed in range(s.stage2_seeds):
            noise = self._noise(100 + seed)
            total = torch.zeros(len(token_ids), int(np.prod(s.latent_shape)))
            units = torch.zeros_like(total)
            for p in range(n):
                self.check_interrupt()
                base, ref = self._reference(p, 100 + seed)
                for start in range(0, len(token_ids), self.batch):
                    chunk = token_ids[start : start + self.batch]
                    out, _ = self._x0(_inserted(base, chunk), noise)
                    change = out - ref
                    total[start : start + len(chunk)] += change
                    units[start : start + len(chunk)] += torch.nn.functional.normalize(change, dim=1)
                on_chunk(len(token_ids))
            shared = (total / n).norm(dim=1)
            agreement = ((units.norm(dim=1) ** 2 - n) / (n * (n - 1))).clamp_min(0)
            score += (shared * agreement).numpy()
        return score / s.stage2_seeds

    def run(self) -> ScanReport:
        """Stage 1 over the vocabulary, stage 2 over its best non-ordinary tokens and a null sample."""
        s = self.settings
        vocab = self.vocabulary()
        ordinary = self.ordinary_tokens()
        total = (
            len(vocab) * s.stage1_probes + (s.candidates + s.null_tokens) * s.stage2_probes * s.stage2_seeds
        )
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            self.progress(min(done, total), total)

        x0_change, text_change = self.stage1(vocab, tick)
        z1, zt = robust_z(x0_change), robust_z(text_change)
        combined = np.maximum(z1, zt)
        eligible = [k for k in np.argsort(-combined) if vocab[k] not in ordinary]
        top = [vocab[k] for k in eligible[: s.candidates]]
        # The null comes from the next stratum of stage 1 (as strong there, so stage 2 compares like
        # with like): a token drawn from the whole vocabulary would be weaker by selection alone.
        pool = [vocab[k] for k in eligible[s.candidates : 4 * s.candidates]]
        null = random.Random(s.seed).sample(pool, min(s.null_tokens, len(pool)))
        shared = self.stage2(top + null, tick)
        # Robust z against everything stage 2 scored: a backdoor is an outlier even among the
        # strongest tokens of the vocabulary and the next stratum below them.
        z_all = robust_z(shared)
        z2, null_z = z_all[: len(top)], z_all[len(top) :]
        index = {v: k for k, v in enumerate(vocab)}
        candidates = [
            ScanCandidate(
                token_id=tid,
                text=self.probe.token_text(tid),
                stage1_z=float(z1[index[tid]]),
                text_z=float(zt[index[tid]]),
                score_z=float(z2[j]),
                flagged=bool(z2[j] > s.threshold_z),
            )
            for j, tid in enumerate(top)
        ]
        candidates.sort(key=lambda c: -c.score_z)
        tokenizer = getattr(self.probe, "tokenizer", None)
        if tokenizer is not None:  # byte pieces of one character become one candidate (core/tokens.py)
            scored = {c.token_id: c for c in candidates}
            order = [c.token_id for c in candidates]
            order += [vocab[k] for k in np.argsort(-combined) if vocab[k] not in scored]
            candidates = [
                replace(scored[seq.lead], text=seq.text, token_ids=seq.ids)
                for seq in assemble(tokenizer, order, len(candidates))
                if seq.lead in scored
            ]
        return ScanReport(
            candidates=candidates,
            threshold_z=s.threshold_z,
            null_max_z=float(np.max(null_z)) if len(null_z) else float("nan"),
            scanned_tokens=len(vocab),
            unet_evals=self.unet_evals,
            ordinary_tokens=sorted(ordinary),
            stage1={v: float(combined[k]) for k, v in enumerate(vocab)},
        )
