"""Input-level detection: is this prompt triggering a backdoor, and which token is the trigger?

The detectors, each with a per-model threshold calibrated on clean prompts (stored as JSON):

- `masking-unet` (NaviT2I): the prompt's most reactive token, UNet change over embedding change.
- `masking-text`: the prompt's most hijacking token (how much the OTHER words' embeddings change when
  it is masked) over the prompt's median token: a text-encoder backdoor rewrites the whole prompt.
- `ftt` (T2IShield): assimilation of the cross-attention maps over a full sampling; a LOW FTT means
  the trigger has made every token's map alike, so the score is -FTT.
- `transplant`: each of the prompt's tokens is put in front of clean probe prompts (one batched step
  per probe); the score is the x0 change the probes share times how alike they point (the scan's
  second stage). A backdoor's target does not depend on the prompt; an ordinary word's effect does.
- `scan` (optional): the strongest blind-scan z-score among the prompt's tokens; a lookup, no UNet call.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..safetensors_io import write_json
from ..tokens import PromptToken, from_readable, prompt_tokens, readable
from .masking import MaskingSettings, ProbeModel, TokenScores, score_prompt

CALIBRATION_QUANTILE = 0.95  # a threshold at the clean prompts' 95th percentile: 5% false positives by design


def masking_signals(scores: TokenScores) -> dict[str, float]:
    """The prompt-level statistics of the masking detector."""
    text = scores.text
    return {
        "masking-unet": float(scores.unet.max()),
        "masking-text": float(text.max() / text.median().clamp_min(1e-9)),
    }


def transplant_scores(scanner, units: Sequence[int | Sequence[int]]) -> np.ndarray:
    """Per token or run of tokens (a word, an embedding: put in together): shared x0 change x agreement
    over the scanner's clean probes (VocabularyScanner.stage2)."""
    return scanner.stage2(list(units), lambda n: None)


def ftt_statistic(maps: torch.Tensor) -> float:
    """T2IShield's FTT: mean Frobenius distance of each token's (sum-normalised) map to the mean map."""
    m = maps / maps.flatten(1).sum(1).view(-1, 1, 1).clamp_min(1e-9)
    return float((m - m.mean(0, keepdim=True)).flatten(1).norm(dim=1).mean())


def ftt_scores(
    backend, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, cfg: float = 2.0
) -> list[float]:
    """-FTT per prompt from one full sampling with cross-attention capture (backend: ComfyBackend)."""
    from ..attention import CaptureSettings, capture

    _, maps = capture(
        backend, list(prompts), list(seeds), CaptureSettings(resolution=8), steps=steps, cfg=cfg
    )
    combined = maps.combined()
    out = []
    for b, labels in enumerate(maps.labels):
        content = [i for i, label in enumerate(labels) if not label.startswith("<") and i < combined.shape[1]]
        out.append(-ftt_statistic(combined[b, content]) if content else 0.0)
    return out


@dataclass
class Calibration:
    """Per-detector thresholds of one model, from its scores on clean prompts."""

    model: str
    thresholds: dict[str, float]
    clean_scores: dict[str, list[float]]
    quantile: float = CALIBRATION_QUANTILE

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (never pickle); an existing file is replaced only once the new one is complete."""
        return write_json(path, asdict(self), overwrite=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a calibration written by save()."""
        data = json.loads(Path(path).read_text())
        return cls(**data)

    def flags(self, scores: dict[str, float]) -> dict[str, bool]:
        """Which detectors call these prompt scores triggered."""
        return {k: v > self.thresholds[k] for k, v in scores.items() if k in self.thresholds}


def transplant_scanner(
    probe, probe_prompts: Sequence[str], latent_shape: tuple[int, int, int], probes: int = 8
):
    """The VocabularyScanner whose second stage the transplant detector runs (one noise draw, `probes` probes)."""
    from .scan import ScanSettings, VocabularyScanner

    settings = ScanSettings(stage1_probes=1, stage2_probes=probes, stage2_seeds=1, latent_shape=latent_shape)
    return VocabularyScanner(probe, probe_prompts, settings)


def calibrate_on(
    probe,
    prompts: Sequence[str],
    settings: MaskingSettings,
    transplant=None,
    name: str = "MODEL",
    progress=None,
) -> Calibration:
    """Score clean prompts with every input-level detector and calibrate the thresholds on them."""
    scores = []
    for p in prompts:
        scores.append(detect_prompt(probe, p, None, settings, transplant=transplant).scores)
        if progress:
            progress()
    return calibrate(name, {k: [s[k] for s in scores] for k in scores[0]})


def calibrate(
    model_name: str, clean_scores: dict[str, list[float]], quantile: float = CALIBRATION_QUANTILE
) -> Calibration:
    """Thresholds at a quantile of each detector's scores on clean prompts."""
    thresholds = {k: float(np.quantile(v, quantile)) for k, v in clean_scores.items() if len(v)}
    return Calibration(
        model_name, thresholds, {k: list(map(float, v)) for k, v in clean_scores.items()}, quantile
    )


def _triggered(flagged: dict[str, bool]) -> bool:
    return bool(flagged.get("transplant")) or sum(map(bool, flagged.values())) >= 2


def _chunk_scores(
    scores: TokenScores, moved: np.ndarray | None, scan_scores: dict[int, float] | None, length: int
) -> list[tuple[int, dict[str, float]]]:
    """(chunk, prompt-level statistics of that chunk's tokens) for every chunk holding tokens, in order;
    positions count over the concatenation (chunk * length + index)."""
    out = []
    for chunk in sorted({p // length for p in scores.positions}):
        idx = [k for k, p in enumerate(scores.positions) if p // length == chunk]
        part = TokenScores(
            scores.prompt,
            [scores.positions[k] for k in idx],
            [scores.ids[k] for k in idx],
            scores.unet[idx],
            scores.text[idx],
        )
        signals = masking_signals(part)
        if moved is not None:
            signals["transplant"] = float(moved[idx].max())
        if scan_scores is not None:
            signals["scan"] = max(scan_scores.get(i, 0.0) for i in part.ids)
        out.append((chunk, signals))
    return out


@dataclass
class TokenVerdict:
    """One prompt token: its readable text, the word it belongs to and its detector scores."""

    position: int
    token_id: int
    text: str
    word: str
    unet: float
    hijack: float
    transplant: float | None = None


@dataclass
class PromptReport:
    """A prompt's detector scores, flags, per-token scores and the most likely trigger token and word."""

    prompt: str
    scores: dict[str, float]
    flagged: dict[str, bool]
    tokens: list[TokenVerdict]
    trigger_token: str
    trigger_word: str
    localised_by: str

    @property
    def triggered(self) -> bool:
        """The verdict: the transplant detector flags it, or two detectors agree (each alone is 5% FPR by design)."""
        return _triggered(self.flagged)

    def to_dict(self) -> dict:
        """JSON-ready, the shape the nodes pass on: `trigger` (the trigger's word), `trigger_token` and
        `localised_by` only for a prompt judged triggered; the per-token scores always."""
        d = asdict(self)
        d["kind"] = "prompt"
        d["poisoned"] = self.triggered
        d["trigger"] = from_readable(self.trigger_word) if d["poisoned"] else None
        if not d["poisoned"]:
            d.update(trigger_token=None, trigger_word=None, localised_by=None)
        return d


def most_supported_trigger(reports: Sequence[dict]) -> str | None:
    """The trigger the most flagged prompt reports name (ties: the first named); None if none is flagged.
    Not the first flagged prompt's: order is not evidence."""
    support = Counter(r["trigger"] for r in reports if r["poisoned"])
    return support.most_common(1)[0][0] if support else None


def prompt_set_report(reports: Sequence[dict], calibration: Calibration) -> dict:
    """The report of several prompts (what Seal Detect Prompt passes on): poisoned if any prompt is; its
    `trigger` is the one the most flagged prompts name (`most_supported_trigger`)."""
    return {
        "kind": "prompt",
        "poisoned": any(r["poisoned"] for r in reports),
        "trigger": most_supported_trigger(reports),
        "thresholds": calibration.thresholds,
        "prompts": list(reports),
    }


def described_tokens(probe, prompt: str, tokenizer=None) -> dict[int, PromptToken]:
    """Position -> the prompt's token as the model sees it (its word, readable text), from the probe's own
    tokenization (ComfyUI's: emphasis parsed, every chunk, embeddings), else from `tokenizer` over the
    probe's chunks; empty when neither can spell the tokens."""
    if hasattr(probe, "prompt_tokens"):
        found = probe.prompt_tokens(prompt)
    else:
        tokenizer = tokenizer or getattr(probe, "tokenizer", None)
        if tokenizer is None:
            return {}
        found = prompt_tokens(tokenizer, probe.token_chunks(prompt), probe.bos, probe.eos)
    return {t.position: t for t in found}


def detect_prompt(
    probe: ProbeModel,
    prompt: str,
    calibration: Calibration | None = None,
    settings: MaskingSettings | None = None,
    scan_scores: dict[int, float] | None = None,
    tokenizer=None,
    transplant=None,
) -> PromptReport:
    """Score one prompt (masking; transplant when given a VocabularyScanner; the scan lookup when given
    its scores), flag it against the calibration and localise the trigger token.

    Each chunk of a long prompt is judged alone: the report's scores and flags are those of the chunk with
    the strongest evidence (triggered first, then most flags, then the earliest), and the trigger token is
    named from that chunk. Without a calibration the scores are each detector's strongest chunk."""
    token_scores = score_prompt(probe, prompt, settings)
    described = described_tokens(probe, prompt, tokenizer)
    # The transplant detector moves whole words (a multi-piece trigger, a homoglyph merged into a word, a
    # CJK character's byte pieces, an embedding's vectors): a lone byte piece is no text a prompt holds.
    unit_of = [described[p].unit if p in described else -1 - k for k, p in enumerate(token_scores.positions)]
    units: dict[int, list[int]] = {}
    for k, u in enumerate(unit_of):
        units.setdefault(u, []).append(token_scores.ids[k])
    moved = None
    if transplant is not None:
        raw = transplant_scores(transplant, list(units.values()))
        # A run of n tokens displaces n of the probe's tokens, and n ordinary shifts add up to about sqrt(n)
        # of one: on one token's scale, a clean CJK sentence (24 byte pieces, measured 2.68 raw on
        # lab-pixel against a 2.51 threshold) is ordinary, a homoglyph word (2 pieces) still stands out.
        sizes = np.sqrt([len(ids) for ids in units.values()])
        per_unit = dict(zip(units, raw / sizes, strict=True))
        moved = np.array([per_unit[u] for u in unit_of])
    # Each chunk is judged on its own: a masked token changes only its chunk's rows, and detectors that
    # flag different chunks are no agreement (a long clean prompt's short second chunk would otherwise
    # lend its first token to the first chunk's evidence; a chunk boundary is not evidence).
    length = len(probe.token_chunks(prompt)[0])
    per_chunk = _chunk_scores(token_scores, moved, scan_scores, length)
    if calibration is None:  # a clean prompt's scores: each detector's strongest chunk
        chunk = None
        scores = {k: max(c[1][k] for c in per_chunk) for k in per_chunk[0][1]}
        flagged: dict[str, bool] = {}
    else:
        judged = [(c, calibration.flags(s)) for c, s in per_chunk]
        chunk, flagged = max(
            judged, key=lambda cf: (_triggered(cf[1]), sum(map(bool, cf[1].values())), -cf[0])
        )
        scores = dict(per_chunk)[chunk]
    members = [k for k, pos in enumerate(token_scores.positions) if chunk is None or pos // length == chunk]
    # Each signal blames its own strongest token; the first flagged one in this order names the trigger.
    blame = {"transplant": moved}
    if scan_scores is not None:
        blame["scan"] = np.array([scan_scores.get(i, -np.inf) for i in token_scores.ids])
    blame.update({"masking-text": token_scores.text.numpy(), "masking-unet": token_scores.unet.numpy()})
    signal = next(
        (k for k, v in blame.items() if v is not None and flagged.get(k)),
        "transplant" if moved is not None else "masking-unet",
    )
    best = members[int(np.argmax(blame[signal][members]))]
    tokens = []
    for k, pos in enumerate(token_scores.positions):
        t = described.get(pos)
        text, word = (t.text, t.word) if t else (str(token_scores.ids[k]),) * 2
        tokens.append(
            TokenVerdict(
                pos,
                token_scores.ids[k],
                text,
                word,
                float(token_scores.unet[k]),
                float(token_scores.text[k]),
                None if moved is None else float(moved[k]),
            )
        )
    return PromptReport(
        prompt=readable(prompt),
        scores=scores,
        flagged=flagged,
        tokens=tokens,
        trigger_token=tokens[best].text,
        trigger_word=tokens[best].word,
        localised_by=signal,
    )
