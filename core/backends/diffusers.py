"""The diffusers backend: a UNet2DConditionModel, its CLIP text encoder(s) and a scheduler, headless.

For research checkpoints (a local diffusers folder, safetensors only) and for runs without ComfyUI.
Capture swaps a recording attention processor into each selected cross-attention layer for the
duration of one sampling call and puts the originals back afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import CrossAttentionRecorder, fast_kernel, selected_cross_attention
from ..tokens import position_labels


@dataclass
class UNetCall:
    """What the recording processors need to know about the UNet call in progress."""

    step: int = 0
    rows: torch.Tensor | slice | None = None  # the conditional half of the batch
    latent_hw: tuple[int, int] = (8, 8)


class RecordingAttnProcessor:
    """diffusers' SDPA attention processor, with the same layer's maps sent to a recorder.

    The output comes from scaled_dot_product_attention (or xformers where it was probed to work),
    exactly as diffusers' AttnProcessor2_0 computes it.
    """

    def __init__(
        self, recorder: CrossAttentionRecorder, layer: str, call: UNetCall, kernel: str = "sdpa"
    ) -> None:
        self.recorder, self.layer, self.call, self.kernel = recorder, layer, call, kernel

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if attn.norm_q is None and attn.norm_k is None:
            c = self.call
            self.recorder.record(self.layer, query, key, attn.heads, c.latent_hw, c.step, c.rows)
        head_dim = key.shape[-1] // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.kernel == "xformers" and attention_mask is None:
            import xformers.ops

            out = xformers.ops.memory_efficient_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            ).transpose(1, 2)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def recording(
    unet: torch.nn.Module, recorder: CrossAttentionRecorder, call: UNetCall, kernel: str
) -> Iterator[None]:
    """Swap recording processors into the selected cross-attention layers; restore the originals on exit."""
    layers = selected_cross_attention(unet, recorder.settings, type(unet).__name__)
    originals = [(m, m.processor) for _, m in layers]
    try:
        for name, module in layers:
            module.set_processor(RecordingAttnProcessor(recorder, name, call, kernel))
        yield
    finally:
        for module, processor in originals:
            module.set_processor(processor)


class DiffusersBackend:
    """A diffusers UNet with its text encoder(s) (two for SDXL) and scheduler, sampled headless."""

    name = "diffusers"

    def __init__(
        self,
        unet,
        text_encoders: list,
        tokenizers: list,
        scheduler,
        latent_hw: tuple[int, int] | None = None,
        kernel: str | None = None,
    ) -> None:
        if len(text_encoders) != len(tokenizers) or len(text_encoders) not in (1, 2):
            raise ValueError("pass one text encoder and tokenizer (SD1/SD2) or two (SDXL)")
        self._unet, self.text_encoders, self.tokenizers, self.scheduler = (
            unet,
            text_encoders,
            tokenizers,
            scheduler,
        )
        size = unet.config.sample_size
        self.latent_hw = latent_hw or ((size, size) if isinstance(size, int) else tuple(size))
        self.device = next(unet.parameters()).device
        self.kernel = kernel or fast_kernel(self.device)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> DiffusersBackend:
        """Load a local diffusers folder (unet/, text_encoder/[, text_encoder_2/], tokenizer/..., scheduler/); safetensors only."""
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "unet").is_dir():
            raise FileNotFoundError(f"{folder} is not a diffusers folder (no unet/ inside)")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)]
        tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
        if (folder / "text_encoder_2").is_dir():
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", use_safetensors=True
                )
            )
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        return cls(unet, encoders, tokenizers, scheduler, **kwargs)

    def unet(self) -> torch.nn.Module:
        """The denoiser module."""
        return self._unet

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        length = self.text_encoders[0].config.max_position_embeddings  # 77 for every CLIP
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text conditioning (B x 77 x C) and, for SDXL, the added pooled/time conditioning."""
        if len(self.text_encoders) == 1:
            return self.text_encoders[0](self._ids(self.tokenizers[0], prompts)).last_hidden_state, None
        states, pooled = [], None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers, strict=True):
            out = encoder(self._ids(tokenizer, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection encoder (the second one)
        h, w = (8 * s for s in self.latent_hw)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pooled.dtype, device=self.device).repeat(
            len(prompts), 1
        )
        return torch.cat(states, -1), {"text_embeds": pooled, "time_ids": time_ids}

    def position_labels(self, prompt: str) -> list[str]:
        """One label per conditioning position for this prompt."""
        tok = self.tokenizers[0]
        ids = self._ids(tok, [prompt])[0].tolist()
        return position_labels(tok, ids, tok.bos_token_id, tok.eos_token_id, chunk=len(ids))

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 20,
        cfg: float = 1.0,
        recorder: CrossAttentionRecorder | None = None,
    ) -> torch.Tensor:
        """Latents for per-item prompts and seeds in one batch (uncond first under CFG, as diffusers does)."""
        cond, added = self.encode(prompts)
        guided = cfg != 1.0
        if guided:
            uncond, added_u = self.encode([""] * len(prompts))
            cond = torch.cat([uncond, cond])
            if added is not None:
                added = {k: torch.cat([added_u[k], v]) for k, v in added.items()}
        noise = torch.cat(
            [torch.randn(1, 4, *self.latent_hw, generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        self.scheduler.set_timesteps(steps, device=self.device)
        latents = noise.to(self.device) * self.scheduler.init_noise_sigma
        call = UNetCall(rows=slice(len(prompts), None) if guided else None, latent_hw=self.latent_hw)
        ctx = (
            recording(self._unet, recorder, call, self.kernel)
            if recorder is not None
            else contextlib.nullcontext()
        )
        with ctx:
            for i, t in enumerate(self.scheduler.timesteps):
                call.step = i
                x = torch.cat([latents] * 2) if guided else latents
                x = self.scheduler.scale_model_input(x, t)
                eps = self._unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + cfg * (eps_c - eps_u)
                latents = self.scheduler.step(eps, t, latents).prev_sample
        return latents
