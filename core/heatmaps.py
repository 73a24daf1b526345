"""Per-token attention overlays: one row per image, one labelled tile per prompt token."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .attention import AttentionMaps

SPECIAL = ("<BOS>", "<EOS>", "<pad>")


def display_label(label: str) -> str:
    """A label the default font can draw: non-ASCII characters as <U+XXXX>, so homoglyphs show."""
    return "".join(c if c.isascii() else f"<U+{ord(c):04X}>" for c in label)


def token_positions(labels: list[str], max_tokens: int, include_special: bool = False) -> list[int]:
    """Positions to show: the prompt's tokens (BOS..EOS exclusive), optionally BOS and EOS too."""
    hidden = ("<pad>",) if include_special else SPECIAL
    return [i for i, lab in enumerate(labels) if lab not in hidden][:max_tokens]


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def overlay_grid(
    maps: AttentionMaps,
    images: torch.Tensor,
    max_tokens: int = 8,
    opacity: float = 0.6,
    colormap: str = "inferno",
    tile: int = 128,
    include_special: bool = False,
) -> torch.Tensor:
    """An IMAGE (1 x H x W x 3, 0..1) grid: per image, the image and one overlay per token, labelled."""
    combined, images = maps.combined().detach().cpu(), images.detach().cpu()
    n_maps, n_img = combined.shape[0], images.shape[0]
    if n_maps not in (1, n_img):
        raise ValueError(
            f"{n_img} images but attention for {n_maps}: connect the images decoded from the captured sampling"
        )
    labels = maps.labels or [[f"#{i}" for i in range(combined.shape[1])]]
    cmap = _colormap(colormap)
    font = ImageFont.load_default(size=max(10, tile // 9))
    label_h = tile // 5
    rows = []
    for b in range(n_img):
        item_labels = labels[min(b, len(labels) - 1)]
        positions = token_positions(item_labels, max_tokens, include_special)
        m = combined[min(b, n_maps - 1), positions] if positions else combined[:0, 0]
        image = F.interpolate(images[b : b + 1].movedim(-1, 1).float(), size=(tile, tile), mode="bilinear")
        image = image[0].movedim(0, -1).clamp(0, 1).numpy()
        tiles = [(image, "image")]
        if len(positions):
            m = F.interpolate(m[None].float(), size=(tile, tile), mode="bilinear", align_corners=False)[0]
            lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
            m = ((m - lo) / (hi - lo).clamp_min(1e-12)).numpy()
            for k, pos in enumerate(positions):
                heat = cmap(m[k])[..., :3]
                tiles.append(((1 - opacity) * image + opacity * heat, display_label(item_labels[pos])))
        row = Image.new("RGB", (tile * len(tiles), tile + label_h), "white")
        draw = ImageDraw.Draw(row)
        for j, (pixels, text) in enumerate(tiles):
            row.paste(Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)), (j * tile, 0))
            draw.text((j * tile + tile // 2, tile + label_h // 2), text, fill="black", font=font, anchor="mm")
        rows.append(row)
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]
