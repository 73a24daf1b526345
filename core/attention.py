"""Cross-attention capture for SD-family UNets: per-token maps recorded beside the fast kernel.

The layer's output is always computed by the runtime's own fast attention (the backends call it);
this module only recomputes softmax(QK^T / sqrt(d)) over the text keys, chunked over queries, for
the conditional rows, averages the heads at once and keeps a running sum on CPU in fp32.
"""

from __future__ import annotations

import functools
import math
import warnings
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
    """The (h, w) grid of a layer with this many queries, for a latent of latent_hw.

    Tries the power-of-two scales a UNet's stride-2 convolutions give (rounding up); raises
    ValueError when none fits (a patch that rescales features, such as Deep Shrink, can give others:
    use `layer_grid` with the layer's own activation shape there).
    """
    lh, lw = latent_hw
    factor = 1
    while factor <= max(lh, lw):
        h, w = math.ceil(lh / factor), math.ceil(lw / factor)
        if h * w == queries:
            return h, w
        factor *= 2
    raise ValueError(f"{queries} queries do not tile a {lh}x{lw} latent at any power-of-two scale")


def layer_grid(
    queries: int, activations_hw: tuple[int, int] | None, latent_hw: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The (h, w) grid of one attention call, or None when nothing fits.

    activations_hw is the layer's own input grid (ComfyUI's `activations_shape[-2:]`, set by
    SpatialTransformer.forward in comfy/ldm/modules/attention.py) and wins when it holds `queries`
    cells; otherwise the latent's power-of-two scales are tried (`spatial_shape`).
    """
    if activations_hw is not None and activations_hw[0] * activations_hw[1] == queries:
        return int(activations_hw[0]), int(activations_hw[1])
    if latent_hw is not None:
        try:
            return spatial_shape(queries, latent_hw)
        except ValueError:
            return None
    return None


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

    Calls are summed per (layer, grid, conditional rows, tokens): a layer whose grid changes during
    a run (Deep Shrink, ComfyUI's PatchModelAddDownscale) keeps one sum per grid, and `maps()` resizes
    each to the output resolution and weights them by their call counts (bilinear resizing is linear,
    so this is the mean of the resized maps). Nothing here raises for a call it cannot place: it is
    skipped with one warning per kind of problem per recorder, because these calls run inside the
    runtime's attention.
    """

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings()
        self.labels: list[list[str]] | None = None
        self._warned: set[str] = set()  # kinds of problem already warned about (once per recorder)
        self.reset()

    def __deepcopy__(self, memo: dict) -> CrossAttentionRecorder:
        return self

    def reset(self) -> None:
        """Forget everything recorded (a new sampling run)."""
        # per (layer, (h, w), rows, tokens): (rows, queries, tokens) summed over calls, and the call count
        self._sums: dict[tuple[str, tuple[int, int], int, int], torch.Tensor] = {}
        self._counts: dict[tuple[str, tuple[int, int], int, int], int] = {}
        self._sigma: object = None
        self._step = 0
        # per (step, rows, tokens): resized maps (rows, tokens, R, R) summed over calls
        self._step_sums: dict[tuple[int, int, int], torch.Tensor] = {}
        self._step_counts: dict[tuple[int, int, int], int] = {}
        self._steps: set[int] = set()
        self._schedule: torch.Tensor | None = None
        self.live: dict[str, list[torch.Tensor]] = {}  # differentiable mode: maps with their graph

    def warn_once(self, kind: str, message: str) -> None:
        """warnings.warn(message) the first time this kind of problem happens to this recorder."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

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

    def grids(self) -> dict[str, list[tuple[int, int]]]:
        """Every (h, w) grid each layer was recorded at, in this run."""
        out: dict[str, set[tuple[int, int]]] = {}
        for layer, grid, _, _ in self._sums:
            out.setdefault(layer, set()).add(grid)
        return {layer: sorted(g) for layer, g in out.items()}

    def _resize(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.settings.resolution
        if maps.shape[-2:] == (r, r):
            return maps
        return F.interpolate(maps, size=(r, r), mode="bilinear", align_corners=False)

    def _label_length(self) -> int | None:
        lengths = {len(item) for item in self.labels or []}
        return lengths.pop() if len(lengths) == 1 else None

    def _fold_repeated_keys(self, probs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Undo ComfyUI's padding of a shorter prompt by repetition (CONDCrossAttn.concat in comfy/conds.py).

        When the keys are exact copies of a labelled-length block, each copy got an equal share of the
        probability: summing the copies gives the prompt's own softmax, one column per label.
        """
        length, t = self._label_length(), probs.shape[-1]
        if not length or t == length or t % length:
            return probs
        blocks = k.reshape(k.shape[0], t // length, length, k.shape[-1])
        if not all(torch.equal(blocks[:, 0], blocks[:, i]) for i in range(1, blocks.shape[1])):
            return probs
        return probs.reshape(*probs.shape[:-1], t // length, length).sum(-2)

    def record(
        self,
        layer: str,
        q: torch.Tensor,
        k: torch.Tensor,
        heads: int,
        latent_hw: tuple[int, int] | None,
        step: int = 0,
        rows: torch.Tensor | slice | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        """Record one attn2 call: q (B, N, inner), k (B, T, inner); rows selects the conditional half.

        grid is the layer's own (h, w) when the runtime tells it (it wins when h * w == N); otherwise
        the grid is found from latent_hw (`spatial_shape`). A call with no conditional rows records
        nothing; a call whose grid cannot be found is skipped with one warning.
        """
        if not self.wants(layer, step):
            return
        if rows is not None:
            if isinstance(rows, torch.Tensor) and rows.numel() == 0:
                return  # an unconditional-only call (cond and uncond run separately)
            k = k[rows] if k.shape[0] == q.shape[0] else k
            q = q[rows]
        hw = layer_grid(q.shape[1], grid, latent_hw)
        if hw is None:
            self.warn_once(
                "grid",
                f"cross-attention capture skipped calls of {layer}: {q.shape[1]} queries fit neither the "
                f"layer's grid {grid} nor any power-of-two scale of the {latent_hw} latent",
            )
            return
        s = self.settings
        if s.differentiable:
            probs = self._fold_repeated_keys(cross_attention_probabilities(q, k, heads, s.query_chunk), k)
            b, _, t = probs.shape
            self.live.setdefault(layer, []).append(self._resize(probs.transpose(1, 2).reshape(b, t, *hw)))
            return
        with torch.no_grad():
            probs = cross_attention_probabilities(q, k, heads, s.query_chunk)
            probs = self._fold_repeated_keys(probs, k).to("cpu", torch.float32)
        b, _, t = probs.shape
        # Bilinear resizing is linear, so the mean of resized maps is the resized mean: sum at the
        # layer's own grid in (B, queries, tokens) layout and resize once, when the maps are read.
        self._add(self._sums, self._counts, (layer, hw, b, t), probs)
        self._steps.add(step)
        if s.keep_steps:
            maps = self._resize(probs.transpose(1, 2).reshape(b, t, *hw))
            self._add(self._step_sums, self._step_counts, (step, b, t), maps)

    @staticmethod
    def _add(sums: dict, counts: dict, key, maps: torch.Tensor) -> None:
        if key in sums:
            sums[key] += maps
            counts[key] += 1
        else:
            sums[key] = maps.clone()
            counts[key] = 1

    def _target(self) -> tuple[int, int] | None:
        """The (batch, tokens) the maps are given at: the smallest conditional batch seen (larger
        ones, several positive conditionings in one call, fold onto it) and the labels' token count
        (else the most recorded one)."""
        if not self._sums:
            return None
        batch = min(b for _, _, b, _ in self._sums)
        calls: dict[int, int] = {}
        for (_, _, _, t), n in self._counts.items():
            calls[t] = calls.get(t, 0) + n
        length = self._label_length()
        return batch, length if length in calls else max(calls, key=calls.__getitem__)

    def _mean(self, entries: list[tuple[torch.Tensor, int]], batch: int, tokens: int) -> torch.Tensor | None:
        """Call-weighted mean of summed maps (rows, tokens, R, R): rows fold onto batch."""
        total, calls = None, 0
        for maps, count in entries:
            rows, t = maps.shape[:2]
            if t != tokens or rows % batch:
                self.warn_once(
                    "shape",
                    f"some attention maps ({rows} conditional rows, {t} tokens) do not fit the "
                    f"{batch} x {tokens} recorded most and were left out of the mean",
                )
                continue
            folded = maps.reshape(rows // batch, batch, *maps.shape[1:]).sum(0)
            total = folded if total is None else total + folded
            calls += count * (rows // batch)
        return None if total is None else total / calls

    def maps(self) -> AttentionMaps:
        """The recorded maps, averaged over the captured steps (and layers, for the per-step series)."""
        target = self._target()
        per_layer: dict[str, torch.Tensor] = {}
        per_step: dict[int, torch.Tensor] = {}
        if target is not None:
            entries: dict[str, list[tuple[torch.Tensor, int]]] = {}
            for (layer, hw, b, t), total in self._sums.items():
                resized = self._resize(total.transpose(1, 2).reshape(b, t, *hw))
                entries.setdefault(layer, []).append((resized, self._counts[(layer, hw, b, t)]))
            for layer, items in entries.items():
                mean = self._mean(items, *target)
                if mean is not None:
                    per_layer[layer] = mean
            steps: dict[int, list[tuple[torch.Tensor, int]]] = {}
            for key, total in sorted(self._step_sums.items()):
                steps.setdefault(key[0], []).append((total, self._step_counts[key]))
            for step, items in steps.items():
                mean = self._mean(items, *target)
                if mean is not None:
                    per_step[step] = mean
        return AttentionMaps(
            per_layer=per_layer, steps=sorted(self._steps), per_step=per_step, labels=self.labels
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
