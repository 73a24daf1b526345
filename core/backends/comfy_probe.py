"""One batched UNet step on token-id variants of prompts, recording every cross-attention block's output.

What the detectors need from a ComfyUI MODEL/CLIP: contexts for explicit token-id sequences (one
CLIP call for a whole group of variants) and the per-layer responses of one denoising step.
"""

from __future__ import annotations

import torch

from .comfy import (
    chunk_ids,
    encode_id_rows,
    ensure_comfy_importable,
    noise_schedule,
    supported_family,
    tokenizer_info,
    unet_conditioning,
)


class Attn2OutputRecorder:
    """An attn2_output_patch that keeps each cross-attention block's output (B x queries x C) of one forward."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.enabled = False  # only step() wants the outputs; x0() skips the per-layer copies

    def __call__(self, n: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if not self.enabled:
            return n
        block = extra_options.get("block") or ("?", 0)
        key = f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}"
        self.outputs[key] = n.detach().float().cpu()
        return n

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model options on every clone
        return self


class ComfyProbe:
    """Token ids in, contexts and per-layer attn2 outputs of one denoising step out (no training)."""

    def __init__(self, model, clip, latent_hw: tuple[int, int] = (8, 8)) -> None:
        ensure_comfy_importable()
        supported_family(model)
        self.recorder = Attn2OutputRecorder()
        self.model = model.clone()
        self.model.set_model_attn2_output_patch(self.recorder)
        self.clip = clip
        self.latent_hw = latent_hw
        info = tokenizer_info(clip)
        self.clip_name, self.tokenizer, self.length = info.name, info.tokenizer, info.length
        self.bos, self.eos, self.pad = info.bos, info.eos, info.pad
        self.num_timesteps = len(noise_schedule(model))

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's first-chunk ids (BOS ... EOS, padded to the chunk length) as ComfyUI tokenizes it."""
        return chunk_ids(self.clip, prompt)

    @torch.no_grad()
    def encode_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Contexts (B x length x C) for explicit id sequences, in one batched CLIP call (SDXL: one more
        row carries the pooled embedding; step and x0 take contexts as this returns them)."""
        return encode_id_rows(self.clip, self.clip_name, rows, self.length)

    def vocabulary_size(self) -> int:
        """How many token ids the tokenizer has (49,408 for CLIP)."""
        return len(self.tokenizer.get_vocab())

    def token_text(self, token_id: int) -> str:
        """A token id as readable text (byte-level pieces decoded; '</w>' ends a word)."""
        return self.tokenizer.decode([token_id])

    @torch.no_grad()
    def x0(self, context: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """The model's denoised prediction of one step at timestep t (what the image is heading to)."""
        _, _, denoised = self._forward(context, noise, t, record=False)
        return denoised

    @torch.no_grad()
    def step(
        self, context: torch.Tensor, noise: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """eps and each attn2 block's output for unit-variance noise (broadcast over the batch) at timestep t."""
        x, sigma, denoised = self._forward(context, noise, t, record=True)
        return (x - denoised) / sigma, dict(self.recorder.outputs)

    def _forward(
        self, context: torch.Tensor, noise: torch.Tensor, t: int, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t, sigma (B x 1 x 1 x 1) and the denoised prediction, on CPU in fp32."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.model])
        base = self.model.model
        device = mm.get_torch_device()
        b = context.shape[0]
        sigma = base.model_sampling.sigma(torch.full((b,), t, device=device)).float()
        s = sigma.view(-1, 1, 1, 1)
        x = noise.to(device).expand(b, *noise.shape[1:]) * (s**2 + 1).sqrt()
        self.recorder.outputs = {}
        self.recorder.enabled = record
        options = self.model.model_options.get("transformer_options", {})
        inputs = unet_conditioning(self.model, context.to(device), tuple(noise.shape[-2:]))
        try:
            denoised = base.apply_model(x, sigma, transformer_options=options, **inputs)
        finally:
            self.recorder.enabled = False
        return x.float().cpu(), s.cpu(), denoised.float().cpu()
