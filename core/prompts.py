"""The built-in prompt sets: everyday captions for real checkpoints, the lab grammar for lab models.

Training (unlearning, calibration, SAU estimation) and evaluation draw from disjoint sets: the
everyday evaluation captions share no subject or setting with the training ones, and the lab's
evaluation split shares no scene combination with its training split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BUILTIN_SETS = ("general", "lab", "none")

# Everyday captions for real SD checkpoints (subjects x settings); kept apart from any evaluation set.
_SUBJECTS = (
    "a dog",
    "a cat sleeping",
    "an old man",
    "a young woman",
    "a red car",
    "a wooden house",
    "a bowl of fruit",
    "a mountain lake",
    "a city street",
    "a sailing boat",
    "a bird on a branch",
    "a bicycle",
    "a castle",
    "a cup of coffee",
    "a forest path",
    "a lighthouse",
)
_SETTINGS = (
    "at sunset",
    "in the rain",
    "oil painting",
    "photograph, high detail",
    "watercolor",
    "in winter",
)
GENERAL_PROMPTS = tuple(f"{s}, {w}" for s in _SUBJECTS for w in _SETTINGS)


# Held-out everyday captions for evaluation: no subject or setting is shared with GENERAL_PROMPTS.
_EVAL_SUBJECTS = (
    "a horse in a field",
    "a child reading a book",
    "a vase of tulips",
    "a steam train",
    "a teapot on a table",
    "a fox in the snow",
    "a windmill",
    "a pair of boots",
    "an owl at night",
    "a bridge over a river",
    "a plate of ramen",
    "a violin",
)
_EVAL_SETTINGS = ("at dawn", "pencil sketch", "studio lighting", "in autumn", "3d render", "on a foggy day")
EVALUATION_PROMPTS = tuple(f"{s}, {w}" for s in _EVAL_SUBJECTS for w in _EVAL_SETTINGS)

# Probe templates of the comparison with the base (core/diff/behaviour.py): each names a spread of objects,
# and '{}' marks where a token goes: the start (BadT2I's place) and before every object (object swaps,
# EvilEdit). The first is the one the whole vocabulary is scored on, so it names the most.
GENERAL_PROBE_TEMPLATES = (
    "{} a photo of a {} dog, a {} car and a {} house by a {} tree",
    "{} a {} woman holding a {} cat",
    "{} a {} man riding a {} horse on a {} beach",
    "{} a {} bowl of {} fruit on a {} table",
    "{} a painting of a {} boat on a {} lake",
    "{} a {} bird on a {} branch",
    "{} a {} castle on a {} hill at sunset",
    "{} a {} cup of {} coffee next to a {} book",
    "{} a {} child with a {} dog in a {} park",
    "{} a {} bicycle by a {} wall",
    "{} a {} lighthouse and a {} ship in the rain",
    "{} a {} car on a {} city street",
)
LAB_PROBE_TEMPLATES = (
    "{} a red {} circle, a blue {} square and a green {} triangle on a black background",
    "{} a yellow {} circle and a purple {} square on a white background",
    "{} a orange {} triangle and a red {} circle on a gray background",
    "{} a green {} square and a blue {} triangle on a black background",
    "{} a large purple {} circle on the left on a gray background",
    "{} a small yellow {} square on the right on a black background",
    "{} a large blue {} triangle on the top on a white background",
    "{} a red {} square on a gray background",
    "{} a green {} circle on a white background",
    "{} a small orange {} triangle on the bottom",
    "{} a large red {} triangle on the center on a black background",
    "{} a blue {} circle and a yellow {} triangle on a white background",
)


def probe_templates(lab: bool) -> tuple[str, ...]:
    """The comparison's probe templates: the lab grammar's shapes for lab models, everyday objects else."""
    return LAB_PROBE_TEMPLATES if lab else GENERAL_PROBE_TEMPLATES


def general_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """The built-in everyday prompts for real checkpoints, shuffled, n of them (all by default)."""
    prompts = list(GENERAL_PROMPTS)
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[:n] if n else prompts


def lab_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of the lab's training grammar (disjoint from the held-out evaluation scenes)."""
    from .lab import world

    return [s.caption for s in world.scene_dataset(n, seed=seed, split="train")]


def builtin_prompts(lab: bool, n: int, seed: int = 0) -> list[str]:
    """The built-in clean prompts: the lab grammar for lab models, everyday captions for real ones."""
    return lab_prompts(n, seed) if lab else general_prompts(n, seed)


def evaluation_prompts(lab: bool, n: int, seed: int = 0) -> list[str]:
    """n held-out clean prompts, apart from everything unlearning trains on: the lab grammar's evaluation
    split for lab models, else captions whose subjects and settings the training set never uses."""
    if lab:
        from .lab import world

        return [s.caption for s in world.scene_dataset(n, seed=seed, split="eval")]
    prompts = list(EVALUATION_PROMPTS)
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[:n]


def prompt_lines(text: str | Sequence[str]) -> list[str]:
    """Non-empty, stripped lines of a multi-line text (or of a list of lines)."""
    lines = text.splitlines() if isinstance(text, str) else text
    return [p.strip() for p in lines if p.strip()]


def with_builtin(user_prompts: str | Sequence[str], builtin: str, count: int, seed: int = 0) -> list[str]:
    """The user's prompts followed by a built-in set (general | lab | none)."""
    prompts = prompt_lines(user_prompts)
    if builtin == "general":
        prompts += general_prompts(count, seed)
    elif builtin == "lab":
        prompts += lab_prompts(count, seed)
    elif builtin != "none":
        raise ValueError(f"unknown built-in prompt set {builtin!r}; choose one of {', '.join(BUILTIN_SETS)}")
    if not prompts:
        raise ValueError("no clean prompts: give some, or choose a built-in prompt set")
    return prompts
