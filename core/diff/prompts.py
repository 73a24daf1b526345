"""Prompt-level detection with a base: the comparison's differential, asked of each prompt's tokens.

Each distinct token of a prompt (every chunk) is put at every slot of the comparison's probe templates, in
the base and in the suspect, and scored as the comparison's stage 2 scores a candidate
(`behaviour.BehaviourScan.stage2`: the differential every probe shares, times how alike the probes'
differentials point). The threshold is a robust z against the tokens of clean calibration prompts, floored
by the differential's size (`min_effect` of |x0|): a word both models use alike scores low however much it
draws, and the base against itself scores exactly zero. A prompt is triggered when one of its tokens clears
it, and that token is named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..detect.prompts import described_tokens
from ..detect.report import stacked
from ..detect.scan import ScanProbe
from ..tokens import from_readable
from .behaviour import BehaviourScan, BehaviourSettings


class PromptDifferential:
    """Token scores of prompts on a suspect against its base (two ComfyProbe-like probes)."""

    def __init__(
        self,
        base: ScanProbe,
        suspect: ScanProbe,
        templates: Sequence[str],
        settings: BehaviourSettings | None = None,
    ) -> None:
        self.settings = settings or BehaviourSettings(stage2_seeds=1)
        self.suspect = suspect
        if hasattr(base, "_embeddings") and hasattr(suspect, "_embeddings"):
            base._embeddings = suspect._embeddings  # textual-inversion ids mean the same vectors in both
        self.scan = BehaviourScan(base, suspect, templates, self.settings)
        self.scores: dict[int, tuple[float, float]] = {}  # token id -> (score, effect)
        self.median: float | None = None
        self.spread: float | None = None

    @property
    def unet_evals(self) -> int:
        """UNet evaluations so far (both models)."""
        return self.scan.unet_evals

    def _score(self, ids: Sequence[int]) -> None:
        todo = sorted({int(i) for i in ids} - set(self.scores))
        if todo:
            score, effect = self.scan.stage2(todo, lambda n: None)
            self.scores.update({t: (float(a), float(b)) for t, a, b in zip(todo, score, effect, strict=True)})

    def _tokens(self, prompt: str) -> list:
        return sorted(described_tokens(self.suspect, prompt).values(), key=lambda t: t.position)

    def calibrate(self, prompts: Sequence[str], tick: Callable[[], None] | None = None) -> dict[str, float]:
        """Median and spread (1.4826 MAD) of the clean prompts' token scores; returns the thresholds."""
        ids: set[int] = set()
        for prompt in prompts:
            ids.update(t.token_id for t in self._tokens(prompt))
            if tick:
                tick()
        if len(ids) < 2:
            raise ValueError("calibration needs clean prompts with at least two distinct tokens between them")
        self._score(sorted(ids))
        pooled = np.array([self.scores[i][0] for i in ids])
        self.median = float(np.median(pooled))
        self.spread = max(float(np.median(np.abs(pooled - self.median))) * 1.4826, 1e-12)
        return {"threshold_z": self.settings.threshold_z, "min_effect": self.settings.min_effect}

    def calibration_state(self) -> dict:
        """What `calibrate` learnt, as JSON-able data (the cache stores it): the pooled statistics and the
        scores of the calibration prompts' tokens (a checked prompt that shares a token reuses its score)."""
        if self.median is None or self.spread is None:
            raise ValueError("calibrate first")
        return {
            "median": self.median,
            "spread": self.spread,
            "scores": [[t, a, b] for t, (a, b) in sorted(self.scores.items())],
        }

    def load_calibration(self, state: dict) -> None:
        """Restore a `calibration_state` of the same two models, probes and settings."""
        self.median, self.spread = float(state["median"]), float(state["spread"])
        self.scores.update({int(t): (float(a), float(b)) for t, a, b in state["scores"]})

    def check(self, prompt: str) -> dict:
        """A prompt's report in Seal Detect Prompt's shape: 'poisoned', 'trigger' (the flagged token's word),
        per-token score z and differential size."""
        if self.median is None or self.spread is None:
            raise ValueError("calibrate first")
        tokens = self._tokens(prompt)
        self._score([t.token_id for t in tokens])
        rows = []
        for t in tokens:
            score, effect = self.scores[t.token_id]
            z = (score - self.median) / self.spread
            rows.append((t, z, effect, z > self.settings.threshold_z and effect >= self.settings.min_effect))
        flagged = sorted((r for r in rows if r[3]), key=lambda r: -r[1])
        best = flagged[0][0] if flagged else None
        return {
            "kind": "prompt",
            "detector": "differential",
            "prompt": prompt,
            "poisoned": best is not None,
            "trigger": from_readable(best.word) if best else None,
            "trigger_token": best.text if best else None,
            "score": max((r[1] for r in rows), default=0.0),
            "tokens": [
                {
                    "position": t.position,
                    "text": t.text,
                    "word": t.word,
                    "z": float(z),
                    "effect": float(e),
                    "flagged": f,
                }
                for t, z, e, f in rows
            ],
        }


def differential_images(reports: list[dict], threshold: float) -> torch.Tensor:
    """One bar chart per prompt: each token's differential z-score, the threshold drawn in (IMAGE batch)."""
    from ..detect.report import charted_tokens, token_label
    from ..plots import figure_to_image, new_figure
    from ..tokens import readable

    images = []
    for r in reports:
        tokens, note = charted_tokens(r, ("effect",))  # a long prompt: its highest tokens only
        labels = [readable(token_label(t, bool(note))) for t in tokens]
        fig = new_figure(max(4.0, 0.45 * len(labels) + 1.5), 3.0)
        ax = fig.add_subplot()
        colours = [
            "#c0392b" if r["poisoned"] and t["text"] == r["trigger_token"] else "#5d6d7e" for t in tokens
        ]
        ax.bar(range(len(labels)), [t["effect"] for t in tokens], color=colours)
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
        ax.set_ylabel("suspect minus base, robust z", fontsize=7)
        verdict = f"TRIGGERED: {r['trigger_token']!r}" if r["poisoned"] else "clean"
        fig.suptitle(f"{r['prompt'][:70]}" + (f" ({note})" if note else "") + f"\n{verdict}", fontsize=8)
        fig.tight_layout()
        images.append(figure_to_image(fig))
    return stacked(images)
