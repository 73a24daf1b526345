"""The ComfyUI backend: builds and reads ComfyUI MODEL/CLIP/VAE objects. Imports comfy lazily."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import (
    CrossAttentionRecorder,
    UnsupportedModelError,
    find_cross_attention_layers,
    selected_cross_attention,
)
from ..tokens import position_labels

PACK_ROOT = Path(__file__).resolve().parents[2]


def _comfy_candidates() -> list[Path]:
    found = []
    if os.environ.get("COMFYUI_PATH"):
        found.append(Path(os.environ["COMFYUI_PATH"]))
    found.append(PACK_ROOT.parent.parent)  # <ComfyUI>/custom_nodes/<pack>
    found.append(PACK_ROOT / ".comfyui")  # the development host (scripts/provision.sh)
    return found


def ensure_comfy_importable() -> Path:
    """Make `import comfy` work (inside ComfyUI it already does); force CPU where CUDA is absent."""
    if importlib.util.find_spec("comfy") is None:
        for root in _comfy_candidates():
            if (root / "comfy" / "model_management.py").is_file():
                sys.path.insert(0, str(root))
                break
        else:
            raise ImportError(
                "ComfyUI not found: set COMFYUI_PATH to a ComfyUI folder, or run `make provision`."
            )
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        if not torch.cuda.is_available():
            args.cpu = True  # must precede the first import of comfy.model_management
    import comfy.model_management

    return Path(comfy.model_management.__file__).resolve().parent.parent


# --- what the jobs need from MODEL / CLIP / VAE objects: the only reach into their internals -------


def unet(model) -> torch.nn.Module:
    """A MODEL's denoiser (ComfyUI's UNetModel)."""
    return model.model.diffusion_model


def vae_module(vae) -> torch.nn.Module:
    """A VAE's autoencoder (ComfyUI's AutoencoderKL)."""
    return vae.first_stage_model


def noise_schedule(model) -> torch.Tensor:
    """alphas_cumprod (T,) of the model's training noise schedule, from ComfyUI's model_sampling."""
    sigmas = model.model.model_sampling.sigmas.float()
    return 1.0 / (1.0 + sigmas**2)


def latent_scale(model) -> float:
    """The factor between VAE latents and the latents the UNet sees."""
    return float(model.model.latent_format.scale_factor)


def latent_channels(model) -> int:
    """Channels of the latents the UNet takes (4 for SD1.x / SD2.x / SDXL)."""
    return int(model.model.latent_format.latent_channels)


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer of the text encoder whose token ids the engine works on, and its special ids."""

    name: str  # ComfyUI's key for the encoder ("l" for SD1.x's CLIP-L)
    tokenizer: Any  # the Hugging Face CLIPTokenizer
    bos: int
    eos: int
    pad: int
    length: int  # tokens per chunk (77)


def tokenizer_info(clip) -> TokenizerInfo:
    """The first text encoder's tokenizer (SD1.x: CLIP-L; SD2.x: OpenCLIP-H) with its special ids."""
    name = next(iter(clip.tokenize("").keys()))
    inner = getattr(clip.tokenizer, f"clip_{name}")
    return TokenizerInfo(
        name=name,
        tokenizer=inner.tokenizer,
        bos=int(inner.start_token),
        eos=int(inner.end_token),
        pad=int(inner.pad_token),  # SD1.x pads with EOS; SD2.x and SDXL's clip_g with 0
        length=int(inner.max_length),
    )


def text_transformer(clip) -> torch.nn.Module:
    """The CLIP-L text transformer of SD1.x (and the lab): the module text-encoder training changes."""
    inner = getattr(clip.cond_stage_model, "clip_l", None)
    if inner is None:
        raise ValueError("text-encoder training supports SD1.x's CLIP-L text encoder; this CLIP has none")
    return inner.transformer


def frozen_text_copy(clip):
    """A copy of a CLIP whose text encoders are a frozen deep copy (the teacher of text-encoder training)."""
    teacher = copy.copy(clip)
    teacher.cond_stage_model = copy.deepcopy(clip.cond_stage_model).requires_grad_(False)
    return teacher


def chunk_ids(clip, prompt: str) -> list[int]:
    """The prompt's first-chunk token ids (BOS ... EOS, padded to the chunk length) as ComfyUI tokenizes it."""
    chunks = next(iter(clip.tokenize(prompt).values()))
    return [int(tok[0]) for tok in chunks[0]]


def prompt_chunks(clip, prompt: str) -> list[list[tuple[int | torch.Tensor, float, int]]]:
    """Every chunk of the prompt as ComfyUI's (first) tokenizer makes it: (token, weight, word id) per
    position, each chunk BOS ... EOS and padded (77 for CLIP), as comfy/sd1_clip.py's
    SDTokenizer.tokenize_with_weights returns them. Emphasis `(word:1.2)` is parsed into weights; an
    existing textual-inversion `embedding:name` comes as one tensor (C,) per position, one word id for
    all its vectors; a missing one is dropped with ComfyUI's own warning."""
    chunks = next(iter(clip.tokenize(prompt, return_word_ids=True).values()))
    return [
        [
            (tok[0] if isinstance(tok[0], torch.Tensor) else int(tok[0]), float(tok[1]), int(tok[2]))
            for tok in chunk
        ]
        for chunk in chunks
    ]


def embedding_names(clip, prompt: str) -> list[str]:
    """Names of the prompt's `embedding:name` tokens that ComfyUI finds (in prompt order): the embeddings
    prompt_chunks returns as tensors. Missing ones are left out, as ComfyUI ignores them."""
    import re

    inner = getattr(clip.tokenizer, f"clip_{tokenizer_info(clip).name}")
    if inner.embedding_directory is None:
        return []
    found = re.findall(r"(?:^|(?<=[\s(]))" + re.escape(inner.embedding_identifier) + r"([^\s(),]+)", prompt)
    names = [re.sub(r":[0-9.]+$", "", n) for n in found]  # `(embedding:name:1.2)` weighs it
    return [n for n in names if inner._try_get_embedding(n)[0] is not None]


def encode_prompts(clip, prompts: list[str]) -> torch.Tensor:
    """Cross-attention contexts (B x 77k x C) of prompts through ComfyUI's own encoder (no gradient)."""
    return encode_prompts_pooled(clip, prompts)[0]


def encode_prompts_pooled(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contexts (B x 77k x C) and, for families whose UNet takes it (SDXL), the pooled text embedding
    (B x P; None otherwise), through ComfyUI's own encoder."""
    rows, pooled = [], []
    for p in prompts:
        cond, pool = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        rows.append(cond)
        pooled.append(pool)
    wants_pooled = pooled[0] is not None and takes_pooled_text(clip)
    return torch.cat(rows), (torch.cat(pooled) if wants_pooled else None)


def takes_pooled_text(clip) -> bool:
    """Whether the CLIP's family feeds the pooled text embedding to the UNet (SDXL's clip_g does)."""
    return hasattr(clip.cond_stage_model, "clip_g")


def encode_first_chunks(clip, prompts: list[str]) -> torch.Tensor:
    """Contexts (B x 77 x C) of each prompt's first 77-token chunk through ComfyUI's own encoder."""
    rows = []
    for p in prompts:
        tokens = {k: v[:1] for k, v in clip.tokenize(p).items()}
        rows.append(clip.encode_from_tokens(tokens))
    return torch.cat(rows)


def encode_id_rows(clip, name: str, rows: list[list[int]], length: int) -> torch.Tensor:
    """Contexts (B x length x C) for explicit token-id rows of encoder `name`, in one batched CLIP call."""
    tokens = {name: [[(i, 1.0) for i in row] for row in rows]}
    out = clip.encode_from_tokens(tokens)  # sections come back side by side along the sequence
    return out.reshape(len(rows), length, -1).float()


def encode_token_ids(clip, ids: torch.Tensor) -> torch.Tensor:
    """The cross-attention context (B x 77 x C) of CLIP-L token ids, with gradient.

    ComfyUI's CLIPLayer adds residuals in place, which autograd rejects, so this walks the same
    modules out of place (a test checks it matches ComfyUI's encoder to 1e-5).
    """
    tm = text_transformer(clip).text_model
    x = tm.embeddings(ids, dtype=torch.float32)
    length = x.shape[1]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype).triu_(1)
    for layer in tm.encoder.layers:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (
            proj(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.out_proj(a.transpose(1, 2).flatten(2))
        x = x + layer.mlp(layer.layer_norm2(x))
    return tm.final_layer_norm(x)


def text_conditioning(clip, text: str) -> list:
    """CONDITIONING for a text, exactly as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def model_fingerprint(model, keys: int = 8) -> str:
    """A short hash of a few UNet tensors: what a saved profile or cache names its model by."""
    state = unet(model).state_dict()
    h = hashlib.sha256()
    for name in sorted(state)[:keys]:
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def clip_vision_embedder(clip_vision) -> Callable[[list], torch.Tensor]:
    """Image embeddings (B x D) from a ComfyUI CLIP_VISION model, for uint8 RGB images (H x W x 3)."""
    import numpy as np

    def embed(images: list) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).float() / 255.0
        with torch.no_grad():
            return clip_vision.encode_image(batch)["image_embeds"]

    return embed


# --- weights for freshly built modules (the lab, random-weight SD families) ----------------------


_INIT_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def initialise_weights(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give freshly built comfy modules real initial weights (comfy's ops skip init for speed)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in module.modules():
            for base in _INIT_TYPES:
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break
            else:
                if isinstance(m, torch.nn.Embedding):
                    torch.nn.init.normal_(m.weight, std=0.02)  # CLIP's initialisation
    finally:
        torch.random.set_rng_state(gen_state)
    return module


def sample(
    model,
    noise: torch.Tensor,
    latent: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    steps: int,
    cfg: float,
    sampler: str = "euler",
    scheduler: str = "normal",
    seed: int = 0,
    cond_extra: dict[str, Any] | None = None,
    uncond_extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sample latents with ComfyUI's own sampler (as KSampler does), batched per-item conditioning.

    cond_extra goes with the positive conditioning (e.g. {"pooled_output": ...} for SDXL), uncond_extra
    with the negative one (default: cond_extra)."""
    ensure_comfy_importable()
    import comfy.sample

    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        [[cond, dict(cond_extra or {})]],
        [[uncond, dict((cond_extra if uncond_extra is None else uncond_extra) or {})]],
        latent,
        disable_pbar=True,
        seed=seed,
    )


def _ksampler_call(
    model, noise, latent_image, seed, sampler: tuple, positive, negative, denoise, mask, callback
):
    """comfy.sample.sample as common_ksampler calls it; sampler = (steps, cfg, sampler_name, scheduler)."""
    import comfy.sample

    steps, cfg, sampler_name, scheduler = sampler
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise=denoise,
        noise_mask=mask,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def ksample(
    model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: list,
    negative: list,
    latent: dict[str, Any],
    denoise: float = 1.0,
    callback: Callable | None = None,
) -> torch.Tensor:
    """The stock KSampler's sampling (nodes.common_ksampler): same noise, noise mask and batch index."""
    ensure_comfy_importable()
    import comfy.sample

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sampler = (steps, cfg, sampler_name, scheduler)
    return _ksampler_call(
        model,
        noise,
        latent_image,
        seed,
        sampler,
        positive,
        negative,
        denoise,
        latent.get("noise_mask"),
        callback,
    )


def ksample_pair(
    model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive_a: list,
    positive_b: list,
    negative: list,
    latent: dict[str, Any],
    denoise: float = 1.0,
    callback: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two prompts from the same noise in one sampler call of twice the batch (rows a, then b), or None
    when the conditionings carry more than a text embedding and a pooled output (sample them apart)."""
    ensure_comfy_importable()
    import comfy.sample

    if len(positive_a) != 1 or len(positive_b) != 1:
        return None
    (cond_a, extra_a), (cond_b, extra_b) = positive_a[0], positive_b[0]
    if set(extra_a) != set(extra_b) or not set(extra_a) <= {"pooled_output"} or cond_a.shape[0] != 1:
        return None
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    b = latent_image.shape[0]
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    rows = lambda x, y: torch.cat([x.expand(b, *x.shape[1:]), y.expand(b, *y.shape[1:])])  # noqa: E731
    extra = {k: rows(extra_a[k], extra_b[k]) for k in extra_a}
    mask = latent.get("noise_mask")
    if mask is not None and mask.shape[0] == b and b > 1:
        mask = torch.cat([mask, mask])
    out = _ksampler_call(
        model,
        torch.cat([noise, noise]),
        torch.cat([latent_image, latent_image]),
        seed,
        (steps, cfg, sampler_name, scheduler),
        [[rows(cond_a, cond_b), extra]],
        negative,
        denoise,
        mask,
        callback,
    )
    return out[:b], out[b:]


def seeded_noise(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Per-item initial noise, each item as ComfyUI would make it from its own seed."""
    ensure_comfy_importable()
    import comfy.sample

    return torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])


def describe_model(model, clip=None) -> dict[str, Any]:
    """UNet family, cross-attention layers found by walking the model, and the tokenizer in use."""
    base = model.model
    unet = getattr(base, "diffusion_model", None)
    layers = find_cross_attention_layers(unet) if unet is not None else []
    info: dict[str, Any] = {
        "unet_family": type(base.model_config).__name__,
        "model_class": type(base).__name__,
        "prediction": getattr(base.model_type, "name", str(base.model_type)),
        "unet_parameters": sum(p.numel() for p in unet.parameters()) if unet is not None else 0,
        "cross_attention_layers": len(layers),
        "cross_attention_layer_names": [n for n, _ in layers],
        "context_dim": int(layers[0][1].to_k.in_features) if layers else None,
    }
    if clip is not None:
        info["text_encoders"] = describe_tokenizers(clip)
    return info


def describe_tokenizers(clip) -> list[dict[str, Any]]:
    """Each text encoder's tokenizer: name, class and vocabulary size."""
    out = []
    for name, tok in vars(clip.tokenizer).items():
        inner = getattr(tok, "tokenizer", None)
        if inner is None or not hasattr(inner, "get_vocab"):
            continue
        out.append(
            {
                "name": name,
                "tokenizer": type(inner).__name__,
                "vocab_size": len(inner.get_vocab()),
                "max_length": getattr(tok, "max_length", None),
            }
        )
    return out


# --- cross-attention capture -------------------------------------------------------------------


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
    """Batch rows of the conditional (positive) half; None when every row is conditional."""
    if not cond_or_uncond or all(c == 0 for c in cond_or_uncond):
        return None
    per = batch // len(cond_or_uncond)
    return torch.tensor(
        [i for i, c in enumerate(cond_or_uncond) if c == 0 for i in range(i * per, (i + 1) * per)]
    )


class ComfyCrossAttentionCapture:
    """An attn2 replace patch: ComfyUI's optimized attention computes the output; the maps go to a recorder.

    ComfyUI deep-copies model options on every clone; this patch and its recorder survive as themselves.
    """

    def __init__(self, recorder: CrossAttentionRecorder, layer: str, inner=None) -> None:
        from comfy.ldm.modules.attention import optimized_attention

        self.recorder, self.layer, self.inner = recorder, layer, inner
        self._attention = optimized_attention

    def __deepcopy__(self, memo: dict) -> ComfyCrossAttentionCapture:
        return self

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        rec = self.recorder
        step = rec.step_of(extra_options.get("sample_sigmas"), extra_options.get("sigmas"))
        if rec.wants(self.layer, step):
            shape = extra_options.get("original_shape") or extra_options["activations_shape"]
            rows = _conditional_rows(extra_options.get("cond_or_uncond"), q.shape[0])
            rec.record(self.layer, q, k, extra_options["n_heads"], (shape[-2], shape[-1]), step, rows)
        if self.inner is not None:  # another node's attn2 patch on this layer keeps working
            return self.inner(q, k, v, extra_options)
        return self._attention(
            q,
            k,
            v,
            extra_options["n_heads"],
            attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )


def attach_attention_recorder(model, recorder: CrossAttentionRecorder):
    """A clone of a ComfyUI MODEL whose selected cross-attention layers feed the recorder."""
    unet = getattr(model.model, "diffusion_model", None)
    family = type(model.model).__name__
    if unet is None:
        raise UnsupportedModelError(f"{family} has no diffusion_model to read cross-attention from")
    layers = selected_cross_attention(unet, recorder.settings, family)
    patched = model.clone()
    existing = (
        patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    )
    for name, _ in layers:
        key = attn2_patch_key(name)
        patched.set_model_attn2_replace(ComfyCrossAttentionCapture(recorder, name, existing.get(key)), *key)
    return patched


def clip_position_labels(clip, prompt: str) -> list[str]:
    """One label per conditioning position for this prompt, as ComfyUI's CLIP tokenizes it."""
    tokens = clip.tokenize(prompt)
    name, chunks = next(iter(tokens.items()))  # SDXL's g and l encoders see the same tokens
    inner = getattr(clip.tokenizer, f"clip_{name}", None) or next(
        t for t in vars(clip.tokenizer).values() if hasattr(t, "tokenizer")
    )
    ids = [int(tok[0]) for chunk in chunks for tok in chunk]
    return position_labels(inner.tokenizer, ids, inner.start_token, inner.end_token, chunk=len(chunks[0]))


def sample_prompts(
    model,
    clip,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    cfg: float = 1.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    latent_hw: tuple[int, int] = (8, 8),
) -> torch.Tensor:
    """Latents for per-item prompts and seeds in one batch, through ComfyUI's sampler."""
    cond, pooled = encode_prompts_pooled(clip, prompts)
    uncond, uncond_pooled = encode_prompts_pooled(clip, [""])
    uncond = uncond.repeat(len(prompts), 1, 1)
    latent = torch.zeros(len(prompts), 4, *latent_hw)
    noise = seeded_noise(latent, seeds)
    extra = {"pooled_output": pooled} if pooled is not None else None
    uncond_extra = (
        {"pooled_output": uncond_pooled.repeat(len(prompts), 1)} if uncond_pooled is not None else None
    )
    return sample(
        model, noise, latent, cond, uncond, steps, cfg, sampler, scheduler, seeds[0], extra, uncond_extra
    )


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
