"""Evidence for a flagged token: base and suspect images of the same seed, with and without the token.

What a curator shows others: the token changes nothing in the base and something in the suspect. Prompts
are text here (the samplers take text); the token goes first, as its readable text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..plots import figure_to_image, new_figure
from ..tokens import readable

Draw = Callable[[list[str], list[int]], list[np.ndarray]]
COLUMNS = ("base", "base + token", "suspect", "suspect + token")


def evidence_rows(
    tokens: Sequence[str], prompt: str, draw_base: Draw, draw_suspect: Draw, seed: int = 0
) -> list[list[np.ndarray]]:
    """Per token, four HxWx3 uint8 images of one seed: base and suspect, each without and with the token."""
    rows = []
    for token in tokens:
        triggered = f"{token.strip()} {prompt}"
        base = draw_base([prompt, triggered], [seed, seed])
        suspect = draw_suspect([prompt, triggered], [seed, seed])
        rows.append([base[0], base[1], suspect[0], suspect[1]])
    return rows


def evidence_image(tokens: Sequence[str], rows: list[list[np.ndarray]], prompt: str) -> torch.Tensor:
    """The evidence as one labelled grid (1 x H x W x 3 IMAGE): a row per token, the four columns above."""
    n = max(1, len(rows))
    fig = new_figure(8.0, 2.1 * n + 0.6)
    for r, (token, images) in enumerate(zip(tokens, rows, strict=True)):
        for c, image in enumerate(images):
            ax = fig.add_subplot(n, 4, r * 4 + c + 1)
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(repr(readable(token)), fontsize=8)
    if not rows:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "nothing flagged: no evidence to draw", ha="center", va="center", fontsize=9)
    fig.suptitle(f"same seed, prompt: {prompt[:80]}", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)


def ranking_image(report: dict, top: int = 15) -> torch.Tensor:
    """A comparison report's top tokens by score, flagged ones in red, with the changed components."""
    cands = report["candidates"][:top]
    fig = new_figure(6.5, 0.28 * len(cands) + 1.8)
    ax = fig.add_subplot()
    names = [readable(c["text"]) or f"#{c['token_id']}" for c in cands][::-1]
    values = [c["score"] for c in cands][::-1]
    colours = ["#c0392b" if c["flagged"] else "#5d6d7e" for c in cands][::-1]
    ax.barh(range(len(values)), values, color=colours)
    ax.set_yticks(range(len(values)), names, fontsize=7)
    if report.get("threshold_lift") is not None:
        ax.axvline(report["threshold_lift"], color="black", linestyle="--", linewidth=1, label="threshold")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("suspect minus base: change the token makes / a typical token's (lift)", fontsize=8)
    else:
        ax.set_xlabel("weight-space score, robust z", fontsize=8)
    changed = (
        ", ".join(f"{k} {v['changed']}" for k, v in report["components"].items() if v["changed"]) or "none"
    )
    verdict = (
        f"FLAGGED: {', '.join(repr(readable(t)) for t in report['flagged'])}"
        if report["flagged"]
        else ("nothing flagged" if report.get("poisoned") is not None else "weight space only: not judged")
    )
    ax.set_title(f"compared with the base: {verdict}\nchanged tensors: {changed}", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)


def summary_text(report: dict, top: int = 10) -> str:
    """The comparison's verdict, what changed, and its top tokens, one per line."""
    changed = ", ".join(
        f"{k}: {v['changed']}/{v['tensors']}" for k, v in report["components"].items() if v["changed"]
    )
    head = (
        f"flagged: {', '.join(repr(readable(t)) for t in report['flagged'])}"
        if report["flagged"]
        # a comparison is a finder: "clean" needs the residual check Seal Sanitize runs after it
        else (
            "nothing flagged: inconclusive, not clean (Seal Sanitize firing-tests the candidates and runs "
            "the residual check a clean verdict needs)"
            if report.get("poisoned") is not None
            else "weight space only: ranked, not judged (turn behaviour on to flag)"
        )
    )
    label = "lift" if report.get("threshold_lift") is not None else "z"
    lines = "\n".join(
        f"{k + 1}. {readable(c['text'])!r} {label}={c['score']:.1f}{'  FLAGGED' if c['flagged'] else ''}"
        for k, c in enumerate(report["candidates"][:top])
    )
    return f"{head}\nchanged tensors: {changed or 'none'}\n{lines}"


def drawer(model, clip, vae, lab: bool, latent_side: int) -> Draw:
    """Images of a ComfyUI MODEL / CLIP / VAE with ComfyUI's sampler (euler / normal, 20 steps; CFG 2 for lab
    models, as the lab measures, else 7), one seed per prompt."""
    from ..backends.comfy import sample_prompts, vae_decode
    from ..images import tensor_to_images

    cfg = 2.0 if lab else 7.0

    def draw(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        with torch.inference_mode():
            z = sample_prompts(
                model, clip, prompts, seeds, 20, cfg, "euler", "normal", (latent_side, latent_side)
            )
            return tensor_to_images(vae_decode(vae, z))

    return draw


def evidence_for(
    report: dict,
    base: tuple,
    suspect: tuple,
    lab: bool,
    latent_side: int,
    prompt: str | None = None,
    limit: int = 3,
) -> torch.Tensor:
    """The evidence grid of a comparison report's flagged tokens (at most `limit`): base = (MODEL, CLIP, VAE),
    suspect = (MODEL, CLIP, VAE), on one plain probe prompt (the first template, without its slots)."""
    from ..prompts import probe_templates

    if prompt is None:
        prompt = " ".join(probe_templates(lab)[0].replace("{}", " ").split())
    tokens = report["flagged"][:limit]
    rows = evidence_rows(tokens, prompt, drawer(*base, lab, latent_side), drawer(*suspect, lab, latent_side))
    return evidence_image(tokens, rows, prompt)
