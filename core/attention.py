"""Cross-attention capture for SD-family UNets: per-token maps recorded beside the fast kernel.

The layer's output is always computed by the runtime's own fast attention (the backends call it);
this module only recomputes softmax(QK^T / sqrt(d)) over the text keys, chunked over queries, for
the conditional rows, averages the heads at once and keeps a running sum on CPU in fp32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


def is_cross_attention(name: str, module: torch.nn.Module) -> bool:
    """True for a text-conditioned attention layer (attn2 in ComfyUI's and diffusers' blocks)."""
    if getattr(module, "is_cross_attention", False):  # diffusers.Attention
        return True
    has_qkv = all(hasattr(module, p) for p in ("to_q", "to_k", "to_v"))
    return has_qkv and name.rsplit(".", 1)[-1] == "attn2"


def find_cross_attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every cross-attention layer of a UNet, in forward (module registration) order."""
    return [(n, m) for n, m in model.named_modules() if is_cross_attention(n, m)]


class UnsupportedModelError(ValueError):
    """The model has no cross-attention layers this engine can read."""


def require_cross_attention(
    model: torch.nn.Module, family: str = "this model"
) -> list[tuple[str, torch.nn.Module]]:
    """The cross-attention layers, or a clear error naming the supported families."""
    layers = find_cross_attention_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"{family} has no cross-attention (attn2) layers. backdoor-seal supports UNet models that "
            "condition on text through cross-attention (SD1.x, SD2.x, SDXL); DiT/MMDiT families "
            "(SD3, Flux) are not supported."
        )
    return layers


def selected_cross_attention(
    model: torch.nn.Module, settings: CaptureSettings, family: str = "this model"
) -> list[tuple[str, torch.nn.Module]]:
    """The cross-attention layers the settings select, or a clear error when none match."""
    layers = [(n, m) for n, m in require_cross_attention(model, family) if settings.selects_layer(n)]
    if not layers:
        raise ValueError(f"no cross-attention layer name contains any of {list(settings.layers)}")
    return layers


@dataclass(frozen=True)
class CaptureSettings:
    """Which layers and sampling steps to record, and at what map resolution."""

    layers: tuple[str, ...] = ()  # substrings of layer names ("input_blocks", "attn2"); empty = all
    first_step: int = 0
    last_step: int | None = None  # exclusive; None = to the end of sampling
    resolution: int = 16  # maps are resized (bilinear) to resolution x resolution
    query_chunk: int = 1024  # queries per softmax chunk: bounds memory at chunk x tokens x heads
    keep_steps: bool = False  # also keep a per-step series (its memory grows with the steps)
    differentiable: bool = False  # keep maps on the model's device with their autograd graph

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.query_chunk < 1:
            raise ValueError("resolution and query_chunk must be at least 1")
        if self.first_step < 0 or (self.last_step is not None and self.last_step <= self.first_step):
            raise ValueError(f"empty step range [{self.first_step}, {self.last_step})")

    def selects_layer(self, name: str) -> bool:
        """Whether this layer is recorded."""
        return not self.layers or any(part in name for part in self.layers)

    def selects_step(self, step: int) -> bool:
        """Whether this sampling step is recorded."""
        return step >= self.first_step and (self.last_step is None or step < self.last_step)


def cross_attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, query_chunk: int = 1024
) -> torch.Tensor:
    """softmax(QK^T/sqrt(d)) over the text keys, mean over heads: (B, queries, tokens) in fp32."""
    b, n, inner = q.shape
    d = inner // heads
    # the scale goes on the keys: 77 rows instead of thousands of queries
    kt = (k.float() * (1.0 / math.sqrt(d))).reshape(k.shape[0], -1, heads, d).permute(0, 2, 3, 1)
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    if n <= query_chunk:
        return torch.matmul(qh, kt).softmax(-1).mean(1)
    chunks = [
        torch.matmul(qh[:, :, s : s + query_chunk], kt).softmax(-1).mean(1) for s in range(0, n, query_chunk)
    ]
    return torch.cat(chunks, 1)


def spatial_shape(queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a layer with this many queries, for a latent of latent_hw."""
    lh, lw = latent_hw
    factor = 1
    while factor <= max(lh, lw):
        h, w = math.ceil(lh / factor), math.ceil(lw / factor)
        if h * w == queries:
            return h, w
        factor *= 2
    raise ValueError(f"{queries} queries do not tile a {lh}x{lw} latent at any power-of-two scale")


@dataclass
class AttentionMaps:
    """Recorded per-token maps: mean over the captured steps, per layer (B x tokens x R x R)."""

    per_layer: dict[str, torch.Tensor]
    steps: list[int]
    per_step: dict[int, torch.Tensor] = field(default_factory=dict)  # mean over layers, if kept
    labels: list[list[str]] | None = None  # one token label per position, per batch item

    def combined(self) -> torch.Tensor:
        """Mean over layers: (B x tokens x R x R)."""
        if not self.per_layer:
            raise ValueError("no attention was recorded: was the captured MODEL used for sampling?")
        return torch.stack(list(self.per_layer.values())).mean(0)


class CrossAttentionRecorder:
    """Accumulates per-token cross-attention maps, per layer (and optionally per step), on CPU in fp32.

    One recorder serves every patched layer of a model and all its clones: `copy.deepcopy` returns
    the recorder itself, because ComfyUI deep-copies model options on every clone.
    """

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings()
        self.labels: list[list[str]] | None = None
        self.reset()

    def __deepcopy__(self, memo: dict) -> CrossAttentionRecorder:
        return self

    def reset(self) -> None:
        """Forget everything recorded (a new sampling run)."""
        self._sums: dict[str, torch.Tensor] = {}  # per layer: (B, queries, tokens), summed over calls
        self._grids: dict[str, tuple[int, int]] = {}
        self._sigma: object = None
        self._step = 0
        self._counts: dict[str, int] = {}
        self._step_sums: dict[int, torch.Tensor] = {}
        self._step_counts: dict[int, int] = {}
        self._steps: set[int] = set()
        self._schedule: torch.Tensor | None = None
        self.live: dict[str, list[torch.Tensor]] = {}  # differentiable mode: maps with their graph

    def step_of(self, schedule: torch.Tensor | None, sigma: torch.Tensor | float | None) -> int:
        """The sampling step a model call belongs to; a new schedule tensor starts a new run."""
        if schedule is None or sigma is None:
            return 0
        if sigma is self._sigma:  # every layer of one model call shares the sigma tensor
            return self._step
        if schedule is not self._schedule:
            if self._schedule is not None and not self.settings.differentiable:
                self.reset()
            self._schedule = schedule
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        self._sigma, self._step = sigma, int((schedule.float() - s).abs().argmin())
        return self._step

    def wants(self, layer: str, step: int) -> bool:
        """Whether a call of this layer at this step is recorded."""
        return self.settings.selects_layer(layer) and self.settings.selects_step(step)

    def _resize(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.settings.resolution
        if maps.shape[-2:] == (r, r):
            return maps
        return F.interpolate(maps, size=(r, r), mode="bilinear", align_corners=False)

    def record(
        self,
        layer: str,
        q: torch.Tensor,
        k: torch.Tensor,
        heads: int,
        latent_hw: tuple[int, int],
        step: int = 0,
        rows: torch.Tensor | slice | None = None,
    ) -> None:
        """Record one attn2 call: q (B, N, inner), k (B, T, inner); rows selects the conditional half."""
        if not self.wants(layer, step):
            return
        if rows is not None:
            k = k[rows] if k.shape[0] == q.shape[0] else k
            q = q[rows]
        s = self.settings
        if s.differentiable:
            probs = cross_attention_probabilities(q, k, heads, s.query_chunk)
            b, n, t = probs.shape
            maps = probs.transpose(1, 2).reshape(b, t, *spatial_shape(n, latent_hw))
            self.live.setdefault(layer, []).append(self._resize(maps))
            return
        with torch.no_grad():
            probs = cross_attention_probabilities(q, k, heads, s.query_chunk).to("cpu", torch.float32)
        # Bilinear resizing is linear, so the mean of resized maps is the resized mean: sum at the
        # layer's own grid in (B, queries, tokens) layout and resize once, when the maps are read.
        self._grids.setdefault(layer, spatial_shape(probs.shape[1], latent_hw))
        self._add(self._sums, self._counts, layer, probs)
        self._steps.add(step)
        if s.keep_steps:
            b, n, t = probs.shape
            maps = self._resize(probs.transpose(1, 2).reshape(b, t, *self._grids[layer]))
            self._add(self._step_sums, self._step_counts, step, maps)

    @staticmethod
    def _add(sums: dict, counts: dict, key, maps: torch.Tensor) -> None:
        if key in sums and sums[key].shape != maps.shape:
            raise RuntimeError(
                f"attention maps of shape {tuple(maps.shape)} do not match the {tuple(sums[key].shape)} "
                "already recorded: the sampler split one batch across calls; record smaller batches"
            )
        if key in sums:
            sums[key] += maps
            counts[key] += 1
        else:
            sums[key] = maps.clone()
            counts[key] = 1

    def maps(self) -> AttentionMaps:
        """The recorded maps, averaged over the captured steps (and layers, for the per-step series)."""
        per_layer = {}
        for layer, total in self._sums.items():
            b, n, t = total.shape
            mean = (total / self._counts[layer]).transpose(1, 2).reshape(b, t, *self._grids[layer])
            per_layer[layer] = self._resize(mean)
        return AttentionMaps(
            per_layer=per_layer,
            steps=sorted(self._steps),
            per_step={k: v / self._step_counts[k] for k, v in sorted(self._step_sums.items())},
            labels=self.labels,
        )

    def pop_live(self) -> dict[str, torch.Tensor]:
        """Differentiable mode: each layer's maps of the model calls since the last pop, stacked (calls x B x T x R x R)."""
        live, self.live = self.live, {}
        return {k: torch.stack(v) for k, v in live.items()}


@functools.cache
def _xformers_works(device_type: str) -> bool:
    try:
        import xformers.ops
    except Exception:  # not installed, or built against another torch
        return False
    try:
        q = torch.randn(1, 8, 1, 8, device=device_type)
        xformers.ops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # no kernel for this device (xformers has none on CPU)
        return False


def fast_kernel(device: torch.device) -> str:
    """ "xformers" where a run-time probe shows it works on this device, else "sdpa"."""
    return "xformers" if _xformers_works(torch.device(device).type) else "sdpa"


class DiffusionBackend(Protocol):
    """What capture needs from a text-to-image model, whichever runtime holds it."""

    name: str

    def unet(self) -> torch.nn.Module:
        """The denoiser module."""
        ...

    def position_labels(self, prompt: str) -> list[str]:
        """One label per conditioning position for this prompt."""
        ...

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 20,
        cfg: float = 1.0,
        recorder: CrossAttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Latents for per-item prompts and seeds in one batch, recording into recorder if given."""
        ...


def capture(
    backend: DiffusionBackend,
    prompts: list[str],
    seeds: list[int],
    settings: CaptureSettings | None = None,
    steps: int = 20,
    cfg: float = 1.0,
) -> tuple[torch.Tensor, AttentionMaps]:
    """Sample with capture on: the latents (as without capture) and the maps labelled with each prompt's tokens."""
    recorder = CrossAttentionRecorder(settings)
    recorder.labels = [backend.position_labels(p) for p in prompts]
    latents = backend.sample(prompts, seeds, steps, cfg, recorder=recorder)
    return latents, recorder.maps()
