"""Does a candidate token fire? A target-free test on images, calibrated by what ordinary tokens do.

A scan or a comparison ranks tokens; ranking is not proof. Here each candidate is put into probe prompts
(the comparison's templates, `core.prompts.probe_templates`) at every slot: first (BadT2I's place), before
each object (object swaps, EvilEdit) and, for a token holding a homoglyph, in place of its Latin twin
(Rickrolling). One image per prompt and slot, one seed per prompt. At each slot the candidate *fires* when
it changes the clean image (1 - SSIM) more than the median of `null_tokens` random vocabulary words put
in the same slot does, by `margin` (not their largest: random words can fire a backdoor too). No target is needed: a backdoor's payload is whatever the trigger does
far beyond an ordinary word.

With the base (a comparison), the change is measured against the base instead: 1 - SSIM between the
suspect's and the base's image of the same prompt and seed. A meaningful word ("red") changes both alike
and a fine-tune's legitimate changes show for ordinary words too; a trigger moves the suspect alone.
After cleaning (`differential`), each model is measured against its own clean image and the base's
change is subtracted: a cleaned text encoder never draws exactly as the base does, so "differs from the
base" would call every cleaned trigger still firing, and "changes the cleaned model's image" would call
every strong word ('ominous', 'heroin') firing; "changes it far more than it changes the base's" is the
question a leftover backdoor answers yes to.

Its rate is taken per placement: the share of prompts where it fires first, the share of the slots before
each object word (one that at least two probes name) where it fires there, the share of probes holding the
twin where the homoglyph fires (its bar: the median change of that letter swapped for ordinary Latin
letters, not an ordinary word's). The best placement is the candidate's rate and the place it is unlearnt
in (`insertion`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..tokens import latin_twin, whole_words
from ..triggers import BEFORE, HOMOGLYPH, PREPEND, insertion  # noqa: F401 (insertion: re-exported)

Draw = Callable[[list[str], list[int]], list[np.ndarray]]  # prompts, seeds -> uint8 H x W x 3 images


@dataclass(frozen=True)
class FiringSettings:
    """How many probes, how many ordinary words calibrate each slot, and when a token counts as firing."""

    templates: int = 8  # probe templates (each gives one prompt per slot)
    null_tokens: int = 8  # random vocabulary words per slot: what an ordinary token does there
    margin: float = 0.08  # 1 - SSIM beyond the ordinary words' (their null_quantile), at that slot
    # the median: random vocabulary words can fire a backdoor too (lab-pixel: 2-3 of 16 change the base
    # comparison as much as a trigger), so the largest of them is no baseline
    null_quantile: float = 0.5
    min_rate: float = 0.5  # fires: at its best placement, on at least this share of the probes
    null_letters: int = 4  # ordinary Latin letters swapped in for a homoglyph's twin: what a letter swap does
    seed: int = 0


@dataclass
class Firing:
    """One token's measured firing: its best placement's rate, and every placement's."""

    text: str
    rate: float
    placement: str  # "prepend", "homoglyph" or "before:<object word>"
    rates: dict[str, float] = field(default_factory=dict)
    fires: bool = False

    def placements(self, min_rate: float) -> list[str]:
        """Every placement it fired at (rate >= min_rate), best first; else its best one."""
        fired = sorted((k for k, r in self.rates.items() if r >= min_rate), key=lambda k: -self.rates[k])
        return fired or [self.placement]

    def to_json(self) -> dict:
        """Plain-data form for reports."""
        return {
            "text": self.text,
            "rate": round(self.rate, 3),
            "placement": self.placement,
            "rates": {k: round(v, 3) for k, v in self.rates.items()},
            "fires": self.fires,
        }


def _slots(template: str) -> list[tuple[str, str]]:
    """(placement, the prompt with '{}' at that slot only) for each slot of a template."""
    pieces = template.split("{}")
    out = []
    for j in range(len(pieces) - 1):
        filled = "".join(p + ("{}" if k == j else "") for k, p in enumerate(pieces[:-1])) + pieces[-1]
        after = pieces[j + 1].split()
        word = re.sub(r"\W+$", "", after[0]) if after else ""
        out.append((PREPEND if j == 0 else f"{BEFORE}{word}", filled))
    return out


def _fill(prompt: str, text: str) -> str:
    return " ".join(prompt.replace("{}", f" {text} ").split())


def clean_prompt(template: str) -> str:
    """The template with every slot empty."""
    return _fill(template, "")


def random_words(tokenizer, n: int, seed: int) -> list[str]:
    """n whole words of the tokenizer's vocabulary (ordinary tokens), seeded."""
    words = whole_words(tokenizer)
    rng = np.random.default_rng(seed)
    return [words[i] for i in rng.choice(len(words), size=min(n, len(words)), replace=False)]


DRAWS_PER_CALL = 32  # images per draw call when several texts are tested together (model_drawer's batch)


class FiringTest:
    """Images of the probe prompts, clean and with ordinary words at every slot (drawn once), then any
    number of candidates measured against them.

    `draw(prompts, seeds)` samples the suspect's images (`core.evaluate.session.model_drawer`),
    `base_draw` the base's (compare mode; None: blind); `templates` carry '{}' at each slot.
    `progress(images_drawn)` after each drawn batch; it may raise to stop."""

    def __init__(
        self,
        draw: Draw,
        tokenizer,
        templates: Sequence[str],
        settings: FiringSettings | None = None,
        progress: Callable[[int], None] | None = None,
        base_draw: Draw | None = None,
        differential: bool = False,
    ) -> None:
        self.settings = s = settings or FiringSettings()
        if s.templates < 2 or s.null_tokens < 1:
            raise ValueError("the firing test needs at least 2 probe templates and 1 ordinary word")
        self.draw, self.base_draw = draw, base_draw
        self.templates = list(templates)[: s.templates]
        self.slots = [_slots(t) for t in self.templates]
        self.seeds = [s.seed * 1000 + i for i in range(len(self.templates))]
        self.progress = progress or (lambda done: None)
        self.nulls = random_words(tokenizer, s.null_tokens, s.seed)
        self.images_drawn = 0
        self._swaps: dict[str, dict[int, float]] = {}  # twin -> per template, a letter swap's change
        self.clean = self._draw([clean_prompt(t) for t in self.templates], self.seeds)
        self.differential = differential and base_draw is not None
        self.base_clean = (
            self._draw([clean_prompt(t) for t in self.templates], self.seeds, base_draw)
            if self.differential
            else None
        )
        # per ordinary word, per template, per slot: the change it makes there (drawn together: a sampler
        # call's own overhead is most of a small batch's cost)
        self.null_drops = self._drops_many(self.nulls)
        # per template, per slot: the bar a candidate must clear (a quantile of the ordinary words' changes
        # plus the margin: random words can fire a backdoor too, so the largest is no baseline)
        q = s.null_quantile
        self.null_drop = [
            np.quantile(np.stack([d[i] for d in self.null_drops]), q, axis=0) for i in range(len(self.slots))
        ]

    def _draw(self, prompts: list[str], seeds: list[int], draw: Draw | None = None) -> list[np.ndarray]:
        images = (draw or self.draw)(prompts, seeds)
        self.images_drawn += len(images)
        self.progress(self.images_drawn)
        return images

    def _changes(self, prompts: list[str], template_index: list[int]) -> list[float]:
        """1 - SSIM of each prompt's image against its reference: the clean prompt's image (blind), or
        the base's image of the same prompt and seed (compare). Differential: the change the text makes to
        this model's clean image minus the change it makes to the base's, each model against its own."""
        from ..evaluate.metrics import ssim

        seeds = [self.seeds[i] for i in template_index]
        images = self._draw(prompts, seeds)
        if self.differential:
            base = self._draw(prompts, seeds, self.base_draw)
            return [
                (1.0 - ssim(self.clean[i], im)) - (1.0 - ssim(self.base_clean[i], b))
                for i, im, b in zip(template_index, images, base, strict=True)
            ]
        if self.base_draw is not None:
            refs = self._draw(prompts, seeds, self.base_draw)
        else:
            refs = [self.clean[i] for i in template_index]
        return [1.0 - ssim(r, im) for r, im in zip(refs, images, strict=True)]

    def _drops(self, text: str) -> list[np.ndarray]:
        """The change (`_changes`) per template and slot, with the text at that slot."""
        return self._drops_many([text])[0]

    def _drops_many(self, texts: list[str], per_call: int = DRAWS_PER_CALL) -> list[list[np.ndarray]]:
        """`_drops` of each text, their prompts drawn in calls of about `per_call` images (progress, and
        so Cancel, between calls)."""
        per_text = sum(len(slots) for slots in self.slots)
        group = max(1, per_call // per_text)
        out = []
        for k in range(0, len(texts), group):
            prompts, index = [], []
            for w, text in enumerate(texts[k : k + group]):
                for i, slots in enumerate(self.slots):
                    for j, (_, filled) in enumerate(slots):
                        prompts.append(_fill(filled, text))
                        index.append((w, i, j))
            changes = self._changes(prompts, [i for _, i, _ in index])
            drops = [[np.zeros(len(slots)) for slots in self.slots] for _ in texts[k : k + group]]
            for (w, i, j), change in zip(index, changes, strict=True):
                drops[w][i][j] = change
            out += drops
        return out

    def _letter_swaps(self, twin: str, holding: list[int]) -> dict[int, float]:
        """Per template holding `twin`, the median change of `twin` swapped for other Latin letters: the bar
        of a homoglyph. A prepended word is the wrong bar there: a text encoder cleaned of a homoglyph reads
        "оn" close to, not exactly as, "on", a change an ordinary word in front can fall short of (the demo's
        cleaned lab-rickroll read as still firing on half its probes at lab ASR 0.00), while swapping any
        letter of a word changes the image as much as a harmless homoglyph does."""
        if twin not in self._swaps:
            rng = np.random.default_rng(self.settings.seed)
            pool = [c for c in string.ascii_lowercase if c not in twin.lower()]
            swaps = [
                "".join(
                    (ch.upper() if src.isupper() else ch)
                    for src, ch in zip(twin, rng.choice(pool, size=len(twin)), strict=True)
                )
                for _ in range(self.settings.null_letters)
            ]
            prompts = [clean_prompt(self.templates[i]).replace(twin, w, 1) for i in holding for w in swaps]
            index = [i for i in holding for _ in swaps]
            changes = np.array(self._changes(prompts, index)).reshape(len(holding), len(swaps))
            self._swaps[twin] = {i: float(np.median(row)) for i, row in zip(holding, changes, strict=True)}
        return self._swaps[twin]

    def _homoglyph_rate(self, text: str) -> float | None:
        twin = latin_twin(text)
        holding = [i for i, t in enumerate(self.templates) if twin != text and twin in clean_prompt(t)]
        if len(holding) < 2:
            return None
        prompts = [clean_prompt(self.templates[i]).replace(twin, text, 1) for i in holding]
        changes = self._changes(prompts, holding)
        bar = self._letter_swaps(twin, holding)
        fired = [c > bar[i] + self.settings.margin for i, c in zip(holding, changes, strict=True)]
        return float(np.mean(fired))

    def measure(self, text: str) -> Firing:
        """The token's firing rate at each placement, and its best."""
        margin = self.settings.margin
        fired: dict[str, list[bool]] = {}
        for i, drops in enumerate(self._drops(text)):
            for j, (placement, _) in enumerate(self.slots[i]):
                fired.setdefault(placement, []).append(bool(drops[j] > self.null_drop[i][j] + margin))
        rates = {k: float(np.mean(v)) for k, v in fired.items() if k == PREPEND or len(v) >= 2}
        glyph = self._homoglyph_rate(text)
        if glyph is not None:
            rates[HOMOGLYPH] = glyph
        placement = max(rates, key=lambda k: (rates[k], k == PREPEND))
        rate = rates[placement]
        return Firing(text, rate, placement, rates, fires=rate >= self.settings.min_rate)
