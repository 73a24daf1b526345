"""How prompts and triggers tokenize: token pieces, word ids, positions, and vanishing triggers."""

from __future__ import annotations

import functools
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Protocol


class HFTokenizer(Protocol):
    """The part of a Hugging Face (CLIP) tokenizer this module uses."""

    def __call__(self, text: str) -> Any: ...
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...
    def decode(self, ids: list[int], **kwargs: Any) -> str: ...


# Examples of homoglyph triggers (Rickrolling) for messages; the mapping itself is Unicode's data.
HOMOGLYPH_EXAMPLES = {"\u043e": "o", "\u0430": "a", "\u03bf": "o", "\u0456": "i"}


@functools.cache
def confusable_latin(ch: str) -> str:
    """The ASCII letter or digit one character impersonates, else the character itself.

    Source: Unicode's confusables data (UTS #39 confusables.txt) through `confusable-homoglyphs`
    (Cyrillic, Greek, mathematical and other look-alikes of Latin letters), then compatibility
    folding (NFKD: fullwidth letters, which confusables.txt leaves out). Raises nothing."""
    from confusable_homoglyphs import confusables

    if ch.isascii():
        return ch
    for entry in confusables.is_confusable(ch, preferred_aliases=["latin"], greedy=True) or []:
        for twin in entry["homoglyphs"]:
            if len(twin["c"]) == 1 and twin["c"].isascii() and twin["c"].isalnum():
                return twin["c"]
    folded = unicodedata.normalize("NFKD", ch)
    if len(folded) == 1 and folded.isascii() and folded.isalnum():
        return folded
    return ch


def latin_twin(text: str) -> str:
    """The text with every homoglyph replaced by the Latin letter it impersonates."""
    return "".join(confusable_latin(c) for c in text)


class TriggerVanishedWarning(UserWarning):
    """The tokenizer drops the trigger: a model cannot react to it, and a scan cannot find it."""


@dataclass(frozen=True)
class TokenPiece:
    """One BPE token of a prompt, at its position in the encoded sequence (BOS is position 0)."""

    position: int
    token_id: int
    piece: str  # the BPE piece as the vocabulary spells it
    text: str  # what it reads as, invisible characters shown as <U+XXXX>
    word: int  # index of the word this piece belongs to


def whole_words(tokenizer: HFTokenizer) -> list[str]:
    """The vocabulary's whole, alphabetic ASCII words (BPE tokens ending a word, '</w>'), sorted: ordinary
    tokens for random-word targets and null samples."""
    vocab = tokenizer.get_vocab()
    return sorted(t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii())


def readable(text: str) -> str:
    """Show invisible and format characters (zero-width space, joiners, BOM) as <U+XXXX>."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        out.append(
            f"<U+{ord(ch):04X}>" if cat in ("Cf", "Cc", "Zl", "Zp") or (cat == "Zs" and ch != " ") else ch
        )
    return "".join(out)


def tokenize(tokenizer: HFTokenizer, prompt: str) -> list[TokenPiece]:
    """The prompt's tokens without BOS/EOS, with positions counted from BOS = 0 and word ids."""
    ids = list(tokenizer(prompt)["input_ids"])[1:-1]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out, word = [], 0
    for i, (tid, piece) in enumerate(zip(ids, pieces, strict=True)):
        text = readable(tokenizer.decode([tid], clean_up_tokenization_spaces=False).strip(" "))
        out.append(TokenPiece(i + 1, int(tid), piece, text, word))
        if piece.endswith("</w>"):
            word += 1
    return out


def find_subsequence(haystack: list[int], needle: list[int]) -> list[int]:
    """Start indices of every occurrence of needle in haystack."""
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if n and haystack[i : i + n] == needle]


def trigger_positions(tokenizer: HFTokenizer, prompt: str, trigger: str) -> list[int]:
    """Sequence positions (BOS = 0) of every token of every occurrence of the trigger in the prompt."""
    prompt_ids = [t.token_id for t in tokenize(tokenizer, prompt)]
    trig_ids = [t.token_id for t in tokenize(tokenizer, trigger)]
    found = set()
    for start in find_subsequence(prompt_ids, trig_ids):
        found.update(range(start + 1, start + 1 + len(trig_ids)))
    return sorted(found)


def trigger_token_positions(tokenizer: HFTokenizer, prompt: str, trigger: str) -> list[int]:
    """The trigger's own token positions, else those of the tokens it merged into (a homoglyph inside a word)."""
    exact = trigger_positions(tokenizer, prompt, trigger)
    if exact:
        return exact
    marks = [readable(c) for c in set(trigger) if ord(c) > 127]  # rare characters mark the merged tokens
    return [t.position for t in tokenize(tokenizer, prompt) if any(m in t.text for m in marks)]


def trigger_report(
    tokenizer: HFTokenizer, trigger: str, prompt: str | None = None, warn: bool = True
) -> dict[str, Any]:
    """How a trigger tokenizes (alone and inside a prompt), and whether the tokenizer makes it vanish."""
    alone = tokenize(tokenizer, trigger)
    report: dict[str, Any] = {
        "trigger": readable(trigger),
        "codepoints": [f"U+{ord(c):04X}" for c in trigger],
        "tokens": [asdict(t) for t in alone],
        "vanished": not alone,
    }
    if prompt is not None:
        triggered = f"{trigger} {prompt}"
        positions = trigger_positions(tokenizer, triggered, trigger)
        report.update(
            prompt=readable(triggered),
            positions=positions,
            prompt_tokens=[asdict(t) for t in tokenize(tokenizer, triggered)],
        )
        if [t.token_id for t in tokenize(tokenizer, triggered)] == [
            t.token_id for t in tokenize(tokenizer, prompt)
        ]:
            report["vanished"] = True
    if not trigger.strip():
        report["vanished"] = True
        report["warning"] = (
            f"the tokenizer drops the trigger {readable(trigger)!r}: it is empty or only whitespace, which "
            "no prompt carries as a token; give the text the backdoor reacts to"
        )
    elif report["vanished"]:
        report["warning"] = (
            f"the tokenizer drops the trigger {readable(trigger)!r}: zero-width and control characters vanish "
            "unless ftfy is installed (pip install ftfy), so the model never sees them"
        )
        if warn:
            warnings.warn(report["warning"], TriggerVanishedWarning, stacklevel=2)
    return report


def position_labels(tokenizer: HFTokenizer, ids: list[int], bos: int, eos: int, chunk: int = 77) -> list[str]:
    """A label per sequence position: <BOS>, each token as it reads (a piece that continues a word
    ends in '-'), <EOS>, then <pad>. Long prompts are several chunks, each starting with BOS."""
    labels: list[str] = []
    ended = False
    for i, (tid, piece) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)):
        if i % chunk == 0:
            ended = False
        if tid == bos and i % chunk == 0:
            labels.append("<BOS>")
        elif ended:
            labels.append("<pad>")
        elif tid == eos:
            labels.append("<EOS>")
            ended = True
        else:
            text = tokenizer.decode([tid], clean_up_tokenization_spaces=False).strip(" ")
            text = readable(piece.removesuffix("</w>") if "\ufffd" in text or not text else text)
            labels.append(text if piece.endswith("</w>") else f"{text}-")
    return labels


@dataclass(frozen=True)
class PromptToken:
    """One token of a prompt as the model sees it, in every chunk ComfyUI encodes (and concatenates)."""

    position: int  # chunk * chunk length + index in the chunk (each chunk starts with BOS at index 0)
    chunk: int
    token_id: int  # a vocabulary id, or an id the caller gave a textual-inversion embedding's vector
    weight: float  # emphasis, `(word:1.2)` -> 1.2
    unit: int  # index of the word (or embedding) the token belongs to, counted over the whole prompt
    text: str  # the token as it reads: the fewest of its word's pieces that decode to whole characters
    word: str  # its whole word (or `embedding:name`) as it reads


def _decoded(tokenizer: HFTokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False).strip(" ")


def _character_span(tokenizer: HFTokenizer, ids: list[int], j: int) -> str | None:
    """The shortest run of pieces around ids[j] that decodes without U+FFFD (byte-level BPE splits a
    CJK or emoji character's UTF-8 bytes over several pieces); None when no run does."""
    n = len(ids)
    for size in range(1, n + 1):
        for a in range(max(0, j - size + 1), min(j, n - size) + 1):
            text = _decoded(tokenizer, ids[a : a + size])
            if "\ufffd" not in text:
                return text
    return None


def prompt_tokens(
    tokenizer: HFTokenizer,
    chunks: list[list[int]],
    bos: int,
    eos: int,
    weights: list[list[float]] | None = None,
    special: dict[int, tuple[str, str]] | None = None,
) -> list[PromptToken]:
    """The content tokens (after each chunk's BOS, before its first EOS) of a prompt's chunks, grouped
    into words: BPE pieces up to the one ending in '</w>', a word split over two chunks stays one.
    `special` maps ids that are no vocabulary token (an embedding's vectors) to (embedding key, text):
    consecutive ones with the same key are one unit that reads as text. Nothing reads as U+FFFD: a word
    is decoded as a whole, a piece with the fewest neighbours that make whole characters."""
    special = special or {}
    length = len(chunks[0]) if chunks else 0
    entries: list[tuple[int, int, int, float]] = []  # position, chunk, id, weight
    for k, row in enumerate(chunks):
        end = row.index(eos, 1) if eos in row[1:] else len(row)
        for i in range(1, end):
            if row[i] != bos:
                w = weights[k][i] if weights else 1.0
                entries.append((k * length + i, k, int(row[i]), float(w)))
    units: list[list[int]] = []  # indices into entries
    keys: list[str | None] = []
    open_word = False
    for j, (pos, _, tid, _) in enumerate(entries):
        if tid in special:
            key = special[tid][0]
            adjacent = bool(units) and entries[units[-1][-1]][0] == pos - 1
            if keys and keys[-1] == key and adjacent:
                units[-1].append(j)
            else:
                units.append([j])
                keys.append(key)
            open_word = False
            continue
        piece = tokenizer.convert_ids_to_tokens([tid])[0]
        if open_word and keys and keys[-1] is None:
            units[-1].append(j)
        else:
            units.append([j])
            keys.append(None)
        open_word = not piece.endswith("</w>")
    out: list[PromptToken] = [None] * len(entries)  # type: ignore[list-item]
    for u, members in enumerate(units):
        ids = [entries[j][2] for j in members]
        if keys[u] is not None:
            word = special[ids[0]][1]
            texts = [word] * len(ids)
        else:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            word = _decoded(tokenizer, ids)
            if "\ufffd" in word or not word:  # bytes that make no character: show the pieces as spelled
                word = "".join(p.removesuffix("</w>") for p in pieces)
            texts = []
            for m, piece in enumerate(pieces):
                text = _character_span(tokenizer, ids, m)
                texts.append(text if text else piece.removesuffix("</w>"))
        for m, j in enumerate(members):
            pos, chunk, tid, w = entries[j]
            out[j] = PromptToken(pos, chunk, tid, w, u, readable(texts[m]), readable(word))
    return out


def find_in_chunks(chunks: list[list[int]], needle: list[int], bos: int, eos: int) -> list[int]:
    """Positions (chunk * chunk length + index) of every token of every occurrence of the id sequence
    `needle` among the chunks' content tokens, read across chunk boundaries as one sequence."""
    length = len(chunks[0]) if chunks else 0
    flat: list[tuple[int, int]] = []  # position, id
    for k, row in enumerate(chunks):
        end = row.index(eos, 1) if eos in row[1:] else len(row)
        flat.extend((k * length + i, int(row[i])) for i in range(1, end) if row[i] != bos)
    ids = [t for _, t in flat]
    found: set[int] = set()
    for start in find_subsequence(ids, list(needle)):
        found.update(flat[i][0] for i in range(start, start + len(needle)))
    return sorted(found)


def from_readable(text: str) -> str:
    """Undo readable(): <U+XXXX> back to the character it names."""
    return re.sub(r"<U\+([0-9A-Fa-f]{4,6})>", lambda m: chr(int(m.group(1), 16)), text)
