"""The sanitize report as a chart: each candidate's firing rate before and after cleaning."""

from __future__ import annotations

import torch

from ..plots import figure_to_image, new_figure
from ..tokens import readable


def _label(candidate: dict) -> str:
    """The token as read, with the code points of anything beyond ASCII (a Cyrillic о looks Latin; many
    scripts have no glyph in the plot's font)."""
    text = candidate["readable"] or f"#{candidate['token_ids'][0]}"
    codes = " ".join(f"U+{ord(ch):04X}" for ch in candidate["text"] if not ch.isascii())
    return f"{text} ({codes})" if codes and codes not in text else text


def firing_image(report: dict) -> torch.Tensor:
    """Horizontal bars per tested candidate (a sanitize report's `to_json()`): its firing rate before
    (taken ones red, left-out grey) and after cleaning (blue), the rate a trigger needs dashed.
    Returns a 1 x H x W x 3 float image (ComfyUI IMAGE)."""
    cands = [c for c in report["candidates"] if c.get("before")]
    fig = new_figure(6.5, 0.32 * max(len(cands), 1) + 1.9)
    ax = fig.add_subplot()
    names = [_label(c) for c in cands][::-1]
    before = [c["before"]["rate"] for c in cands][::-1]
    after = [c["after"]["rate"] if c.get("after") else 0.0 for c in cands][::-1]
    colours = ["#c0392b" if c["taken"] else "#95a5a6" for c in cands][::-1]
    y = range(len(cands))
    ax.barh([k + 0.2 for k in y], before, height=0.4, color=colours, label="before")
    ax.barh([k - 0.2 for k in y], after, height=0.4, color="#2e86c1", label="after")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xlim(0, 1.05)
    ax.axvline(report.get("min_rate", 0.5), color="black", linestyle="--", linewidth=1, label="fires")
    ax.set_xlabel("share of probe prompts where the token fires", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    head = report["summary"].splitlines()[0]
    found = ", ".join(_label({"readable": readable(t), "text": t}) for t in report["found"]) or "none"
    ax.set_title(f"{head}\nunlearnt: {found}", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)
