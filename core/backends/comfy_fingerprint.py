"""Fingerprints of a MODEL's (and CLIP's) weights as patched: cache keys that change when any weight does."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from .comfy_objects import unet


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
