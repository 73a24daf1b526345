"""Text encoding as ComfyUI encodes: prompts to token ids (textual-inversion embeddings as ids past the
vocabulary), contexts with and without gradient, CLIP skip, SDXL's pooled embedding."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import UnsupportedModelError
from ..tokens import position_labels
from .comfy_objects import tokenizer_info

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


def pack_pooled(context: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """Context (B x L x C) with the pooled embedding (B x P, P <= C) as row L; unchanged when pooled is None."""
    if pooled is None:
        return context
    row = F.pad(pooled.to(context.dtype), (0, context.shape[-1] - pooled.shape[-1])).unsqueeze(1)
    return torch.cat([context, row], 1)


def text_conditioning(clip, text: str) -> list:
    """CONDITIONING for a text, exactly as the stock CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


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
