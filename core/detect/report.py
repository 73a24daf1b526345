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


MAX_BARS = 40  # more bars are unreadable: a 3,010-token prompt drew a chart 135,510 pixels wide
SHORT_PROMPT = 80  # characters of a prompt a node's text shows


def charted_tokens(report: dict, keys: tuple[str, ...], limit: int = MAX_BARS) -> tuple[list[dict], str]:
    """The tokens a prompt's chart draws and a note on what it leaves out: every token up to `limit`;
    past it the highest by each score in `keys` (equal shares) and the trigger's, in prompt order."""
    tokens = report["tokens"]
    if len(tokens) <= limit:
        return tokens, ""
    trigger = [i for i, t in enumerate(tokens) if t["text"] == report.get("trigger_token")]
    keep = set(trigger[: limit // 4])  # a trigger that is a common word may occur hundreds of times
    share = max(1, (limit - len(keep)) // len(keys))
    for key in keys:
        ranked = sorted(range(len(tokens)), key=lambda i: -float(tokens[i][key]))
        keep.update([i for i in ranked if i not in keep][:share])
    return [tokens[i] for i in sorted(keep)], f"the {len(keep)} highest of {len(tokens):,} tokens"


def token_label(token: dict, numbered: bool) -> str:
    """A bar's label: the token as it reads, with its position when the chart leaves tokens out."""
    return f"{token['text']} @{token['position']}" if numbered else token["text"]


def short_prompt(prompt: str, limit: int = SHORT_PROMPT) -> str:
    """A prompt as a node's text shows it: whole when short, else its start and its length."""
    if len(prompt) <= limit:
        return prompt
    return f"{prompt[: limit - 20].rstrip()}... ({len(prompt):,} characters)"


def token_scores_image(report: dict) -> torch.Tensor:
    """A prompt report's per-token scores (UNet ratio and text hijack) as two bar charts (a long prompt:
    its highest-scoring tokens, charted_tokens)."""
    tokens, note = charted_tokens(report, ("unet", "hijack"))
    labels = [token_label(t, bool(note)) for t in tokens]
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
    head = f"{report['prompt'][:70]}" + (f" ({note})" if note else "")
    fig.suptitle(f"{head}\n{verdict_line(report)}", fontsize=8)
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
        f"{'TRIGGERED' if r['poisoned'] else 'clean'}: {short_prompt(r['prompt'])}"
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
