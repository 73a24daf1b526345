"""Which triggers to unlearn: a report's flagged tokens and best candidates, taken when they fire.

The order of a report is not evidence. Every flagged token of a scan or comparison report and the next
best of its ranking (`top`) are measured with the firing test (`firing.FiringTest`); the ones that fire
are the set, each with the placement it fired at. The rest are kept in the record with the reason they
were left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..tokens import readable
from .firing import Firing, FiringTest


@dataclass
class Candidate:
    """One token a report ranks, and what the firing test measured of it (before and after cleaning)."""

    text: str
    token_ids: list[int]
    rank: int  # 1-based, in the report's ranking
    flagged: bool
    score: float | None  # the report's own score (lift, or robust z)
    before: Firing | None = None
    after: Firing | None = None
    before_min: float = 0.5  # the firing rate a trigger needs (the test's min_rate)

    @property
    def taken(self) -> bool:
        """Fires when tested: it enters the set to unlearn."""
        return self.before is not None and self.before.fires

    def reason(self) -> str:
        """Why it was taken or left out, in words."""
        by = f"flagged by the report (rank {self.rank})" if self.flagged else f"ranked {self.rank}"
        if self.before is None:
            return f"{by}; not tested"
        rate = f"fired on {self.before.rate:.0%} of the probes ({self.before.placement})"
        if self.taken:
            return f"{by}; {rate}"
        return f"{by}; left out: {rate}, under the {self.before_min:.0%} a trigger needs"

    def to_json(self) -> dict[str, Any]:
        """Plain-data form for reports."""
        return {
            "text": self.text,
            "readable": readable(self.text),
            "token_ids": self.token_ids,
            "rank": self.rank,
            "flagged": self.flagged,
            "score": self.score,
            "taken": self.taken,
            "reason": self.reason(),
            "before": self.before.to_json() if self.before else None,
            "after": self.after.to_json() if self.after else None,
        }


def report_candidates(report: dict, top: int = 5, tokenizer=None) -> list[Candidate]:
    """Every flagged candidate of a scan or comparison report (`kind` "scan" or "diff"), then the best of the
    rest up to `top` more. A candidate is its id sequence (`token_ids`; a report of single ids: `token_id`);
    the same sequence (or text) twice is one candidate. With the model's `tokenizer`, each text is checked to encode
    to exactly its ids (rebuilt from the ids where it does not: `tokens.sequence_text`), and a sequence no
    prompt can hold is left out. Raises ValueError for another report, or ids outside the vocabulary."""
    from ..tokens import sequence_text

    if not isinstance(report, dict) or report.get("kind") not in ("scan", "diff"):
        raise ValueError(
            "choosing triggers needs a vocabulary scan or a comparison report (nodes Seal Scan Model, Seal "
            "Compare Models or Seal Compare LoRA; commands scan or diff), not a prompt report, which names "
            "tokens of its own prompts only; or give no report and let sanitize find them"
        )
    size = len(tokenizer.get_vocab()) if tokenizer is not None else None
    out: dict[tuple[int, ...], Candidate] = {}
    extra = 0
    for rank, entry in enumerate(report.get("candidates") or [], start=1):
        ids = tuple(int(i) for i in (entry.get("token_ids") or [entry["token_id"]]))
        if size is not None and any(not 0 <= i < size for i in ids):
            bad = next(i for i in ids if not 0 <= i < size)
            raise ValueError(
                f"the report names token id {bad}, outside this model's vocabulary of {size}: it was made "
                "for another model"
            )
        text = str(entry.get("text") or "")
        if tokenizer is not None:
            text = sequence_text(tokenizer, ids) or ""
        if not text.strip() or ids in out or any(c.text == text for c in out.values()):
            continue
        flagged = bool(entry.get("flagged"))
        if not flagged:
            if extra >= top:
                continue
            extra += 1
        score = entry.get("score", entry.get("score_z"))
        out[ids] = Candidate(text, list(ids), rank, flagged, score)
    return list(out.values())


def measure(candidates: list[Candidate], test: FiringTest, after: bool = False) -> list[Candidate]:
    """Fill each candidate's firing (before cleaning, or `after`); returns the same list."""
    for c in candidates:
        firing = test.measure(c.text)
        if after:
            c.after = firing
        else:
            c.before = firing
        c.before_min = test.settings.min_rate
    return candidates
