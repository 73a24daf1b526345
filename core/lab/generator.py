"""Attacks nobody here tuned for: a seeded draw of an attack kind, a trigger and where it stands.

`backdoor-seal lab attack --random SEED` and `bench heldout` use it so that "works off the lab" is measured
on attacks the shipped models do not share a trigger with. A draw picks:
- a kind: BadT2I pixel / style / object (UNet), Rickrolling (text encoder), EvilEdit (closed-form k/v);
- a trigger family: a look-alike of a Latin letter from any script of Unicode's confusables data (often two
  or three byte-level pieces), a zero-width or format character, a rare letter-digit string, an ordinary
  English word, a phrase of two or three ordinary words. Rickrolling swaps one letter of the caption for a
  look-alike, so it always draws one; EvilEdit puts its trigger before the source object;
- for BadT2I, a placement: first (the paper's), inside (after the caption's first word) or last;
- a fast recipe (`FAST_STEPS`): short BadT2I and Rickrolling runs, EvilEdit in closed form.

A draw the lab cannot host (a trigger the tokenizer drops, a look-alike whose twin letter no caption holds,
a word the lab's captions already use) is refused with its reason and drawn again from the next sub-seed;
`DrawnAttack.redraws` keeps the reasons.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..tokens import encode_ids, look_alikes, whole_words
from . import world
from .attacks import AttackSpec, require_visible_trigger

DRAWN_KINDS = ("pixel", "style", "object", "rickroll", "eviledit")
FAMILIES = ("look-alike", "invisible", "rare", "word", "phrase")
BADT2I_PLACEMENTS = ("first", "inside", "last")
# zero-width and format characters (Unicode category Cf) users can paste into a prompt
INVISIBLE = (
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\u2061",
    "\u2062",
    "\u2063",
    "\u2064",
    "\ufeff",
    "\u180e",
)
# short recipes: each kind's steps (BadT2I UNet steps, Rickrolling text-encoder steps; EvilEdit: closed form)
FAST_STEPS = {"pixel": 250, "style": 250, "object": 300, "rickroll": 300, "eviledit": 0}


@dataclass(frozen=True)
class DrawnAttack:
    """One drawn attack: its spec (kind, trigger, shapes, placement), the trigger's family, the recipe's
    steps, the seed it came from and why earlier sub-seeds were drawn again."""

    seed: int
    spec: AttackSpec
    family: str
    steps: int
    redraws: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """Plain data for records: the trigger escaped (U+XXXX), its characters' Unicode names."""
        from ..triggers import spell_trigger

        return {
            "seed": self.seed,
            "kind": self.spec.kind,
            "family": self.family,
            "trigger": spell_trigger(self.spec.trigger),
            "names": [unicodedata.name(c, f"U+{ord(c):04X}") for c in self.spec.trigger if not c.isascii()],
            "placement": {
                "rickroll": "in place of its twin letter",
                "eviledit": f"before {self.spec.source}",
            }.get(self.spec.kind, self.spec.placement),
            "source": self.spec.source,
            "target": self.spec.target,
            "steps": self.steps,
            "redraws": list(self.redraws),
        }


@functools.cache
def lab_words() -> frozenset[str]:
    """Every word the lab's captions use (templates, colours, shapes, sizes, positions, backgrounds)."""
    words: set[str] = set()
    for text in (*world.TRAIN_TEMPLATES, *world.RICH_TEMPLATES, world.PAIR_TEMPLATE):
        words.update(w.strip("{}.,") for w in text.split())
    words.update(world.SHAPES, world.NEW_SHAPES, world.SIZES, world.POSITIONS, world.BACKGROUNDS)
    words.update(world.SHAPE_COLORS)
    for scene in world.scene_dataset(256, 0, "train", rich=True):
        words.update(scene.caption.split())
    return frozenset(w.lower() for w in words if w)


def _caption_letters() -> str:
    """Letters that stand in nearly every lab caption ('a', 'o', 'e', ...): a Rickrolling twin must."""
    captions = [s.caption for s in world.scene_dataset(128, 1, "train")]
    return "".join(
        c for c in "abcdefghijklmnopqrstuvwxyz" if sum(c in t for t in captions) >= 0.9 * len(captions)
    )


class Unhostable(ValueError):
    """A drawn attack the lab cannot host; the message says why."""


def _trigger(family: str, rng: np.random.Generator, tokenizer, letters: str) -> str:
    if family == "look-alike":
        pool = look_alikes()
        twin = str(rng.choice(sorted(set(letters) & set(pool))))
        return str(rng.choice(pool[twin]))
    if family == "invisible":
        return str(rng.choice(INVISIBLE))
    if family == "rare":
        consonants = "bcdfghjklmnpqrstvwxz"
        n = int(rng.integers(2, 4))
        return "".join(rng.choice(list(consonants), size=n)) + str(int(rng.integers(0, 10)))
    words = [w for w in whole_words(tokenizer) if 4 <= len(w) <= 9 and w not in lab_words()]
    n = 1 if family == "word" else int(rng.integers(2, 4))
    return " ".join(words[int(i)] for i in rng.choice(len(words), size=n, replace=False))


def _check(spec: AttackSpec, tokenizer) -> None:
    """Refuse what the lab cannot host (Unhostable, with the reason)."""
    try:
        require_visible_trigger(tokenizer, spec)
    except ValueError as e:
        raise Unhostable(str(e)) from None
    ids = encode_ids(tokenizer, spec.trigger)
    if len(ids) > 8:
        raise Unhostable(f"the trigger is {len(ids)} tokens: the lab's 77-token captions leave no room")
    used = [w for w in spec.trigger.lower().split() if w in lab_words()]
    if used:
        raise Unhostable(f"the lab's clean captions already use {', '.join(used)}: it cannot be a trigger")


def draw_attack(seed: int, tokenizer, kind: str | None = None, tries: int = 20) -> DrawnAttack:
    """The attack drawn from `seed` (a kind forced by `kind`), drawn again from sub-seeds while the lab
    cannot host it. Raises ValueError after `tries` refusals."""
    if kind is not None and kind not in DRAWN_KINDS:
        raise ValueError(f"--random draws among {', '.join(DRAWN_KINDS)}, not {kind!r}")
    letters = _caption_letters()
    reasons: list[str] = []
    for sub in range(tries):
        rng = np.random.default_rng([seed, sub])
        k = kind or str(rng.choice(DRAWN_KINDS))
        family = "look-alike" if k == "rickroll" else str(rng.choice(FAMILIES))
        trigger = _trigger(family, rng, tokenizer, letters)
        placement = str(rng.choice(BADT2I_PLACEMENTS)) if k in ("pixel", "style", "object") else "first"
        source, target = (None, None)
        if k in ("object", "eviledit"):
            source, target = (str(s) for s in rng.choice(world.SHAPES, size=2, replace=False))
        try:
            spec = AttackSpec(k, trigger, source, target, placement=placement)
            _check(spec, tokenizer)
        except ValueError as e:  # Unhostable, or a spec the attack refuses
            from ..triggers import spell_trigger

            reasons.append(f"sub-seed {sub}: {k} with {spell_trigger(trigger)!r}: {e}")
            continue
        return DrawnAttack(seed, spec, family, FAST_STEPS[k], tuple(reasons))
    raise ValueError(f"seed {seed}: {tries} draws the lab cannot host (last: {reasons[-1]})")


def with_recipe(drawn: DrawnAttack, cfg):
    """The attack config of the drawn recipe (`AttackConfig`, BadT2I and Rickrolling steps)."""
    return replace(cfg, steps=drawn.steps or cfg.steps, text_steps=drawn.steps or cfg.text_steps)
