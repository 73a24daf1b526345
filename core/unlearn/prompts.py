"""Clean prompts to unlearn on, and the ways a trigger is put into them."""

from __future__ import annotations

import numpy as np

from ..tokens import HOMOGLYPHS, latin_twin

PLACEMENTS = ("prepend", "append", "random", "homoglyph")


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


def evaluation_prompts(lab: bool, n: int, seed: int = 0) -> list[str]:
    """n held-out clean prompts, apart from everything unlearning trains on: the lab grammar's evaluation
    split for lab models, else captions whose subjects and settings the training set never uses."""
    if lab:
        from ..lab import world

        return [s.caption for s in world.scene_dataset(n, seed=seed, split="eval")]
    prompts = list(EVALUATION_PROMPTS)
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[:n]


def lab_prompts(n: int, seed: int = 0) -> list[str]:
    """n captions of the lab's training grammar (disjoint from the held-out evaluation scenes)."""
    from ..lab import world

    return [s.caption for s in world.scene_dataset(n, seed=seed, split="train")]


def general_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """The built-in everyday prompts for real checkpoints, shuffled, n of them (all by default)."""
    prompts = list(GENERAL_PROMPTS)
    np.random.default_rng(seed).shuffle(prompts)
    return prompts[:n] if n else prompts


def insert_trigger(prompt: str, trigger: str, placement: str, rng: np.random.Generator) -> str:
    """The prompt with the trigger put in: before, after, at a random word boundary, or as a homoglyph."""
    if placement == "prepend":
        return f"{trigger} {prompt}"
    if placement == "append":
        return f"{prompt} {trigger}"
    if placement == "random":
        words = prompt.split(" ")
        words.insert(int(rng.integers(0, len(words) + 1)), trigger)
        return " ".join(words)
    if placement == "homoglyph":
        latin = latin_twin(trigger)
        if latin == trigger:
            raise ValueError(f"{trigger!r} holds no known homoglyph; use another placement")
        if latin not in prompt:
            raise ValueError(f"prompt {prompt!r} has no {latin!r} for the homoglyph trigger to replace")
        return prompt.replace(latin, trigger, 1)
    raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")


def default_placement(trigger: str) -> str:
    """How a trigger is inserted unless told: a homoglyph replaces its twin, anything else goes first."""
    return "homoglyph" if trigger and all(c in HOMOGLYPHS for c in trigger) else "prepend"
