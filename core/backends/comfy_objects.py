"""The ComfyUI host and what the jobs read from its MODEL / CLIP / VAE objects: finding ComfyUI, the
device, the denoiser, the noise schedule, the tokenizer, the family, fresh weights for built modules."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention import UnsupportedModelError, find_cross_attention_layers
from ..comfy_host import HOST_DEPS

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
                if (root / HOST_DEPS).is_dir():  # a second host's own requirements
                    sys.path.insert(0, str(root / HOST_DEPS))
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


def torch_device() -> torch.device:
    """The device ComfyUI computes on (its --cpu and device flags apply)."""
    ensure_comfy_importable()
    import comfy.model_management as mm

    return mm.get_torch_device()


def unet(model) -> torch.nn.Module:
    """A MODEL's denoiser (ComfyUI's UNetModel)."""
    return model.model.diffusion_model


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
