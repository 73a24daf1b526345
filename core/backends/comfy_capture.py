"""Cross-attention capture inside ComfyUI's attention (attn2 replace patches on a clone; never raises)
and the capture engine's backend."""

from __future__ import annotations

from typing import Any

import torch

from ..attention import CrossAttentionRecorder, UnsupportedModelError, selected_cross_attention
from .comfy_objects import supported_family, unet
from .comfy_sampling import sample_prompts
from .comfy_text import clip_position_labels


def attn2_patch_key(layer: str) -> tuple[str, int, int]:
    """ComfyUI's attn2 replace-patch key (block, number, transformer index) for a UNet module name."""
    parts = layer.split(".")
    try:
        index = int(parts[parts.index("transformer_blocks") + 1])
        if parts[0] == "input_blocks":
            return ("input", int(parts[1]), index)
        if parts[0] == "middle_block":
            return ("middle", 0, index)
        if parts[0] == "output_blocks":
            return ("output", int(parts[1]), index)
    except (ValueError, IndexError):
        pass
    raise UnsupportedModelError(
        f"cross-attention layer {layer!r} is not inside a UNet input/middle/output block"
    )


def _conditional_rows(cond_or_uncond: list[int] | None, batch: int) -> torch.Tensor | None:
    """Batch rows of the conditional (positive) chunks, as a long index; None when every row is one.

    ComfyUI stacks equal-sized chunks, one per entry of `cond_or_uncond` (0 = positive, 1 = negative;
    comfy/samplers.py calc_cond_batch). An unconditional-only call gives an empty index. Raises
    ValueError when the batch does not split into those chunks.
    """
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    if batch % len(cond_or_uncond):
        raise ValueError(f"a batch of {batch} does not split into {len(cond_or_uncond)} chunks")
    per = batch // len(cond_or_uncond)
    rows = [r for i, c in enumerate(cond_or_uncond) if c == 0 for r in range(i * per, (i + 1) * per)]
    return torch.tensor(rows, dtype=torch.long)


def _activations_hw(extra_options: dict) -> tuple[int, int] | None:
    """The (h, w) of the SpatialTransformer input (`activations_shape`, comfy/ldm/modules/attention.py)."""
    shape = extra_options.get("activations_shape")
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) == 4 else None


def _latent_hw(extra_options: dict) -> tuple[int, int] | None:
    """The (h, w) of the UNet input (`original_shape`, comfy/ldm/modules/diffusionmodules/openaimodel.py)."""
    shape = extra_options.get("original_shape")
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else None


class ComfyCrossAttentionCapture:
    """An attn2 replace patch: ComfyUI's optimized attention computes the output; the maps go to a recorder.

    Recording never raises: any failure becomes one warning per recorder and that call's maps are
    skipped, while the output is computed as without capture. Another pack's attn2 patch keeps
    working in either order: placed before capture it is wrapped (`inner`); placed after, it finds
    this patch on the layer and calls `.add(callback, **kwargs)`, the contract of cubiq's
    ComfyUI_IPAdapter_plus (`Attn2Replace` in CrossAttentionPatch.py, `set_model_patch_replace` in
    IPAdapterPlus.py) that InstantID / PuLID packs copy: `.add` goes to the inner patch when it has
    one, else each callback adds `callback(out, q, k, v, extra_options, **kwargs)` to the output
    while sigma_end <= sigma <= sigma_start (when those kwargs are given).

    ComfyUI deep-copies model options on every clone: the copy shares the recorder (its deepcopy
    returns itself) and copies the callbacks and the inner patch, so an `.add` on a clone leaves the
    MODEL it was cloned from unchanged.
    """

    def __init__(self, recorder: CrossAttentionRecorder, layer: str, inner=None) -> None:
        from comfy.ldm.modules.attention import optimized_attention

        self.recorder, self.layer, self.inner = recorder, layer, inner
        self.callbacks: list[tuple[Any, dict[str, Any]]] = []
        self._attention = optimized_attention

    def add(self, callback, **kwargs) -> None:
        """Another pack's attention callback (IPAdapter's contract): delegated to the inner patch if it takes them."""
        if self.inner is not None and callable(getattr(self.inner, "add", None)):
            self.inner.add(callback, **kwargs)
        else:
            self.callbacks.append((callback, kwargs))

    def to(self, device, *args, **kwargs) -> ComfyCrossAttentionCapture:
        """ModelPatcher.model_patches_to moves patches with the model: the inner patch moves along."""
        if self.inner is not None and hasattr(self.inner, "to"):
            self.inner = self.inner.to(device, *args, **kwargs)
        return self

    def models(self) -> list:
        """Extra models the inner patch needs loaded (ModelPatcher.model_patches_models)."""
        return list(self.inner.models()) if self.inner is not None and hasattr(self.inner, "models") else []

    def _record(self, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        rec = self.recorder
        try:
            step = rec.step_of(extra_options.get("sample_sigmas"), extra_options.get("sigmas"))
            if not rec.wants(self.layer, step):
                return
            rows = _conditional_rows(extra_options.get("cond_or_uncond"), q.shape[0])
            rec.record(
                self.layer,
                q,
                k,
                extra_options["n_heads"],
                _latent_hw(extra_options),
                step,
                rows,
                grid=_activations_hw(extra_options),
            )
        except Exception as e:  # never break the user's sampling for a heatmap
            rec.warn_once("error", f"cross-attention capture skipped a call of {self.layer}: {e!r}")

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        self._record(q, k, extra_options)
        if self.inner is not None:  # another node's attn2 patch on this layer keeps working
            out = self.inner(q, k, v, extra_options)
        else:
            out = self._attention(
                q,
                k,
                v,
                extra_options["n_heads"],
                attn_precision=extra_options.get("attn_precision"),
                transformer_options=extra_options,
            )
        if self.callbacks:
            sigmas = extra_options.get("sigmas")
            sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) else float("inf")
            dtype = out.dtype
            for callback, kwargs in self.callbacks:
                if sigma <= kwargs.get("sigma_start", float("inf")) and sigma >= kwargs.get(
                    "sigma_end", float("-inf")
                ):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
            out = out.to(dtype)
        return out


def attach_attention_recorder(model, recorder: CrossAttentionRecorder):
    """A clone of a ComfyUI MODEL whose selected cross-attention layers feed the recorder."""
    unet = getattr(model.model, "diffusion_model", None)
    family = type(model.model).__name__
    if unet is None:
        raise UnsupportedModelError(f"{family} has no diffusion_model to read cross-attention from")
    supported_family(model)
    layers = selected_cross_attention(unet, recorder.settings, family)
    patched = model.clone()
    existing = (
        patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    )
    for name, _ in layers:
        key = attn2_patch_key(name)
        patched.set_model_attn2_replace(ComfyCrossAttentionCapture(recorder, name, existing.get(key)), *key)
    return patched


class ComfyBackend:
    """A ComfyUI MODEL and CLIP, sampled with ComfyUI's own sampler (capture through attn2 patches)."""

    name = "comfy"

    def __init__(
        self,
        model,
        clip,
        latent_hw: tuple[int, int] = (8, 8),
        sampler: str = "euler",
        scheduler: str = "normal",
    ) -> None:
        self.model, self.clip, self.latent_hw, self.sampler, self.scheduler = (
            model,
            clip,
            latent_hw,
            sampler,
            scheduler,
        )

    def unet(self) -> torch.nn.Module:
        """The denoiser module."""
        return unet(self.model)

    def position_labels(self, prompt: str) -> list[str]:
        """One label per conditioning position for this prompt."""
        return clip_position_labels(self.clip, prompt)

    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 20,
        cfg: float = 1.0,
        recorder: CrossAttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Latents for per-item prompts and seeds in one batch, recording into recorder if given."""
        model = attach_attention_recorder(self.model, recorder) if recorder is not None else self.model
        return sample_prompts(
            model, self.clip, prompts, seeds, steps, cfg, self.sampler, self.scheduler, self.latent_hw
        )
