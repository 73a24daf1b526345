"""Images between their forms: uint8 H x W x 3 arrays, [-1, 1] B x 3 x H x W tensors, ComfyUI IMAGE tensors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 H x W x 3 images -> float B x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[np.ndarray]:
    """B x 3 x H x W in [-1, 1] (or a ComfyUI IMAGE, B x H x W x 3 in [0, 1]) -> uint8 H x W x 3 images."""
    if x.shape[-1] == 3:
        arr = x.clamp(0, 1).mul(255).round().byte().cpu().numpy()
    else:
        arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """The first image of a ComfyUI IMAGE (B x H x W x 3 in [0, 1]) as uint8 H x W x 3."""
    return (image[0].detach().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 H x W x 3 image as PNG atomically; an existing file is refused, never replaced."""
    from PIL import Image

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another name or folder (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.link(tmp, path)  # fails if another writer created the file meanwhile
    finally:
        os.unlink(tmp)
    return path
