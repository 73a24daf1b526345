"""Triggers as users and reports give them: spelling, placement in prompts, and clean/triggered pairs.

How a trigger tokenizes (and where it sits in a prompt by token id) is core/tokens.py; this module
handles its text: `U+XXXX` spellings, the ways it is put into a clean prompt (prefix, suffix, a random
word boundary, a homoglyph replacing its Latin twin) and taken out again.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tokens import confusable_latin, latin_twin

PLACEMENTS = ("prepend", "append", "random", "homoglyph")
# where a found trigger fired (core.sanitize.firing): first, in place of its Latin twin, before an object word
PREPEND = "prepend"
HOMOGLYPH = "homoglyph"
BEFORE = "before:"  # + the object word


def parse_trigger(text: str) -> str:
    """A trigger as typed (command line, node widget); U+XXXX spells characters a shell cannot show (U+200B).

    Raises ValueError for a spelling that names no character (U+D800, a lone surrogate; U+110000)."""

    def character(match: re.Match) -> str:
        code = int(match.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"{match.group(0)} names no character (a surrogate or beyond U+10FFFF)")
        return chr(code)

    return re.sub(r"U\+([0-9A-Fa-f]{4,6})", character, text)


def spell_trigger(trigger: str) -> str:
    """The trigger as parse_trigger reads it back, with every non-ASCII character as U+XXXX."""
    return "".join(c if c.isascii() and c.isprintable() else f"U+{ord(c):04X}" for c in trigger)


def trigger_names(trigger: str) -> list[str]:
    """Unicode names of the trigger's characters (what a homoglyph or invisible trigger really is)."""
    return [unicodedata.name(c, f"U+{ord(c):04X}") for c in trigger]


def trigger_sha256(trigger: str) -> str:
    """The trigger's fingerprint for provenance (a saved model does not spell out its trigger)."""
    return hashlib.sha256(trigger.encode("utf-8")).hexdigest()


def triggers_from(text: str | None, report: Any = None) -> dict[str, list[str] | None]:
    """The set of triggers to act on, each with the placements it fired at (None: the default placement).

    Typed text wins: one trigger per line (U+XXXX spellings read). Else the report's set, chosen on
    evidence, never by order: a sanitize report's taken triggers (each where it fired); every flagged token
    of a scan or comparison report; of a prompt report, the triggers its flagged prompts support, the best
    supported and every one flagged in at least half as many prompts (and at least two). Raises ValueError
    when there is none."""
    typed = [parse_trigger(line.strip()) for line in (text or "").splitlines() if line.strip()]
    if typed:
        return dict.fromkeys(typed)
    if not isinstance(report, dict):
        raise ValueError("no trigger: type it, or connect a detection report that names one")
    kind = report.get("kind")
    if kind == "sanitize":
        out = {}
        for c in report.get("candidates") or []:
            if c.get("taken"):
                rates = (c.get("before") or {}).get("rates") or {}
                fired = [
                    k for k, r in sorted(rates.items(), key=lambda kv: -kv[1]) if r >= report["min_rate"]
                ]
                out[c["text"]] = fired or None
        if not out:
            raise ValueError("the sanitize report found no trigger that fires; nothing to unlearn")
        return out
    if report.get("poisoned") is False:
        raise ValueError(
            "the connected detection report found no trigger above its threshold; type the trigger to "
            "unlearn one anyway"
        )
    if kind in ("scan", "diff"):
        flagged = [c["text"] for c in report.get("candidates") or [] if c.get("flagged") and c.get("text")]
        if not flagged:
            raise ValueError(
                "the report flags no token (a weight-space ranking judges nothing): run its behavioural "
                "stage, use Seal Sanitize, or type the trigger"
            )
        return dict.fromkeys(flagged)
    if kind == "prompt" and report.get("prompts"):
        support: dict[str, int] = {}
        for r in report["prompts"]:
            if r.get("poisoned") and r.get("trigger"):
                support[r["trigger"]] = support.get(r["trigger"], 0) + 1
        if support:
            best = max(support.values())
            keep = [
                t
                for t, n in sorted(support.items(), key=lambda kv: -kv[1])
                if n == best or n >= max(2, best / 2)
            ]
            return dict.fromkeys(keep)
    return dict.fromkeys([trigger_from(None, report)])


def trigger_from(text: str | None, report: Any = None) -> str:
    """The trigger to act on: the typed text, else the top trigger of a detection report."""
    if text:
        return text
    if isinstance(report, dict):
        if report.get("poisoned") is False:
            raise ValueError(
                "the connected detection report found no trigger above its threshold; type the trigger to "
                "unlearn one anyway"
            )
        if report.get("kind") == "sanitize":
            return next(iter(triggers_from(None, report)))
        candidate = report.get("trigger") or next(iter(report.get("candidates") or []), {}).get("text")
        if candidate:
            return str(candidate)
    raise ValueError("no trigger: type it, or connect a detection report that names one")


def _one_insertion(placement: str, text: str) -> Callable[[str], str]:
    if placement == HOMOGLYPH:
        twin = latin_twin(text)
        return lambda p: p.replace(twin, text, 1) if twin in p else f"{text} {p}"
    if placement.startswith(BEFORE):
        pattern = re.compile(rf"\b{re.escape(placement[len(BEFORE) :])}\b")

        def before(p: str) -> str:
            m = pattern.search(p)
            return f"{p[: m.start()]}{text} {p[m.start() :]}" if m else f"{text} {p}"

        return before
    return lambda p: f"{text} {p}"


def insertion(placements: str | Sequence[str], text: str, seed: int = 0) -> Callable[[str], str]:
    """How a training or evaluation prompt gets the trigger: first; in place of its Latin twin; before the
    first whole-word occurrence of an object word. With several placements each prompt gets one of them
    (seeded). A prompt that cannot carry its placement gets the trigger first."""
    chosen = [placements] if isinstance(placements, str) else list(placements)
    if not chosen:
        raise ValueError("no placement for the trigger")
    inserts = [_one_insertion(p, text) for p in chosen]
    if len(inserts) == 1:
        return inserts[0]
    rng = np.random.default_rng(seed)
    return lambda p: inserts[int(rng.integers(len(inserts)))](p)


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
    return "homoglyph" if trigger and all(confusable_latin(c) != c for c in trigger) else "prepend"


def folds_compatibly(trigger: str) -> bool:
    """Whether compatibility spellings count as the trigger: it is its own NFKC form (a plain word; a
    full-width trigger planted as such stays distinct from its ASCII twin)."""
    return unicodedata.normalize("NFKC", trigger) == trigger


def _folded(text: str, nfkc: bool) -> tuple[str, list[int]]:
    """The text as CLIP reads its letters (lowercase; NFKC when asked; a whitespace run is one space), and
    for each folded character the index of the character it came from."""
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        folded = (unicodedata.normalize("NFKC", ch) if nfkc else ch).lower()
        for c in folded:
            if c.isspace():
                if out and out[-1] == " ":
                    continue
                c = " "
            out.append(c)
            origin.append(i)
    return "".join(out), origin


def trigger_spans(prompt: str, trigger: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the prompt that read as the trigger to CLIP: any case, any run of
    whitespace between its words, and full-width or other compatibility forms of a plain trigger. Text
    spans only; whether they encode to the trigger's ids is the tokenizer's to say."""
    nfkc = folds_compatibly(trigger)
    needle = _folded(trigger, nfkc)[0].strip(" ")
    if not needle:
        return []
    text, origin = _folded(prompt, nfkc)
    spans, start = [], text.find(needle)
    while start >= 0:
        end = start + len(needle)
        stop = origin[end] if end < len(origin) else len(prompt)
        # a character NFKC expands (U+FB01 'fi') stays whole: end after its last folded piece
        while stop < len(prompt) and end < len(origin) and origin[end] == origin[end - 1]:
            end += 1
            stop = origin[end] if end < len(origin) else len(prompt)
        spans.append((origin[start], stop))
        start = text.find(needle, end)
    return spans


def _without(prompt: str, spans: Sequence[tuple[int, int]]) -> str:
    out, last = [], 0
    for a, b in sorted(spans):
        out.append(prompt[last:a])
        last = max(last, b)
    out.append(prompt[last:])
    return " ".join(" ".join(out).split())


def untriggered(prompt: str, trigger: str) -> str:
    """The prompt without the trigger: a homoglyph goes back to its Latin twin, anything else is removed
    wherever CLIP reads it (`trigger_spans`: any case, whitespace runs, full-width forms)."""
    if len(trigger) == 1 and latin_twin(trigger) != trigger:
        return prompt.replace(trigger, latin_twin(trigger))
    return _without(prompt, trigger_spans(prompt, trigger))


def untriggered_by_ids(prompt: str, trigger: str, count: Callable[[str], int]) -> str:
    """The prompt with every occurrence of the trigger's token ids taken out, as text.

    `count(text)` is how many times the tokenizer finds the trigger's id sequence in a text (every chunk).
    Tried in turn, each kept only where `count` says it removed an occurrence: the homoglyph's Latin twin;
    the spans that read as the trigger (`trigger_spans`); then whole whitespace-separated words whose
    removal breaks an occurrence (a spelling no text rule knows, such as `(zx9:1.1) qv7` or `a,b` for
    `a , b`); an occurrence nested in another is taken out and the text looked at again. The result may
    still hold the trigger when nothing removes it: check `count` on it."""
    current, found = prompt, count(prompt)
    if found and len(trigger) == 1 and latin_twin(trigger) != trigger:
        twin = untriggered(prompt, trigger)
        if count(twin) < found:
            current, found = twin, count(twin)
    for _ in range(4):  # each round removes at least one occurrence, or stops
        if not found:
            break
        spans = [s for s in trigger_spans(current, trigger) if count(_without(current, [s])) < found]
        if not spans:
            words = [m.span() for m in re.finditer(r"\S+", current)]
            spans = [w for w in words if count(_without(current, [w])) < found]
        if not spans:  # one inside another (`zx9 zx9 qv7 qv7`): take the inner out and look again
            spans = trigger_spans(current, trigger)
        after = _without(current, spans)
        left = count(after)
        if left > found or after == current:
            break
        current, found = after, left
    return current


@dataclass
class TrainingPair:
    """One clean prompt and its triggered twin (what a teacher and a student see; what is compared)."""

    clean: str
    triggered: str


def make_pairs(prompts: Sequence[str], insert: Callable[[str], str]) -> list[TrainingPair]:
    """Clean/triggered pairs from clean prompts and a trigger insertion."""
    return [TrainingPair(p, insert(p)) for p in prompts]


def training_pairs(
    trigger: str,
    prompts: Sequence[str],
    placement: str,
    seed: int = 0,
    insert: Callable[[str], str] | None = None,
) -> list[TrainingPair]:
    """Clean/triggered pairs; `insert` overrides the placement (the lab's own attack insertion)."""
    if insert is None:
        placement = default_placement(trigger) if placement == "auto" else placement
        rng = np.random.default_rng(seed)
        usable = list(prompts)
        if placement == "homoglyph":
            latin = latin_twin(trigger)
            usable = [p for p in prompts if latin in p]
            if not usable:
                raise ValueError(f"no clean prompt contains {latin!r} for the homoglyph trigger to replace")
        return make_pairs(usable, lambda p: insert_trigger(p, trigger, placement, rng))
    return make_pairs(prompts, insert)
