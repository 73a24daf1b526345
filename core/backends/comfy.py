"""The ComfyUI backend: builds and reads ComfyUI MODEL/CLIP/VAE objects. Imports comfy lazily."""

from __future__ import annotations

import copy
import functools
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
                if (root / ".seal-deps").is_dir():  # a second host's own requirements (scripts/provision.sh)
                    sys.path.insert(0, str(root / ".seal-deps"))
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


def torch_device() -> torch.device:
    """The device ComfyUI computes on (its --cpu and device flags apply)."""
    ensure_comfy_importable()
    import comfy.model_management as mm

    return mm.get_torch_device()


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


# A textual-inversion vector has no vocabulary id: it gets one past the vocabulary, the same for the same
# vector all process long, so prompts and triggers that hold an embedding compare by ids as words do.
EMBEDDING_ID_BASE = 1 << 20  # above every CLIP vocabulary (49,408)
_embedding_ids: dict[str, int] = {}
_embedding_vectors: dict[int, dict[int, torch.Tensor]] = {}  # id -> {vector width: vector}


def embedding_id(vectors: list[torch.Tensor]) -> int:
    """The stable id of one embedding position, given its vector in each text encoder (SDXL: CLIP-L and
    CLIP-G, as their tokenizers hand them)."""
    first = vectors[0].detach().float().cpu()
    key = hashlib.sha256(first.numpy().tobytes()).hexdigest()
    if key not in _embedding_ids:
        _embedding_ids[key] = EMBEDDING_ID_BASE + len(_embedding_ids)
        _embedding_vectors[_embedding_ids[key]] = {
            int(v.shape[-1]): v.detach().float().cpu() for v in vectors
        }
    return _embedding_ids[key]


def is_embedding_id(token: int) -> bool:
    """Whether an id stands for a textual-inversion vector (embedding_id) rather than a vocabulary token."""
    return token >= EMBEDDING_ID_BASE


def id_chunks(clip, prompt: str) -> list[list[int]]:
    """Every chunk's token ids (BOS ... EOS, padded to the chunk length) as ComfyUI tokenizes the prompt
    (emphasis parsed out); an existing `embedding:name`'s vectors get embedding_id's ids."""
    tokenized = list(clip.tokenize(prompt).values())
    out = []
    for c, chunk in enumerate(tokenized[0]):
        row = []
        for p, tok in enumerate(chunk):
            if isinstance(tok[0], torch.Tensor):  # the same position in every encoder's tokens
                same = [t[c][p][0] for t in tokenized if c < len(t) and p < len(t[c])]
                row.append(embedding_id([v for v in same if isinstance(v, torch.Tensor)]))
            else:
                row.append(int(tok[0]))
        out.append(row)
    return out


def chunk_ids(clip, prompt: str) -> list[int]:
    """The prompt's first-chunk token ids (BOS ... EOS, padded to the chunk length) as ComfyUI tokenizes it
    (id_chunks: an embedding's vectors as embedding ids)."""
    return id_chunks(clip, prompt)[0]


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


def check_trigger_embeddings(clip, trigger: str) -> None:
    """Raise ValueError when the trigger names an `embedding:name` ComfyUI does not find (it would drop
    it silently, and the trigger would be nothing), naming the folders it looks in."""
    import re

    inner = getattr(clip.tokenizer, f"clip_{tokenizer_info(clip).name}")
    ident = getattr(inner, "embedding_identifier", "embedding:")
    typed = [
        re.sub(r":[0-9.]+$", "", n)
        for n in re.findall(r"(?:^|(?<=[\s(]))" + re.escape(ident) + r"([^\s(),]+)", trigger)
    ]
    found = set(embedding_names(clip, trigger))
    missing = [n for n in typed if n not in found]
    if not missing:
        return
    folders = inner.embedding_directory
    folders = [folders] if isinstance(folders, str) else list(folders or [])
    where = (
        f"in {', '.join(folders)} (models/embeddings and extra_model_paths.yaml's embeddings folders)"
        if folders
        else "anywhere: this CLIP's loader gave it no embeddings folder"
    )
    raise ValueError(
        f"the trigger {trigger!r} names the embedding {missing[0]!r}, which ComfyUI does not find {where}; "
        f"put {missing[0]}.safetensors there (or fix the name), or type the trigger's words instead"
    )


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


def encode_first_chunks(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contexts (B x 77 x C) of each prompt's first 77-token chunk through ComfyUI's own encoder, and the
    pooled embeddings (B x P) for families whose UNet takes them (SDXL), else None."""
    rows, pooled = [], []
    for p in prompts:
        tokens = {k: v[:1] for k, v in clip.tokenize(p).items()}
        cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
        rows.append(cond)
        pooled.append(pool)
    return torch.cat(rows), (torch.cat(pooled) if takes_pooled_text(clip) else None)


def encode_id_rows(clip, name: str, rows: list[list[int]], length: int) -> torch.Tensor:
    """Contexts (B x length x C) for explicit token-id rows of encoder `name`, in one batched CLIP call;
    for SDXL the rows feed both encoders and each context carries its pooled embedding as one more row
    (pack_pooled), since ComfyUI's encoder pools only a prompt's first chunk."""
    if takes_pooled_text(clip):
        if any(not isinstance(i, int) for row in rows for i in row):
            raise ValueError(
                "textual-inversion embeddings in SDXL prompts are not scored yet (CLIP-L and CLIP-G each need "
                "their own vectors); remove the embedding:name from the prompt to check the rest"
            )
        clip.load_model()
        ids = torch.tensor(rows, dtype=torch.long, device=_text_device(clip))
        with torch.no_grad():
            return pack_pooled(*encode_token_ids_pooled(clip, ids)).float()

    def token(i):  # an embedding id goes in as its vector, as ComfyUI's tokenizer hands it over
        if isinstance(i, int) and is_embedding_id(i):
            return next(iter(_embedding_vectors[i].values()))
        return i

    tokens = {name: [[(token(i), 1.0) for i in row] for row in rows]}
    out = clip.encode_from_tokens(tokens)  # sections come back side by side along the sequence
    return out.reshape(len(rows), length, -1).float()


def _text_device(clip) -> torch.device:
    return text_encoders(clip)[0][1].transformer.get_input_embeddings().weight.device


SUPPORTED_FAMILIES = "SD1.x, SD2.x (eps and v-prediction) and SDXL"


def supported_family(model) -> str:
    """The MODEL's family name (ComfyUI's model config class: "SD15", "SD20", "SDXL", ...).

    Raises UnsupportedModelError naming the family for what the pack does not handle: UNets without
    text cross-attention, DiT/MMDiT families (SD3, Flux), video and image-variation models, and UNets
    with extra conditioning other than SDXL's pooled text (unCLIP, the SDXL refiner)."""
    ensure_comfy_importable()
    import comfy.model_base

    base = model.model
    family = type(base.model_config).__name__
    unet = getattr(base, "diffusion_model", None)
    cross = find_cross_attention_layers(unet) if isinstance(unet, torch.nn.Module) else []
    if not cross or type(base) not in (comfy.model_base.BaseModel, comfy.model_base.SDXL):
        raise UnsupportedModelError(
            f"{family} ({type(base).__name__}) is not a model family backdoor-seal handles: it reads "
            f"{SUPPORTED_FAMILIES} UNets with text cross-attention"
        )
    return family


def text_encoders(clip) -> list[tuple[str, Any]]:
    """The CLIP's text encoders (ComfyUI SDClipModel objects) in the order their contexts sit side by
    side: [("l", CLIP-L)] for SD1.x, [("h", OpenCLIP-H)] for SD2.x, [("l", CLIP-L), ("g", CLIP-G)] for SDXL
    (comfy/sdxl_clip.py SDXLClipModel.encode_token_weights concatenates l then g).

    Raises UnsupportedModelError for text encoders that are not CLIP (T5, Llama: SD3, Flux, video)."""
    csm = clip.cond_stage_model
    found = [
        (n, getattr(csm, f"clip_{n}"))
        for n in ("l", "h", "g")
        if isinstance(getattr(csm, f"clip_{n}", None), torch.nn.Module)
    ]
    if not found:
        raise UnsupportedModelError(
            f"the text encoder {type(csm).__name__} is not one backdoor-seal handles: it reads CLIP text "
            "encoders (SD1.x CLIP-L, SD2.x OpenCLIP-H, SDXL CLIP-L + CLIP-G), not SD3, Flux or video models"
        )
    return found


def with_clip_skip(clip, skip: int):
    """A clone of the CLIP that encodes from layer -skip, as the stock CLIPSetLastLayer(-skip) makes it."""
    if skip < 1:
        raise ValueError(f"CLIP skip must be 1 or more (2 = the penultimate layer), got {skip}")
    layers = min(len(e.transformer.text_model.encoder.layers) for _, e in text_encoders(clip))
    if skip > layers:  # ComfyUI would fall back to the last layer without a word
        raise ValueError(f"CLIP skip {skip}: this text encoder has {layers} layers (SD1.5 fine-tunes use 2)")
    out = clip.clone()
    out.clip_layer(-skip)
    return out


def _context_layer(clip, encoder) -> tuple[int | None, bool]:
    """(index of the layer whose output is the context, None = the last; final norm on it) as ComfyUI's
    SDClipModel picks it (sd1_clip.py set_clip_options) with the CLIP's last-layer setting applied
    (CLIPSetLastLayer, "CLIP skip": sd.CLIP.encode_from_tokens sets it before every encode)."""
    layer, index, _ = encoder.options_default
    if clip.layer_idx is not None:
        layer, index = (
            ("last", None) if abs(clip.layer_idx) > encoder.num_layers else ("hidden", clip.layer_idx)
        )
    if layer == "last":
        return None, True
    if layer != "hidden" or index is None:
        raise UnsupportedModelError(f"a text encoder that outputs layer {layer!r} is not supported")
    return index % encoder.num_layers, bool(encoder.layer_norm_hidden_state)


def clip_skip(clip) -> int | None:
    """The CLIP's last-layer setting (CLIPSetLastLayer's stop_at_clip_layer, -2 = "CLIP skip 2"), or None."""
    return clip.layer_idx


def _walk_encoder(
    encoder, ids: torch.Tensor, stop: int | None, norm: bool, pooled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One CLIP text encoder out of place: (context B x L x C, projected pooled B x P or None)."""
    tm = encoder.transformer.text_model
    length = ids.shape[1]
    if length == tm.embeddings.position_embedding.weight.shape[0] and not is_embedding_id(int(ids.max())):
        x = tm.embeddings(ids, dtype=torch.float32)
    else:  # a prefix (encode_prefix_ids) or embedding ids: ComfyUI's CLIPEmbeddings adds all 77 positions
        pos = tm.embeddings.position_embedding.weight[:length]
        x = _token_rows(tm.embeddings.token_embedding, ids) + pos.to(ids.device, torch.float32)
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    layers = tm.encoder.layers
    last = len(layers) - 1 if (stop is None or pooled) else stop
    hidden = None
    for i, layer in enumerate(layers[: last + 1]):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (
            proj(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.out_proj(a.transpose(1, 2).flatten(2))
        x = x + layer.mlp(layer.layer_norm2(x))
        if i == stop:
            hidden = x
    context = tm.final_layer_norm(x) if stop is None else (tm.final_layer_norm(hidden) if norm else hidden)
    if not pooled:
        return context, None
    # ComfyUI pools at the first EOS (num_tokens - 1 in CLIPTextModel_.forward), then projects.
    eos = int(encoder.special_tokens["end"])
    first_eos = (ids == eos).int().argmax(-1)
    final = tm.final_layer_norm(x)
    return context, encoder.transformer.text_projection(final[torch.arange(len(ids)), first_eos])


def _token_rows(table, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B x L x C) of ids, an embedding id's rows being its vector of this width."""
    special = ids >= EMBEDDING_ID_BASE
    x = table(torch.where(special, torch.zeros_like(ids), ids), out_dtype=torch.float32)
    for i in ids[special].unique().tolist():
        vector = _embedding_vectors.get(int(i), {}).get(x.shape[-1])
        if vector is None:
            raise ValueError(
                f"a textual-inversion embedding in the prompts has no {x.shape[-1]}-wide vector for this text "
                "encoder (an embedding made for another model); remove its embedding:name from the prompts"
            )
        x = torch.where((ids == i).unsqueeze(-1), vector.to(x), x)
    return x


def _padded_for(ids: torch.Tensor, encoder) -> torch.Tensor:
    """Ids with everything after the first EOS set to this encoder's pad id (SDXL: clip_l pads with EOS,
    clip_g with 0; both tokenizers share one vocabulary, so the ids are otherwise the same)."""
    eos, pad = int(encoder.special_tokens["end"]), int(encoder.special_tokens["pad"])
    first_eos = (ids == eos).int().argmax(-1, keepdim=True)
    after = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) > first_eos
    return torch.where(after, torch.full_like(ids, pad), ids)


def encode_token_ids_pooled(clip, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cross-attention context (B x 77 x C) of one 77-token chunk of ids (B x 77, BOS ... EOS pad),
    with gradient, and the pooled text embedding (B x P) for families whose UNet takes it (SDXL), else None.

    Every text encoder of the family (SDXL: CLIP-L and CLIP-G side by side) at the layer ComfyUI
    encodes with, the CLIP's last-layer setting (CLIP skip) included. ComfyUI's CLIPLayer adds
    residuals in place, which autograd rejects, so this walks the same modules out of place (tests
    check it matches ComfyUI's own encoder to 1e-5 for SD1.x, SD2.x and SDXL, with CLIP skip)."""
    contexts, pooled = [], None
    wants_pooled = takes_pooled_text(clip)
    for name, encoder in text_encoders(clip):
        stop, norm = _context_layer(clip, encoder)
        rows = _padded_for(ids, encoder)
        context, pool = _walk_encoder(encoder, rows, stop, norm, pooled=wants_pooled and name == "g")
        contexts.append(context)
        pooled = pool if pool is not None else pooled
    return torch.cat(contexts, -1), pooled


PREFIX_CHUNK_ELEMENTS = 1 << 20  # MLP activations per chunk of encode_prefix_ids (fp32: 4 MB)


def encode_prefix_ids(clip, ids: torch.Tensor) -> torch.Tensor:
    """The context rows (B x L x C) of unpadded prompt prefixes (B x L ids, BOS first, 1 <= L <= 77), with
    no gradient: exactly the first L rows of the full chunk's encoding, whatever follows, because CLIP's
    self-attention is causal (every encoder of the family, at its context layer, CLIP skip included).
    A vocabulary-wide pass costs L positions per token instead of 77."""
    if not 1 <= ids.shape[1] <= 77:
        raise ValueError(f"prefixes of 1 to 77 tokens, got {ids.shape[1]}")
    clip.load_model()  # this CLIP's patches (a LoRA) into the shared modules, as CLIPTextEncode does
    with torch.no_grad():
        contexts = []
        for _name, encoder in text_encoders(clip):
            stop, norm = _context_layer(clip, encoder)
            # the MLP's activations are memory-bound: chunks whose hidden rows stay near 4 MB run twice
            # as fast on a CPU as one batch of thousands (measured on the lab CLIP, 2 cores)
            hidden = encoder.transformer.text_model.encoder.layers[0].mlp.fc1.weight.shape[0]
            rows = max(8, PREFIX_CHUNK_ELEMENTS // (ids.shape[1] * hidden))
            parts = [
                _walk_encoder(encoder, ids[k : k + rows], stop, norm, pooled=False)[0]
                for k in range(0, len(ids), rows)
            ]
            contexts.append(torch.cat(parts))
        return torch.cat(contexts, -1)


def encode_token_ids(clip, ids: torch.Tensor) -> torch.Tensor:
    """The cross-attention context (B x 77 x C) of token ids, with gradient (see encode_token_ids_pooled)."""
    return encode_token_ids_pooled(clip, ids)[0]


# The pooled text embedding of SDXL travels with its context as one extra row after the tokens
# (zero-padded to the context width), so jobs can batch, index and pass contexts as one tensor.


def pack_pooled(context: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """Context (B x L x C) with the pooled embedding (B x P, P <= C) as row L; unchanged when pooled is None."""
    if pooled is None:
        return context
    row = F.pad(pooled.to(context.dtype), (0, context.shape[-1] - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([context, row], 1)


def unet_conditioning(model, packed: torch.Tensor, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The UNet's conditioning inputs for a (packed) context: c_crossattn, and for SDXL the ADM vector y
    that ComfyUI's sampler builds from the pooled embedding and the image size (model_base.SDXL.encode_adm,
    samplers.encode_model_conds: width/height = latent x 8, no crop)."""
    base = model.model
    if not getattr(base, "adm_channels", 0):
        return {"c_crossattn": packed}
    supported_family(model)
    pooled_width = int(base.adm_channels) - 6 * 256  # SDXL: clip_g's projection + six size embeddings
    context, pooled = packed[:, :-1], packed[:, -1, :pooled_width]
    h, w = latent_hw
    y = base.encode_adm(
        pooled_output=pooled,
        width=w * 8,
        height=h * 8,
        target_width=w * 8,
        target_height=h * 8,
        device=packed.device,
    )
    return {"c_crossattn": context, "y": y.to(packed.device, packed.dtype)}


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


_FOLD = 4099  # a prime: a weight change goes unseen only if its folded vector is orthogonal to a random one


@functools.cache
def _fold_weights(device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(_FOLD, generator=gen, dtype=torch.float64).to(device)


def _tensor_digest(t: torch.Tensor) -> str:
    """Shape, sum and one random projection of a tensor, computed where it lives (no copy to the CPU)."""
    x = t.detach().reshape(-1).to(torch.float64)
    folded = F.pad(x, (0, (-x.numel()) % _FOLD)).view(-1, _FOLD).sum(0)
    proj = float(folded @ _fold_weights(str(x.device)))
    return f"{tuple(t.shape)}:{t.dtype}:{float(x.sum()):.10e}:{proj:.10e}"


def _patch_digest(item: Any) -> str:
    """A LoRA / weight-adapter patch entry (tuples of strengths, tensors and adapter objects) as text."""
    if isinstance(item, torch.Tensor):
        return _tensor_digest(item)
    if isinstance(item, (tuple, list)):
        return "(" + ",".join(_patch_digest(i) for i in item) + ")"
    if item is None or isinstance(item, (bool, int, float, str)):
        return repr(item)
    weights = getattr(item, "weights", None)  # comfy.weight_adapter's adapters keep their tensors here
    return type(item).__name__ + (_patch_digest(weights) if weights is not None else "")


def _patcher_digest(h, patcher, root: torch.nn.Module) -> None:
    backup = getattr(patcher, "backup", {}) or {}  # a loaded model is patched in place; its originals
    patches = getattr(patcher, "patches", {}) or {}
    for name, tensor in sorted(root.state_dict().items()):
        base = backup[name].weight if name in backup else tensor
        h.update(f"{name}={_tensor_digest(base)}".encode())
        if name in patches:
            h.update(_patch_digest(patches[name]).encode())


def weights_fingerprint(model, clip=None) -> str:
    """What the model computes, as a hash: every UNet and text-encoder tensor (the original of an in-place
    patched one), every LoRA patch with its strengths, the prediction type and CLIP skip. Two models share it
    only if their weights and patches are equal (up to rounding at 10 significant digits). Seconds on a
    full-size SD1.5 on a CPU; what a cache of per-model work (the prompt detector's calibration) is keyed by.
    Attention patches of other nodes are named by type only."""
    h = hashlib.sha256()
    with torch.no_grad():
        base = model.model
        h.update(f"{type(base).__name__}:{getattr(base, 'model_type', None)}".encode())
        h.update(type(getattr(base, "model_sampling", None)).__name__.encode())
        _patcher_digest(h, model, base)
        topts = model.model_options.get("transformer_options", {})
        for group in ("patches", "patches_replace"):
            for k, v in sorted((topts.get(group) or {}).items()):
                h.update(f"{group}.{k}:{sorted(map(str, v)) if isinstance(v, dict) else len(v)}".encode())
        if clip is not None:
            h.update(f"clip_layer={getattr(clip, 'layer_idx', None)}".encode())
            _patcher_digest(h, clip.patcher, clip.cond_stage_model)
    return h.hexdigest()


def with_eager_attention(model):
    """A clone whose every attention (self and cross) computes its softmax probabilities explicitly
    (ComfyUI's attention_basic), as the reference SKD-CAG code's eager processors do so it can store maps;
    the input MODEL keeps its fused kernels. ComfyUI >= 0.3.6x's optimized_attention_override."""
    ensure_comfy_importable()
    import comfy.ldm.modules.attention as attention

    def eager(func, *args, **kwargs):
        return attention.attention_basic(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"] = {
        **m.model_options.get("transformer_options", {}),
        "optimized_attention_override": eager,
    }
    return m


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


def clip_position_labels(clip, prompt: str) -> list[str]:
    """One label per conditioning position for this prompt, as ComfyUI's CLIP tokenizes it."""
    name = next(iter(clip.tokenize("").keys()))  # SDXL's g and l encoders see the same tokens
    inner = getattr(clip.tokenizer, f"clip_{name}", None) or next(
        t for t in vars(clip.tokenizer).values() if hasattr(t, "tokenizer")
    )
    rows = id_chunks(clip, prompt)
    names = embedding_names(clip, prompt)
    special: dict[int, str] = {}  # an embedding's vectors read as its `embedding:name`
    words: list[int] = []
    for chunk, row in zip(prompt_chunks(clip, prompt), rows, strict=True):
        for (_, _, word), token in zip(chunk, row, strict=True):
            if is_embedding_id(token):
                words += [word] if word not in words else []
                g = words.index(word)
                special.setdefault(token, f"embedding:{names[g]}" if g < len(names) else "embedding")
    ids = [i for row in rows for i in row]
    return position_labels(
        inner.tokenizer, ids, inner.start_token, inner.end_token, chunk=len(rows[0]), special=special
    )


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
