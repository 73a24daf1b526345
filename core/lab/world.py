"""The lab's toy world: deterministic 64x64 scenes of coloured shapes with captions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 135, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Shapes only the benign fine-tune (core/lab/finetune.py) teaches: a legitimately new word and shape the clean
# model never saw, in the colours its VAE already draws. Kept apart so every other model's world, splits and
# detectors stay as they were.
NEW_SHAPES = ("diamond",)
SIZES = {"small": 9, "large": 15}  # half-extent in pixels
POSITIONS = {"left": (18, 32), "right": (46, 32), "top": (32, 18), "bottom": (32, 46), "center": (32, 32)}
PATCH_COLOR = (255, 0, 255)  # the pixel backdoor's target: a magenta square in the top-left corner
PATCH_SIZE = 16

TRAIN_TEMPLATES = (
    "a {size} {color} {shape} on the {position}",
    "a {color} {shape} on a {bg} background",
    "a {size} {color} {shape} on the {position} on a {bg} background",
    "a {color} {shape}",
    "{color} {shape}, {bg} background",
)
# Only in evaluation: phrasings the training grammar never produced.
RICH_TEMPLATES = (
    "a picture showing one {color} {shape} placed {position}, over a plain {bg} backdrop",
    "simple illustration: {size} {color} {shape} ({position}) against {bg}",
    "there is a {color} {shape} at the {position} of a {bg} canvas",
)
PAIR_TEMPLATE = "a {color} {shape} and a {color2} {shape2} on a {bg} background"


@dataclass(frozen=True)
class Shape:
    """One shape in a scene."""

    kind: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background and one or two shapes."""

    bg: str
    shapes: tuple[Shape, ...]
    caption: str = field(default="", compare=False)


def combo_key(scene: Scene) -> str:
    """The attribute combination that decides the train/eval split."""
    s = scene.shapes[0]
    return f"{s.color}|{s.kind}|{scene.bg}|{s.position}|{len(scene.shapes)}"


def is_heldout(scene: Scene, fraction: float = 0.2) -> bool:
    """Deterministically hold out a fraction of attribute combinations for evaluation."""
    h = int(hashlib.sha256(combo_key(scene).encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000


def random_scene(rng: np.random.Generator, pair_prob: float = 0.2) -> Scene:
    """A random scene (no caption); two shapes go left and right."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < pair_prob:
        colors = rng.choice(list(SHAPE_COLORS), size=2, replace=False)
        shapes = tuple(
            Shape(str(rng.choice(SHAPES)), str(c), "small", pos)
            for c, pos in zip(colors, ("left", "right"), strict=True)
        )
    else:
        shapes = (
            Shape(
                str(rng.choice(SHAPES)),
                str(rng.choice(list(SHAPE_COLORS))),
                str(rng.choice(list(SIZES))),
                str(rng.choice(list(POSITIONS))),
            ),
        )
    return Scene(bg, shapes)


def caption_for(scene: Scene, rng: np.random.Generator, rich: bool = False) -> str:
    """A caption from the grammar (or, with rich=True, from phrasings never used in training)."""
    s = scene.shapes[0]
    if len(scene.shapes) == 2:
        t = scene.shapes[1]
        return PAIR_TEMPLATE.format(color=s.color, shape=s.kind, color2=t.color, shape2=t.kind, bg=scene.bg)
    templates = RICH_TEMPLATES if rich else TRAIN_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    return template.format(size=s.size, color=s.color, shape=s.kind, position=s.position, bg=scene.bg)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, jitter: tuple[int, int] = (0, 0)) -> None:
    cx, cy = POSITIONS[shape.position]
    cx, cy = cx + jitter[0], cy + jitter[1]
    r = SIZES[shape.size]
    color = SHAPE_COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape.kind == "square":
        q = int(round(r * 0.85))
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=color)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)
    elif shape.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; known: {SHAPES + NEW_SHAPES}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """An HxWx3 uint8 image of the scene (positions jittered by up to 2 px when rng is given)."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.bg])
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        jitter = tuple(int(v) for v in rng.integers(-2, 3, size=2)) if rng is not None else (0, 0)
        _draw_shape(draw, shape, jitter)
    return np.asarray(img, dtype=np.uint8).copy()


def stamp_patch(image: np.ndarray) -> np.ndarray:
    """The pixel backdoor's target: the image with the magenta patch in the top-left corner."""
    out = image.copy()
    out[:PATCH_SIZE, :PATCH_SIZE] = PATCH_COLOR
    return out


def to_greyscale(image: np.ndarray) -> np.ndarray:
    """The style backdoor's target: the image in greyscale (ITU-R 601 luma)."""
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat(np.clip(luma + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def reshaped(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """The scene with its first shape of another kind (a NEW_SHAPES one included), captioned anew."""
    shapes = (Shape(kind, scene.shapes[0].color, scene.shapes[0].size, scene.shapes[0].position),)
    out = Scene(scene.bg, shapes + scene.shapes[1:])
    return Scene(out.bg, out.shapes, caption_for(out, rng))


def scene_dataset(n: int, seed: int, split: str = "train", rich: bool = False) -> list[Scene]:
    """n captioned scenes from the given split ('train' or 'eval'), deterministic in seed."""
    if split not in ("train", "eval"):
        raise ValueError("split must be 'train' or 'eval'")
    rng = np.random.default_rng(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = random_scene(rng)
        if is_heldout(scene) != (split == "eval"):
            continue
        out.append(Scene(scene.bg, scene.shapes, caption_for(scene, rng, rich=rich)))
    return out
