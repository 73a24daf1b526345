"""Detection reports as figures and text: per-token bar charts and the scan's ranking as IMAGE tensors."""

from __future__ import annotations

import torch

from ..plots import figure_to_image, new_figure
from ..tokens import readable


def verdict_line(report: dict) -> str:
    """A prompt report's headline: the prompt's verdict, then single detectors' flags as flags only
    (each detector alone has 5% false positives by design; the verdict needs more, see PromptReport)."""
    flagged = [k for k, v in report.get("flagged", {}).items() if v]
    verdict = f"TRIGGERED: {report['trigger_token']!r}" if report["poisoned"] else "clean"
    return f"{verdict} ({'flags: ' + ', '.join(flagged) if flagged else 'no detector flags it'})"


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
    fig.suptitle(f"{report['prompt'][:70]}\n{verdict_line(report)}", fontsize=8)
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


def token_scores_images(reports: list[dict]) -> torch.Tensor:
    """One chart per prompt report, padded with white to one size: an IMAGE batch (B x H x W x 3)."""
    return stacked([token_scores_image(r) for r in reports])


def stacked(images: list[torch.Tensor]) -> torch.Tensor:
    """1 x H x W x 3 IMAGEs of any sizes as one batch (B x H x W x 3), each padded with white."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    padded = torch.ones(len(images), h, w, 3)
    for k, i in enumerate(images):
        padded[k, : i.shape[1], : i.shape[2]] = i[0]
    return padded


def prompt_verdicts(reports: list[dict]) -> str:
    """One line per prompt report: its verdict and, when triggered, the trigger."""
    return "\n".join(
        f"{'TRIGGERED' if r['poisoned'] else 'clean'}: {r['prompt']}"
        + (f"  -> trigger {readable(r['trigger'])!r}" if r["poisoned"] else "")
        for r in reports
    )


def scan_summary(report: dict, top: int = 10) -> str:
    """The scan's verdict and its top candidates, one per line."""
    lines = "\n".join(
        f"{k + 1}. {readable(c['text'])!r} z={c['score_z']:.1f}{'  FLAGGED' if c['flagged'] else ''}"
        for k, c in enumerate(report["candidates"][:top])
    )
    head = (
        f"poisoned: trigger {readable(report['trigger'])!r}"
        if report["poisoned"]
        else "no token above threshold"
    )
    return f"{head}\n{lines}"
