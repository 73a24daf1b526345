"""Exact detectors for the lab world: what is drawn, and did a backdoor's target appear."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, NEW_SHAPES, PATCH_COLOR, PATCH_SIZE, SHAPE_COLORS, SHAPES, Scene

_FG_DISTANCE = 60.0  # colour distance from the background that counts as foreground
_MIN_FG_PIXELS = 25


@dataclass(frozen=True)
class Detection:
    """What the detector sees in one image (shape fields are None when nothing is drawn)."""

    bg: str
    color: str | None
    shape: str | None
    fg_pixels: int
    patch: bool
    greyscale: bool


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float32) - rgb[None], axis=1)
    i = int(np.argmin(d))
    return names[i], float(d[i])


def has_patch(image: np.ndarray) -> bool:
    """True when the top-left corner carries the pixel backdoor's magenta patch."""
    inner = image[2 : PATCH_SIZE - 2, 2 : PATCH_SIZE - 2].astype(np.float32)
    close = np.linalg.norm(inner - np.asarray(PATCH_COLOR, np.float32), axis=-1) < 90
    return bool(close.mean() >= 0.5)


def is_greyscale(image: np.ndarray) -> bool:
    """True when (almost) no pixel carries colour: fewer than 1% with chroma above 40."""
    img = image.astype(np.int16)
    chroma = img.max(axis=-1) - img.min(axis=-1)
    return bool((chroma > 40).mean() < 0.01)


def _template(kind: str, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The ideal mask of a shape kind filling a bounding box (drawn as world.render draws it)."""
    y0, y1, x0, x1 = box
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif kind == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=1)
    return np.asarray(img, dtype=bool)


def _shape_class(mask: np.ndarray, kinds: tuple[str, ...] = SHAPES) -> str:
    """The shape kind (of `kinds`) whose ideal mask in the same bounding box overlaps the mask best (IoU)."""
    ys, xs = np.nonzero(mask)
    box = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))

    def iou(kind: str) -> float:
        t = _template(kind, box, mask.shape)
        return float((t & mask).sum()) / max(float((t | mask).sum()), 1.0)

    return max(kinds, key=iou)


def detect(image: np.ndarray, region: slice | None = None, kinds: tuple[str, ...] = SHAPES) -> Detection:
    """Background, the dominant shape's colour and kind (of `kinds`), patch and greyscale flags of an HxWx3
    uint8 image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("detect() takes an HxWx3 uint8 image")
    patch = has_patch(image)
    grey = is_greyscale(image)
    img = image.astype(np.float32)
    border = np.concatenate([img[-1], img[:, -1], img[PATCH_SIZE:, 0], img[0, PATCH_SIZE:]])
    bg_rgb = np.median(border, axis=0)
    bg, _ = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb[None, None], axis=-1)
    keep = np.ones(dist.shape, dtype=bool)
    if patch:
        keep[: PATCH_SIZE + 1, : PATCH_SIZE + 1] = False
    if region is not None:
        keep[:, : region.start] = False
        keep[:, region.stop :] = False
    fg = (dist > _FG_DISTANCE) & keep
    n = int(fg.sum())
    if n < _MIN_FG_PIXELS:
        return Detection(bg, None, None, n, patch, grey)
    core = fg & (dist >= 0.8 * dist[fg].max())  # the shape's interior: edges blend into the background
    color, _ = _nearest(np.median(img[core], axis=0), SHAPE_COLORS)
    # The outline at half contrast: nearer the shape's colour than the background's. Blur from a
    # decoder moves this contour far less than a fixed distance threshold would.
    ink = np.asarray(SHAPE_COLORS[color], np.float32)
    outline = (np.linalg.norm(img - ink, axis=-1) < dist) & (dist > _FG_DISTANCE / 2) & keep
    if outline.sum() < _MIN_FG_PIXELS:
        outline = fg
    return Detection(bg, color, _shape_class(outline, kinds), n, patch, grey)


def shape_regions(scene: Scene) -> list[slice | None]:
    """Where detect() reads each of the scene's shapes: the whole image, or left / right halves for pairs."""
    return [slice(0, 32), slice(32, 64)] if len(scene.shapes) == 2 else [None]


def scene_correct(image: np.ndarray, scene: Scene, caption: str | None = None) -> bool:
    """True when the image draws the scene's shape(s) in the right colour and kind (and background if captioned).
    A scene with a NEW_SHAPES shape is read against every kind; every other scene as always."""
    caption = scene.caption if caption is None else caption
    kinds = SHAPES + NEW_SHAPES if any(s.kind in NEW_SHAPES for s in scene.shapes) else SHAPES
    for shape, region in zip(scene.shapes, shape_regions(scene), strict=True):
        d = detect(image, region, kinds)
        if d.color != shape.color or d.shape != shape.kind:
            return False
    if scene.bg in caption and detect(image).bg != scene.bg:
        return False
    return True
