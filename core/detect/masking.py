"""Token masking in the manner of NaviT2I: how much does the UNet react when one token is masked?

For a prompt, every content token is masked in turn (replaced by the padding token) and the prompt
and all its masked variants go through ONE denoising step as one batch. A trigger token moves the
UNet far more than its share of the text embedding explains: the per-layer change of the cross-
attention outputs, divided by the change of the text embedding, is the token's UNet score. A
text-encoder backdoor (Rickrolling) instead hijacks the other tokens' embeddings: how much the
rest of the context changes when the token is masked is its text score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class ProbeModel(Protocol):
    """What the masking detector needs (core/backends/comfy_probe.ComfyProbe is one)."""

    bos: int
    eos: int
    pad: int
    num_timesteps: int

    def token_ids(self, prompt: str) -> list[int]:
        """First-chunk ids, BOS first, padded."""
        ...

    def token_chunks(self, prompt: str) -> list[list[int]]:
        """Every chunk's ids, each BOS first and padded (the model encodes each alone and concatenates)."""
        ...

    def encode_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """Contexts (B x length x C) for explicit id sequences (one chunk each)."""
        ...

    def step(
        self, context: torch.Tensor, noise: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eps and each cross-attention block's output for one denoising step."""
        ...


@dataclass
class MaskingSettings:
    """One step at timestep `t_fraction` of the schedule from `seeds` noise draws (scores averaged)."""

    t_fraction: float = 0.9
    seeds: tuple[int, ...] = (0,)
    latent_shape: tuple[int, int, int] = (4, 8, 8)
    group: int = 32  # variants per UNet call

    def timestep(self, num_timesteps: int) -> int:
        """The integer timestep probed."""
        return min(num_timesteps - 1, max(0, round(self.t_fraction * (num_timesteps - 1))))


@dataclass
class TokenScores:
    """Per content token of one prompt: its UNet score (layer change / embedding change) and text score."""

    prompt: str
    positions: list[int]
    ids: list[int]
    unet: torch.Tensor  # (n,)
    text: torch.Tensor  # (n,)
    extra: dict = field(default_factory=dict)


def content_end(ids: list[int], eos: int) -> int:
    """Position of the first EOS after BOS (the row's length when there is none)."""
    return ids.index(eos, 1) if eos in ids[1:] else len(ids)


def content_positions(ids: list[int], bos: int, eos: int) -> list[int]:
    """Positions of the prompt's own tokens (after BOS, before the first EOS)."""
    return [i for i in range(1, content_end(ids, eos)) if ids[i] != bos]


def masked_variants(ids: list[int], positions: list[int], pad: int) -> list[list[int]]:
    """The prompt itself, then one copy per position with that token replaced by padding."""
    rows = [list(ids)]
    for p in positions:
        row = list(ids)
        row[p] = pad
        rows.append(row)
    return rows


def relative_change(reference: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
    """||variant - reference|| / ||reference|| per variant (norms over every non-batch dim)."""
    diff = (variants - reference.unsqueeze(0)).flatten(1).norm(dim=1)
    return diff / reference.flatten().norm().clamp_min(1e-12)


def text_hijack(context: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Per masked token: how much the OTHER positions' embeddings change (context: (1 + n) x L x C)."""
    ref, var = context[0], context[1:]
    out = []
    for k, p in enumerate(positions):
        keep = torch.ones(ref.shape[0], dtype=torch.bool)
        keep[0] = False  # BOS never changes
        keep[p] = False
        out.append(relative_change(ref[keep], var[k : k + 1, keep])[0])
    return torch.stack(out)


def score_prompt(probe: ProbeModel, prompt: str, settings: MaskingSettings | None = None) -> TokenScores:
    """Mask every content token of every chunk of the prompt and score each (groups of variants per UNet call).

    ComfyUI encodes each chunk (BOS ... EOS) on its own and concatenates them along the sequence, so a
    masked token changes only its own chunk's rows: the UNet sees the whole concatenated context with
    that chunk swapped, the text score looks at the other tokens of the same chunk. Positions count over
    the concatenation (chunk * chunk length + index)."""
    settings = settings or MaskingSettings()
    chunks = probe.token_chunks(prompt)
    length = len(chunks[0])
    per_chunk = [content_positions(row, probe.bos, probe.eos) for row in chunks]
    if not any(per_chunk):
        raise ValueError(f"prompt {prompt!r} has no tokens to mask")
    encoded = [
        probe.encode_rows(masked_variants(row, pos, probe.pad))
        for row, pos in zip(chunks, per_chunk, strict=True)
    ]
    # Rows past a chunk's tokens (SDXL: the pooled embedding the probe packs last) follow the joined
    # tokens once, from the first chunk, as ComfyUI pools a prompt from its first chunk.
    extra = encoded[0].shape[1] - length

    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([c[:length] for c in parts] + [parts[0][length:]])

    reference = joined([e[0] for e in encoded])  # (K * length + extra) x C
    variants = [(k, j) for k, pos in enumerate(per_chunk) for j in range(len(pos))]
    ref_norm = reference.flatten().norm().clamp_min(1e-12)
    emb = torch.stack([(encoded[k][1 + j] - encoded[k][0]).norm() / ref_norm for k, j in variants])
    text = torch.cat([text_hijack(e, pos) for e, pos in zip(encoded, per_chunk, strict=True) if pos])

    def contexts(batch: list[tuple[int, int]]) -> torch.Tensor:
        rows = [reference]
        for k, j in batch:
            row = reference.clone()
            row[k * length : (k + 1) * length] = encoded[k][1 + j][:length]
            if k == 0 and extra:
                row[-extra:] = encoded[0][1 + j][length:]
            rows.append(row)
        return torch.stack(rows)

    t = settings.timestep(probe.num_timesteps)
    limit = getattr(probe, "batch_limit", None)  # sized to the device's free memory
    group = limit(settings.group, settings.latent_shape) if limit else settings.group
    unet = torch.zeros(len(variants))
    for seed in settings.seeds:
        noise = torch.randn((1, *settings.latent_shape), generator=torch.Generator().manual_seed(seed))
        # The unmasked prompt rides in every group so each group's changes have their own reference.
        for start in range(0, len(variants), group):
            batch = variants[start : start + group]
            _, outs = probe.step(contexts(batch), noise, t)
            per_layer = torch.stack([relative_change(out[0], out[1:]) for out in outs.values()])
            unet[start : start + len(batch)] += per_layer.mean(0)
    positions = [k * length + p for k, pos in enumerate(per_chunk) for p in pos]
    return TokenScores(
        prompt=prompt,
        positions=positions,
        ids=[chunks[k][p] for k, pos in enumerate(per_chunk) for p in pos],
        unet=unet / len(settings.seeds) / emb.clamp_min(1e-6),
        text=text,
    )
