"""One batched UNet step on token-id variants of prompts, recording every cross-attention block's output.

What the detectors need from a ComfyUI MODEL/CLIP: contexts for explicit token-id sequences (one
CLIP call for a whole group of variants) and the per-layer responses of one denoising step.
"""

from __future__ import annotations

import hashlib

import torch

from ..tokens import PromptToken, prompt_tokens
from .comfy import (
    embedding_names,
    encode_id_rows,
    ensure_comfy_importable,
    noise_schedule,
    prompt_chunks,
    supported_family,
    tokenizer_info,
    torch_device,
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
        self._embeddings: dict[int, torch.Tensor] = {}
        self._embedding_keys: dict[str, int] = {}

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's first-chunk ids (BOS ... EOS, padded to the chunk length) as ComfyUI tokenizes it."""
        return self.token_chunks(prompt)[0]

    def token_chunks(self, prompt: str) -> list[list[int]]:
        """Every chunk's ids (BOS ... EOS, padded) as ComfyUI tokenizes the prompt (emphasis parsed out); a
        textual-inversion embedding's vectors get ids from the vocabulary size up (encode_rows reads them)."""
        return self._tokenized(prompt)[0]

    def prompt_tokens(self, prompt: str) -> list[PromptToken]:
        """The prompt's content tokens over every chunk: positions, weights, words and readable text."""
        rows, weights, special = self._tokenized(prompt)
        return prompt_tokens(self.tokenizer, rows, self.bos, self.eos, weights, special)

    def _tokenized(
        self, prompt: str
    ) -> tuple[list[list[int]], list[list[float]], dict[int, tuple[str, str]]]:
        chunks = prompt_chunks(self.clip, prompt)
        names = embedding_names(self.clip, prompt)
        groups: list[int] = []  # ComfyUI's word ids of the embeddings, in prompt order
        special: dict[int, tuple[str, str]] = {}
        rows = []
        for chunk in chunks:
            row = []
            for tok, _, word in chunk:
                if isinstance(tok, torch.Tensor):
                    if word not in groups:
                        groups.append(word)
                    g = groups.index(word)
                    name = f"embedding:{names[g]}" if g < len(names) else f"embedding #{g + 1}"
                    tok = self._embedding_id(tok)
                    special[tok] = (name, name)
                row.append(tok)
            rows.append(row)
        return rows, [[w for _, w, _ in chunk] for chunk in chunks], special

    def _embedding_id(self, vector: torch.Tensor) -> int:
        """A stable id (vocabulary size and up) for one textual-inversion vector."""
        key = hashlib.sha256(vector.detach().float().cpu().numpy().tobytes()).hexdigest()
        if key not in self._embedding_keys:
            self._embedding_keys[key] = self.vocabulary_size() + len(self._embedding_keys)
            self._embeddings[self._embedding_keys[key]] = vector.detach()
        return self._embedding_keys[key]

    def encode_rows(self, rows: list[list[int]]) -> torch.Tensor:
        """encode_ids for rows that may hold token_chunks' embedding ids (their vectors go in as ComfyUI's
        tokenizer hands them to the encoder)."""
        if not self._embeddings:
            return self.encode_ids(rows)
        return self.encode_ids([[self._embeddings.get(i, i) for i in row] for row in rows])

    @torch.no_grad()
    def encode_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Contexts (B x length x C) for explicit id sequences, in one batched CLIP call (SDXL: one more
        row carries the pooled embedding; step and x0 take contexts as this returns them)."""
        return encode_id_rows(self.clip, self.clip_name, rows, self.length)

    def batch_limit(self, wanted: int, latent_shape: tuple[int, ...] | None = None) -> int:
        """At most `wanted` UNet inputs per call, fewer when the device's free memory cannot hold them
        (ComfyUI's own per-input estimate, BaseModel.memory_required; 80% of what is free). A CPU: wanted."""
        import comfy.model_management as mm

        device = torch_device()
        if device.type == "cpu":
            return wanted
        shape = latent_shape or (4, *self.latent_hw)
        try:
            per_item = float(self.model.model.memory_required([2, *shape])) / 2  # cond + uncond in one call
            free = float(mm.get_free_memory(device))
        except Exception:  # an estimate only: never stop a probe for it
            return wanted
        return max(1, min(wanted, int(0.8 * free / max(per_item, 1.0))))

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
