"""The behavioural differential: what a token does to the suspect's prediction minus what it does to the base's.

A blind scan asks "does this token hijack the model?" and has nothing to compare an ordinary word's effect
with; with the base at hand the question is exact: a token that the fine-tune (or LoRA) did not touch does
the same thing in both models, so its differential is about zero, whatever it means. The probes name a
spread of objects and the token goes in at every slot of a probe (the start of the prompt, where BadT2I puts
its trigger, and before each object, where EvilEdit / object-swap triggers sit), so a trigger that only acts
next to "circle" or "square" still shows.

- Stage 1 (whole vocabulary): one probe, one step of both models per token: |change_suspect - change_base|
  of the denoised prediction x0, as a robust z over the vocabulary.
- Stage 2 (the best of stage 1, the weight-space stage's best, and a null sample of the whole vocabulary):
  more probes and noise draws; the score is the differential every probe shares times how alike the probes'
  differentials point (a backdoor's target does not depend on the prompt), as in the blind scan's stage 2
  (core/detect/scan.py), whose UNet-evaluation budget the whole comparison stays within.

A token is flagged by its lift: its shared differential over a typical token's (the null sample's median).
A fine-tune moves every token's prediction a little, and far more for a few (measured: the benign lab
fine-tune's null median is 7.5% of |x0| and its strongest tokens reach a lift of 3.4-4.1, a robust z of 9
among the stage-2 tokens); a trigger that overrides the whole image stands far above that (lift 5.2-9.6 for
the planted pixel, style, Rickrolling and EvilEdit triggers, whose robust z runs from 8.3 to 157), while
lab-object's trigger, which redraws one small shape, reaches only 4.2-5.0: ranked first, at the edge. A
z-score over a heavy-tailed null calls the fine-tune's strongest words outliers; the lift asks how many
times the typical change a token makes. The shared differential must also
be a material part of the image (`min_effect` of the probes' own x0 norm): the base compared with itself
differs nowhere and flags nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..detect.scan import ScanProbe, ScanSettings, robust_z

Unit = int | Sequence[int]


@dataclass
class BehaviourSettings:
    """How much work each stage does. The defaults keep the whole comparison within the blind scan's UNet
    evaluations (`within_blind_budget`)."""

    stage1_probes: int = 1
    stage2_probes: int = 12
    stage2_seeds: int = 2
    candidates: int = 192  # stage-1 survivors stage 2 scores
    weight_candidates: int = 64  # the weight-space ranking's best, added to stage 2
    null_tokens: int = 64
    threshold_lift: float = 5.0  # flagged: shared differential >= this many times the null sample's median
    threshold_z: float = 8.0  # prompt-level detection (prompts.py): robust z against clean prompts' tokens
    min_effect: float = 0.05  # shared differential / mean |x0| of the probes, below which nothing is flagged
    t_fraction: float = 0.7
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    batch: int = 256
    seed: int = 0
    token_ids: tuple[int, ...] | None = None  # only these ids (tests, focused rescans)

    def timestep(self, num_timesteps: int) -> int:
        """The integer timestep probed (the blind scan's)."""
        return min(num_timesteps - 1, max(0, round(self.t_fraction * (num_timesteps - 1))))

    def unet_evals(self, vocabulary: int, probes: int | None = None) -> int:
        """UNet evaluations of a run over a vocabulary of this size, at most (both models, references
        included; fewer when null tokens are also candidates, or the vocabulary is smaller than stage 2)."""
        n2 = self.candidates + self.weight_candidates + self.null_tokens
        s1 = 2 * self.stage1_probes * (vocabulary + 1)
        s2 = 2 * self.stage2_seeds * self.stage2_probes * (n2 + 1)
        return s1 + s2


def blind_budget(vocabulary: int, scan: ScanSettings | None = None) -> int:
    """UNet evaluations of the blind scan (core/detect/scan.py) over a vocabulary of this size."""
    s = scan or ScanSettings()
    return (
        vocabulary * s.stage1_probes
        + s.stage1_probes
        + (s.candidates + s.null_tokens) * s.stage2_probes * s.stage2_seeds
        + s.stage2_probes * s.stage2_seeds
    )


@dataclass
class BehaviourToken:
    """One token stage 2 scored: stage-1 z, stage-2 z, its shared differential (fraction of |x0|) and its
    lift (the shared differential over the null sample's median)."""

    token_id: int
    text: str
    stage1_z: float
    score_z: float
    effect: float
    lift: float
    from_weights: bool = False
    flagged: bool = False


@dataclass
class BehaviourReport:
    """Stage-2 tokens (largest lift first), every token's stage-1 z, the thresholds, the null sample's median
    and largest shared differential (fractions of |x0|), and the cost."""

    tokens: list[BehaviourToken]
    stage1: dict[int, float]
    threshold_lift: float
    min_effect: float
    null_effect: float
    null_max_lift: float
    unet_evals: int

    @property
    def flagged(self) -> list[BehaviourToken]:
        """Tokens over the threshold, strongest first."""
        return [t for t in self.tokens if t.flagged]

    def order(self) -> list[int]:
        """Every scored id, stage 2 first (by lift), then the rest by stage 1."""
        first = [t.token_id for t in self.tokens]
        seen = set(first)
        return first + sorted((i for i in self.stage1 if i not in seen), key=lambda i: -self.stage1[i])


def template_rows(tokenizer, templates: Sequence[str]) -> list[list[list[int]]]:
    """Each template ('{}' marks a slot) as its pieces' token ids, without BOS / EOS."""
    out = []
    for template in templates:
        pieces = [p.strip() for p in template.split("{}")]
        out.append([tokenizer(p)["input_ids"][1:-1] if p else [] for p in pieces])
    return out


class BehaviourScan:
    """Both stages on a base probe and a suspect probe (ComfyProbe-like: `ScanProbe`); `progress(done, total)`
    and `check_interrupt()` let nodes show and stop it."""

    def __init__(
        self,
        base: ScanProbe,
        suspect: ScanProbe,
        templates: Sequence[str],
        settings: BehaviourSettings | None = None,
        progress: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.base, self.suspect = base, suspect
        self.settings = settings or BehaviourSettings()
        s = self.settings
        if len(templates) < max(s.stage1_probes, s.stage2_probes):
            raise ValueError(
                f"{max(s.stage1_probes, s.stage2_probes)} probe templates needed, got {len(templates)}"
            )
        self.pieces = template_rows(suspect.tokenizer, templates)
        self.progress = progress or (lambda done, total: None)
        self.check_interrupt = check_interrupt or (lambda: None)
        self.t = s.timestep(suspect.num_timesteps)
        self.unet_evals = 0
        self._references: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- rows and predictions
    def _row(self, probe: int, unit: Unit | None) -> list[int]:
        """BOS, the probe's pieces with the unit at every slot, EOS, padding (cut to the chunk length)."""
        p = self.suspect
        ids = [int(unit)] if isinstance(unit, int | np.integer) else [int(i) for i in (unit or [])]
        row = [p.bos]
        pieces = self.pieces[probe]
        for k, piece in enumerate(pieces):
            row += piece
            if k < len(pieces) - 1:
                row += ids
        row = row[: p.length - 1] + [p.eos]
        return row + [p.pad] * (p.length - len(row))

    def _noise(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.settings.seed * 1000 + seed)
        return torch.randn((1, *self.settings.latent_shape), generator=g)

    def _x0(self, probe: ScanProbe, rows: list[list[int]], noise: torch.Tensor) -> torch.Tensor:
        self.unet_evals += len(rows)
        return probe.x0(probe.encode_rows(rows), noise, self.t).flatten(1)

    def _reference(self, probe: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe's own x0 (no token) in the base and the suspect, for one noise draw."""
        if (probe, seed) not in self._references:
            row, noise = [self._row(probe, None)], self._noise(seed)
            self._references[probe, seed] = (
                self._x0(self.base, row, noise)[0],
                self._x0(self.suspect, row, noise)[0],
            )
        return self._references[probe, seed]

    def differential(
        self, probe: int, seed: int, units: Sequence[Unit]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per unit (N x D): change of the suspect's x0 minus change of the base's, the base's change, and the
        x0 scale (|x0| of the probe in the suspect)."""
        ref_b, ref_s = self._reference(probe, seed)
        noise = self._noise(seed)
        rows = [self._row(probe, u) for u in units]
        change_b = self._x0(self.base, rows, noise) - ref_b
        change_s = self._x0(self.suspect, rows, noise) - ref_s
        return change_s - change_b, change_b, ref_s.norm()

    # ---- the stages
    def stage1(self, vocab: list[int], tick: Callable[[int], None]) -> dict[str, np.ndarray]:
        """Per token, on the first probe(s): 'differential' |change_s - change_b|, 'relative' the same over
        the base's change (plus its median: an ordinary word moves both models alike), and 'suspect'
        |change_s| (what a blind scan sees; the base's stage 1 paid for it already)."""
        s = self.settings
        out = {k: np.zeros(len(vocab)) for k in ("differential", "relative", "suspect")}
        for p in range(s.stage1_probes):
            d_all, b_all, s_all = [], [], []
            for start in range(0, len(vocab), s.batch):
                self.check_interrupt()
                chunk = vocab[start : start + s.batch]
                d, change_b, _ = self.differential(p, p, chunk)
                d_all.append(d.norm(dim=1))
                b_all.append(change_b.norm(dim=1))
                s_all.append((d + change_b).norm(dim=1))
                tick(len(chunk))
            d_n, b_n, s_n = (torch.cat(x).numpy() for x in (d_all, b_all, s_all))
            out["differential"] += d_n
            out["relative"] += d_n / (b_n + np.median(b_n))
            out["suspect"] += s_n
        return {k: v / s.stage1_probes for k, v in out.items()}

    def stage2(self, units: Sequence[Unit], tick: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
        """Per unit: shared differential times the probes' agreement (the blind scan's stage-2 statistic, on
        the differential), and the shared differential as a fraction of |x0|."""
        s = self.settings
        n = s.stage2_probes
        score, effect = np.zeros(len(units)), np.zeros(len(units))
        for seed in range(s.stage2_seeds):
            total = torch.zeros(len(units), int(np.prod(s.latent_shape)))
            unit_sum = torch.zeros_like(total)
            scale = 0.0
            for p in range(n):
                self.check_interrupt()
                for start in range(0, len(units), s.batch):
                    chunk = units[start : start + s.batch]
                    d, _, x0_norm = self.differential(p, 100 + seed, chunk)
                    total[start : start + len(chunk)] += d
                    unit_sum[start : start + len(chunk)] += torch.nn.functional.normalize(d, dim=1)
                scale += float(x0_norm) / n
                tick(len(units))
            shared = (total / n).norm(dim=1)
            agreement = ((unit_sum.norm(dim=1) ** 2 - n) / (n * (n - 1))).clamp_min(0)
            score += (shared * agreement).numpy()
            effect += (shared / max(scale, 1e-12)).numpy()
        return score / s.stage2_seeds, effect / s.stage2_seeds

    def vocabulary(self) -> list[int]:
        """The ids scored: all but the special tokens (or the settings' explicit list)."""
        p = self.suspect
        special = {p.bos, p.eos, p.pad}
        ids = self.settings.token_ids or range(p.vocabulary_size())
        return [int(i) for i in ids if int(i) not in special]

    def run(self, weight_candidates: Sequence[int] = ()) -> BehaviourReport:
        """Stage 1 over the vocabulary; stage 2 over its best, the weight-space candidates and a null sample."""
        s = self.settings
        vocab = self.vocabulary()
        known = set(vocab)
        extra = [int(t) for t in weight_candidates if int(t) in known][: s.weight_candidates]
        extra_set = set(extra)
        stage2 = s.stage2_probes * s.stage2_seeds
        total = len(vocab) * s.stage1_probes + (s.candidates + len(extra) + s.null_tokens) * stage2
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            self.progress(min(done, total), total)

        z = {k: robust_z(v) for k, v in self.stage1(vocab, tick).items()}
        z1 = np.maximum.reduce(list(z.values()))
        # Candidates: the best of each stage-1 statistic in turn (each misses a kind the others catch).
        orders = [[vocab[k] for k in np.argsort(-v)] for v in z.values()]
        top: list[int] = []
        taken = set(extra)
        for row in zip(*orders, strict=True):
            for t in row:
                if t not in taken and len(top) < s.candidates:
                    top.append(t)
                    taken.add(t)
            if len(top) >= s.candidates:
                break
        chosen = top + extra
        chosen_set = set(chosen)
        # The null: what a typical token does (a uniform sample of the vocabulary; a sampled token that is
        # also a candidate is scored once).
        null = random.Random(s.seed).sample(vocab, min(s.null_tokens, len(vocab)))
        units = chosen + [t for t in null if t not in chosen_set]
        total = len(vocab) * s.stage1_probes + len(units) * stage2  # the bar ends where the work does
        score, effect = self.stage2(units, tick)
        z2 = robust_z(score)
        at = {t: j for j, t in enumerate(units)}
        null_effects = effect[[at[t] for t in null]]
        null_effect = float(np.median(null_effects)) if null else 0.0
        lift = effect / max(null_effect, 1e-12)
        index = {v: k for k, v in enumerate(vocab)}
        tokens = [
            BehaviourToken(
                token_id=t,
                text=self.suspect.token_text(t),
                stage1_z=float(z1[index[t]]),
                score_z=float(z2[j]),
                effect=float(effect[j]),
                lift=float(lift[j]),
                from_weights=t in extra_set,
                flagged=bool(lift[j] >= s.threshold_lift and effect[j] >= s.min_effect),
            )
            for j, t in enumerate(chosen)
        ]
        tokens.sort(key=lambda t: -t.lift)
        null_lift = null_effects / max(null_effect, 1e-12)
        return BehaviourReport(
            tokens=tokens,
            stage1={v: float(z1[k]) for k, v in enumerate(vocab)},
            threshold_lift=s.threshold_lift,
            min_effect=s.min_effect,
            null_effect=null_effect,
            null_max_lift=float(np.max(null_lift)) if len(null_lift) else float("nan"),
            unet_evals=self.unet_evals,
        )
