"""Detection reports on disk and as figures: JSON written atomically, bar charts as IMAGE tensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..plots import figure_to_image, new_figure
from ..tokens import readable


def write_json(path: str | os.PathLike, data: dict, overwrite: bool = False) -> Path:
    """Write JSON atomically; an existing file is refused unless overwrite (then replaced only once complete)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: give a new name (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the name appeared meanwhile
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def token_scores_image(report: dict) -> torch.Tensor:
    """A prompt report's per-token scores (UNet ratio and text hijack) as two bar charts."""
    tokens = report["tokens"]
    labels = [t["text"] for t in tokens]
    fig = new_figure(max(4.0, 0.45 * len(labels) + 1.5), 4.2)
    for row, (key, title) in enumerate(
        (("unet", "UNet change / embedding change"), ("hijack", "text hijack"))
    ):
        ax = fig.add_subplot(2, 1, row + 1)
        values = [t[key] for t in tokens]
        colours = ["#c0392b" if t["text"] == report["trigger_token"] else "#5d6d7e" for t in tokens]
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(values)), labels if row else [""] * len(values), rotation=60, fontsize=7)
        ax.set_ylabel(title, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    flagged = [k for k, v in report.get("flagged", {}).items() if v]
    verdict = f"TRIGGERED ({', '.join(flagged)}): {report['trigger_token']!r}" if flagged else "clean"
    fig.suptitle(f"{report['prompt'][:70]}\n{verdict}", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)


def scan_image(report: dict, top: int = 15) -> torch.Tensor:
    """A scan report's top candidates by stage-2 z-score, with the calibrated threshold drawn in."""
    cands = report["candidates"][:top]
    fig = new_figure(6.5, 0.28 * len(cands) + 1.4)
    ax = fig.add_subplot()
    names = [readable(c["text"]) or f"#{c['token_id']}" for c in cands][::-1]
    values = [c["score_z"] for c in cands][::-1]
    colours = ["#c0392b" if c["flagged"] else "#5d6d7e" for c in cands][::-1]
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    ax.axvline(report["threshold_z"], color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set_xlabel("shared x0 change x agreement, robust z (stage-2 tokens)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    verdict = (
        f"POISONED: trigger {readable(report['trigger'])!r}"
        if report.get("poisoned")
        else "no token above threshold"
    )
    ax.set_title(f"vocabulary scan ({report['scanned_tokens']} tokens): {verdict}", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)
