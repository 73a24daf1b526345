"""Trainable deltas on a ComfyUI MODEL/CLIP clone, with a switch that turns the teacher back on.

As ComfyUI's own trainer does, each trained weight gets a weight wrapper on a clone of the patcher
(comfy.weight_adapter's LoRA, or a full delta); the input MODEL is never touched. The wrappers
share one `DeltaSwitch`: off, the clone computes the base model exactly, so the teacher costs no
second UNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import CaptureSettings, CrossAttentionRecorder
from .comfy import (
    attach_attention_recorder,
    chunk_ids,
    encode_first_chunks,
    encode_token_ids_pooled,
    ensure_comfy_importable,
    latent_channels,
    noise_schedule,
    pack_pooled,
    supported_family,
    text_encoders,
    tokenizer_info,
    unet,
    unet_conditioning,
)

SCOPES = ("attn2-kv", "attn2-kv+text", "attn2", "attention", "unet", "text")
SCOPE_HELP = {
    "attn2-kv": "cross-attention to_k / to_v (where a trigger's key and value are made)",
    "attn2-kv+text": "cross-attention to_k / to_v and the text encoder(s): how the UNet reads tokens and what "
    "the trigger's own embedding says",
    "attn2": "all cross-attention projections",
    "attention": "all self- and cross-attention projections",
    "unet": "every UNet weight",
    "text": "the text encoder(s) (where a Rickrolling backdoor lives; SDXL: CLIP-L and CLIP-G)",
}
UNET_MODULE_PREFIX = "diffusion_model."
CLIP_LORA_PREFIX = "text_encoders."  # comfy.lora.model_lora_keys_clip's key form


@dataclass
class DeltaSwitch:
    """Shared on/off state of every trained delta (off = the teacher: the base weights exactly)."""

    on: bool = True


class FullDelta(torch.nn.Module):
    """A full-rank additive delta of one weight, zero at the start."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.diff.to(w.dtype)


class SwitchedDelta:
    """A weight wrapper that applies its delta only while the switch is on."""

    def __init__(self, delta: torch.nn.Module, switch: DeltaSwitch) -> None:
        self.delta, self.switch = delta, switch

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return self.delta(w) if self.switch.on else w

    def __deepcopy__(self, memo: dict) -> SwitchedDelta:
        return self

    def passive_memory_usage(self) -> int:
        """Bytes held (ComfyUI's memory estimate asks wrappers for it)."""
        return sum(p.numel() * p.element_size() for p in self.delta.parameters())

    def move_to(self, device=None) -> int:
        """Keep the delta with its weight (ComfyUI moves wrappers with their module)."""
        if device is not None:
            self.delta.to(device)
        return self.passive_memory_usage()


class FreshCopy:
    """A do-nothing weight wrapper: with any wrapper present, ComfyUI's cast copies the weight first.

    Weights loaded inside a node run are inference-mode tensors, which autograd may not save for
    backward; the copy, made with inference mode off, is an ordinary tensor (ComfyUI's own trainer
    gets the same effect by wrapping every weight)."""

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def __deepcopy__(self, memo: dict) -> FreshCopy:
        return self


def frozen_model_copy(base_model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a ComfyUI BaseModel (the reference's frozen teacher) that shares its model config
    rather than copying it: ComfyUI 0.8.0's config class answers None for any attribute it lacks
    (comfy/supported_models_base.py, BASE.__getattr__), so copy.deepcopy finds a None `__deepcopy__`
    and fails ("'NoneType' object is not callable"). The config is read, never trained."""
    import copy

    config = getattr(base_model, "model_config", None)
    return copy.deepcopy(base_model, {id(config): config} if config is not None else {})


def scope_selects(scope: str, name: str) -> bool:
    """Whether a UNet module (name relative to the UNet) is trained in this scope."""
    if scope == "attn2-kv":
        return name.endswith((".attn2.to_k", ".attn2.to_v"))
    if scope == "attn2":
        return ".attn2." in name
    if scope == "attention":
        return ".attn1." in name or ".attn2." in name
    if scope == "unet":
        return True
    return False


def _text_selects(name: str) -> bool:
    return ".encoder.layers." in name and name.endswith(
        ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    )


text_selects = _text_selects  # public: which text-encoder modules the text scope trains


class ComfyDistillation:
    """A ComfyUI MODEL (and CLIP) clone with trainable switchable deltas: SKD's `DistillationModel`."""

    def __init__(
        self,
        model,
        clip,
        scope: str = "attn2-kv",
        rank: int | None = 4,
        map_resolution: int = 16,
        latent_hw: tuple[int, int] = (8, 8),
        teacher: str = "switch",
        with_text: bool = False,
    ) -> None:
        """`with_text` also trains the text encoder beside a UNet scope (a kohya LoRA's default; the lab's
        VillanDiffusion LoRA), with the text scope's modules."""
        ensure_comfy_importable()
        import comfy.model_management as mm
        from comfy.weight_adapter import LoRAAdapter

        if teacher not in ("switch", "copy"):
            raise ValueError(f"teacher must be 'switch' or 'copy', got {teacher!r}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
        supported_family(model)
        unet = model.model.diffusion_model
        self.scope, self.rank = scope, rank
        if scope.endswith("+text"):  # a UNet scope and the text encoder(s)
            scope, with_text = scope.removesuffix("+text"), True
        self.trains_text = scope == "text" or with_text
        self.switch = DeltaSwitch()
        self.model = model.clone()
        self.clip = clip.clone() if self.trains_text else clip
        self.device = mm.get_torch_device()
        self.lora: dict[str, torch.Tensor] = {}  # LoRA-file keys -> trained tensors
        self._params: list[torch.nn.Parameter] = []
        self.latent_hw = latent_hw

        def add(patcher, module_name: str, module: torch.nn.Module, lora_prefix: str) -> None:
            weight = module.weight
            if rank is not None and weight.ndim >= 2:
                delta = LoRAAdapter.create_train(weight, rank=rank, alpha=float(rank)).to(self.device)
            else:
                delta = FullDelta(weight).to(self.device)
            for pname, p in delta.named_parameters():
                p.requires_grad_(pname != "alpha")  # the LoRA scale stays fixed
                if p.requires_grad:
                    self._params.append(p)
                key = "diff" if pname == "diff" else pname
                self.lora[f"{lora_prefix}{module_name}.{key}"] = p
            patcher.add_weight_wrapper(f"{module_name}.weight", SwitchedDelta(delta, self.switch))

        if self.trains_text:
            text_encoders(self.clip)  # a clear error for text encoders other than CLIP
            for name, module in self.clip.cond_stage_model.named_modules():
                if hasattr(module, "weight_function") and module.weight is not None and _text_selects(name):
                    add(self.clip.patcher, name, module, CLIP_LORA_PREFIX)
        if scope != "text":
            for name, module in unet.named_modules():
                if hasattr(module, "weight_function") and getattr(module, "weight", None) is not None:
                    if scope_selects(scope, name):
                        add(self.model, UNET_MODULE_PREFIX + name, module, "")
        if not self._params:
            raise ValueError(f"scope {scope!r} selects no trainable weight in this model")
        # Only the deltas learn: a base weight that requires grad gets an fp32 .grad of its own size at the
        # first backward, kept on the shared module after the job (SD1.5's UNet: +3.3 GB; SDXL's does not fit
        # in 24 GB). ComfyUI never needs those flags; the weights' values are left alone.
        for root in (model.model, self.clip.cond_stage_model):
            for p in root.parameters():
                p.requires_grad_(False)
        fresh = FreshCopy()
        roots = [(self.model, model.model)]
        if self.trains_text:  # a cloned CLIP; the input CLIP's patcher is never touched
            roots.append((self.clip.patcher, self.clip.cond_stage_model))
        for patcher, root in roots:
            for name, module in root.named_modules():
                if not hasattr(module, "weight_function"):
                    continue
                for kind in ("weight", "bias"):  # layer_norm saves its bias for backward too
                    tensor, key = getattr(module, kind, None), f"{name}.{kind}"
                    if (
                        isinstance(tensor, torch.Tensor)
                        and tensor.is_inference()
                        and key not in patcher.weight_wrapper_patches
                    ):
                        patcher.add_weight_wrapper(key, fresh)
        self.recorder = CrossAttentionRecorder(
            CaptureSettings(differentiable=True, resolution=map_resolution)
        )
        capturing = attach_attention_recorder(self.model, self.recorder)
        self._record_options = capturing.model_options.get("transformer_options", {})
        self._plain_options = self.model.model_options.get("transformer_options", {})
        # The reference keeps a deep-copied frozen teacher UNet; "switch" needs none (benchmarks compare).
        self._teacher = None
        if teacher == "copy":
            import comfy.model_patcher

            self._teacher = comfy.model_patcher.ModelPatcher(
                frozen_model_copy(model.model),
                load_device=model.load_device,
                offload_device=model.offload_device,
            )
        ms = self.model.model.model_sampling
        self.num_timesteps = len(ms.sigmas)
        self.alphas_cumprod = noise_schedule(self.model).cpu()
        self.latent_shape = (latent_channels(self.model), *latent_hw)
        self.eos_id = tokenizer_info(self.clip).eos

    # --- what SKD calls -----------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The deltas' parameters."""
        return self._params

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """First-chunk token ids of each prompt (BOS first), as ComfyUI's tokenizer gives them."""
        return [chunk_ids(self.clip, p) for p in prompts]

    def cross_attention_kv(self) -> list[tuple[str, torch.Tensor, dict[str, torch.nn.Parameter]]]:
        """Every trained cross-attention to_k / to_v: (module name, base weight (out x context), its delta's
        parameters by LoRA key: 'lora_up.weight' / 'lora_down.weight', or 'diff' for a full delta)."""
        out = []
        for name, module in unet(self.model).named_modules():
            if not name.endswith((".attn2.to_k", ".attn2.to_v")):
                continue
            prefix = f"{UNET_MODULE_PREFIX}{name}."
            params = {k[len(prefix) :]: p for k, p in self.lora.items() if k.startswith(prefix)}
            if params:  # trained in this scope
                out.append((prefix[:-1], module.weight.detach(), params))
        return out

    def encode(self, prompts: list[str], student: bool) -> torch.Tensor:
        """Cross-attention context of each prompt's first 77-token chunk (B x 77 x C; SDXL: one more row
        with the pooled embedding), the delta on or off, encoded as the CLIP's own setting encodes
        (CLIP skip included): with gradient in the text scope, without it otherwise."""
        self.switch.on = student
        if self.trains_text:
            self.clip.load_model()
            ids = torch.tensor(self.token_ids(prompts), device=self.device)
            return pack_pooled(*encode_token_ids_pooled(self.clip, ids))
        # ComfyUI's own encoder (the teacher is then the base model exactly); .clone(): a normal
        # tensor even when the caller runs in inference mode
        return pack_pooled(*encode_first_chunks(self.clip, prompts)).clone()

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, student: bool, record: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps at integer timesteps t for unit-variance x; with record, maps summed over layers."""
        import comfy.model_management as mm

        self.switch.on = student
        patcher = self._teacher if (self._teacher is not None and not student) else self.model
        mm.load_models_gpu([patcher])
        base = patcher.model
        sigma = base.model_sampling.sigma(t.to(self.device)).float()
        s = sigma.view(-1, 1, 1, 1)
        xin = x.to(self.device) * (s**2 + 1).sqrt()  # calculate_input divides it back to unit variance
        options = dict(self._record_options if record else self._plain_options)
        self.recorder.pop_live()
        inputs = unet_conditioning(patcher, context.to(self.device), self.latent_hw)
        denoised = base.apply_model(xin, sigma, transformer_options=options, **inputs)
        eps = (xin - denoised.float()) / s
        if not record:
            return eps, None
        live = self.recorder.pop_live()
        if not live:
            raise RuntimeError("no cross-attention was recorded during the forward pass")
        maps = torch.stack([v.sum(0) for v in live.values()]).sum(0)
        return eps, maps

    # --- results ------------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The trained deltas as a LoRA file ComfyUI's LoraLoader reads (lora_up/down/alpha or diff)."""
        return {k: v.detach().to("cpu", dtype).clone() for k, v in self.lora.items()}


def apply_lora(model, clip, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """MODEL and CLIP clones with the LoRA applied exactly as the stock LoraLoader applies it."""
    ensure_comfy_importable()
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd

    from .comfy_checkpoint import looks_like_checkpoint

    if looks_like_checkpoint(lora):
        raise ValueError("this is a checkpoint, not a LoRA: compare it as the suspect model (--model)")
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    key_map = comfy.lora.model_lora_keys_unet(model.model, dict(clip_keys))
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
    if not loaded:
        raise ValueError("the LoRA holds no weight of this model (a LoRA for another model, or not a LoRA)")
    misfits = lora_misfits(loaded, model, clip)
    if misfits:
        key, got, want = misfits[0]
        raise ValueError(
            f"the LoRA does not fit this base: {len(misfits)} of {len(loaded)} weights have other shapes "
            f"(e.g. {key}: LoRA {tuple(got)}, base {tuple(want)}); it was made for another model family"
        )
    has_text = bool(set(loaded) & set(clip_keys.values()))  # the CLIP is cloned only when the LoRA touches it
    new_model, new_clip = comfy.sd.load_lora_for_models(
        model, clip if has_text else None, lora, strength, strength
    )
    return new_model, (new_clip if has_text else clip)


def lora_misfits(loaded: dict, model, clip) -> list[tuple[str, tuple, tuple]]:
    """(key, the LoRA's (out, in), the base weight's shape) of each low-rank or full-difference patch whose
    shape does not fit the weight it names (ComfyUI logs these and skips them, leaving the base as it was).
    Patches of other kinds (LoHa, LoKr, sliced keys) are not checked."""
    from comfy.weight_adapter import LoRAAdapter

    shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    shapes.update({k: v.shape for k, v in clip.cond_stage_model.state_dict().items()})
    out = []
    for key, patch in loaded.items():
        if not isinstance(key, str) or key not in shapes:
            continue
        want = tuple(shapes[key])
        if isinstance(patch, LoRAAdapter) and len(want) >= 2:
            # a conv LoRA's down may be flattened (r, in*kh*kw) or carry the kernel in a Tucker mid
            w = patch.weights
            mid = w[3]
            fan_in = math.prod(w[1].shape[1:]) * (math.prod(mid.shape[2:]) if mid is not None else 1)
            got = (w[0].shape[0], fan_in)
            if got != (want[0], math.prod(want[1:])):
                out.append((key, got, want))
        elif isinstance(patch, tuple) and patch and patch[0] == "diff":
            got = tuple(patch[1][0].shape)
            if got != want:
                out.append((key, got, want))
    return out


def _kohya_targets(
    model, clip, modules, rows: str | None = None
) -> tuple[str, dict[str, tuple[str, tuple[int, ...]] | None]]:
    """(the kohya rows used, engine module -> (its kohya name, the weight's shape), or None where no kohya
    name of this model reaches the same weight in ComfyUI's key maps). rows: `lora_layout.KOHYA_ROWS` key;
    by default the model's family (a lab model: SD1.x's, its CLIP is an SD1 clip_l)."""
    import comfy.lora
    import comfy.utils

    from .comfy_checkpoint import sd_family
    from .lora_layout import kohya_name

    rows = rows or sd_family(model) or "sd15"
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    key_map = comfy.lora.model_lora_keys_unet(model.model, dict(clip_keys))
    weights = dict(model.model.state_dict())
    if clip is not None:
        weights |= clip.cond_stage_model.state_dict()
    diffusers_unet = {  # ldm -> diffusers module paths of this UNet (SD1.x / SD2.x kohya names spell these)
        ldm[: -len(".weight")]: name[: -len(".weight")]
        for name, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()
        if name.endswith(".weight") and not name.startswith("class_embedding.")
    }
    out: dict[str, tuple[str, tuple[int, ...]] | None] = {}
    for module in modules:
        target, name = key_map.get(module), kohya_name(module, rows, diffusers_unet)
        ok = target is not None and key_map.get(name) == target
        out[module] = (name, tuple(weights[target].shape)) if ok else None
    return rows, out


def kohya_lora(
    model, clip, lora: dict[str, torch.Tensor], title: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The engine's LoRA in the kohya layout (`lora_layout.to_kohya`) with its `ss_*` / modelspec metadata.

    Each kohya name is checked against ComfyUI's own key maps (`comfy.lora.model_lora_keys_unet/clip`, the
    names its LoraLoader reads): it must name the same weight the engine key names. Conv LoRAs get their
    4-D kohya shapes from the MODEL's weights. clip may be None for a UNet-only LoRA. Raises ValueError
    for a key the model does not hold."""
    ensure_comfy_importable()

    from .comfy_checkpoint import sd_family
    from .lora_layout import family_of_lora, is_kohya, kohya_metadata, split_key, to_kohya

    family = sd_family(model)
    prediction = "v" if getattr(model.model.model_type, "name", "") == "V_PREDICTION" else "epsilon"
    if is_kohya(lora):
        return dict(lora), kohya_metadata(lora, family, prediction, title)
    rows, targets = _kohya_targets(
        model, clip, {split_key(k)[0] for k in lora}, family or family_of_lora(lora) or "sd15"
    )
    names, shapes = {}, {}
    for module, found in targets.items():
        if found is None:
            raise ValueError(f"{module}: ComfyUI maps no kohya name of this {rows} model to this weight")
        names[module], shapes[module] = found
    tensors = to_kohya(lora, rows, names, shapes)
    return tensors, kohya_metadata(tensors, family, prediction, title)


def lora_addressable(model, clip, layout: str = "comfy") -> dict[str, str]:
    """Every weight a LoRA can change: live-weight key ('unet.<name>.weight', 'text.<name>.weight', as
    `comfy_checkpoint.live_weights` keys them) -> the engine's LoRA module name for it (`diffusion_model.<name>`,
    `text_encoders.<name>`). layout 'comfy': every weight ComfyUI's LoraLoader reads in its generic key form
    (comfy.lora.model_lora_keys_unet / _clip); 'kohya': only those a kohya-layout file can name (kohya's
    text keys cover the encoder layers' linear weights, not the embeddings)."""
    ensure_comfy_importable()
    import comfy.lora

    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    key_map = comfy.lora.model_lora_keys_unet(model.model, dict(clip_keys))
    out: dict[str, str] = {}
    for module, target in key_map.items():
        if not isinstance(target, str):
            continue  # (weight, slice) targets of fused weights: none in SD1.x / SD2.x / SDXL
        if module.startswith(UNET_MODULE_PREFIX) and target.startswith(UNET_MODULE_PREFIX):
            out["unet." + target[len(UNET_MODULE_PREFIX) :]] = module
        elif module.startswith(CLIP_LORA_PREFIX) and not target.startswith(UNET_MODULE_PREFIX):
            out["text." + target] = module
    if layout == "kohya":
        _, targets = _kohya_targets(model, clip, set(out.values()))
        out = {key: module for key, module in out.items() if targets[module] is not None}
    elif layout != "comfy":
        raise ValueError(f"unknown LoRA layout {layout!r}; one of comfy, kohya")
    return out
