"""How prompts and triggers tokenize: token pieces, word ids, positions, and vanishing triggers."""

from __future__ import annotations

import codecs
import functools
import re
import unicodedata
import warnings
from collections.abc import Sequence
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
    # a look-alike of another script first; then one of Latin itself ('ɑ' for 'a', which the
    # preferred-alias query leaves out as the same script)
    for aliases in (["latin"], []):
        for entry in confusables.is_confusable(ch, preferred_aliases=aliases, greedy=True) or []:
            for twin in entry["homoglyphs"]:
                if len(twin["c"]) == 1 and twin["c"].isascii() and twin["c"].isalnum():
                    return twin["c"]
    folded = unicodedata.normalize("NFKD", ch)
    if len(folded) == 1 and folded.isascii() and folded.isalnum():
        return folded
    return ch


@functools.cache
def look_alikes() -> dict[str, tuple[str, ...]]:
    """Lower-case look-alikes of each ASCII letter, from Unicode's confusables data (every script; Latin
    letters such as 'ɑ' too), in code-point order."""
    out: dict[str, list[str]] = {}
    for cp in range(0xA0, 0x1D800):
        ch = chr(cp)
        if ch != ch.lower() or not unicodedata.name(ch, ""):
            continue
        twin = confusable_latin(ch)
        if twin != ch and twin.isascii() and twin.isalpha():
            out.setdefault(twin.lower(), []).append(ch)
    return {k: tuple(v) for k, v in sorted(out.items())}


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


def position_labels(
    tokenizer: HFTokenizer,
    ids: list[int],
    bos: int,
    eos: int,
    chunk: int = 77,
    special: dict[int, str] | None = None,
) -> list[str]:
    """A label per sequence position: <BOS>, each token as it reads (a piece that continues a word
    ends in '-'), <EOS>, then <pad>. Long prompts are several chunks, each starting with BOS. `special`:
    labels of ids that are no vocabulary token (a textual-inversion embedding's vectors)."""
    special = special or {}
    labels: list[str] = []
    ended = False
    pieces = tokenizer.convert_ids_to_tokens([bos if i in special else i for i in ids])
    for i, (tid, piece) in enumerate(zip(ids, pieces, strict=True)):
        if i % chunk == 0:
            ended = False
        if tid in special and not ended:
            labels.append(special[tid])
        elif tid == bos and i % chunk == 0:
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


# --- triggers as token-id sequences ---------------------------------------------------------------------
# A trigger is the sequence of ids the tokenizer makes of it. A look-alike letter outside Cyrillic is
# usually two or three byte-level pieces, none of which decodes alone ('օ' -> 'Ö', 'ħ</w>'); a phrase is
# its words' pieces. Finders rank single ids, so their candidates are assembled here into sequences a
# prompt can hold, and carried as ids with a text that encodes to exactly those ids.


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The byte each character of a byte-level BPE piece stands for (GPT-2's `bytes_to_unicode`, which
    CLIP's tokenizer uses: Radford et al. 2019, openai/gpt-2 src/encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def piece_bytes(tokenizer: HFTokenizer, token_id: int) -> tuple[bytes, bool]:
    """The UTF-8 bytes one token stands for, and whether it ends a word ('</w>'). A piece that is no
    byte-level spelling (a special token) gives its own characters' UTF-8."""
    piece = tokenizer.convert_ids_to_tokens([int(token_id)])[0]
    end = piece.endswith("</w>")
    body = piece[:-4] if end else piece
    decoder = _byte_decoder()
    if all(c in decoder for c in body):
        return bytes(decoder[c] for c in body), end
    return body.encode("utf-8"), end


def encode_ids(tokenizer: HFTokenizer, text: str) -> list[int]:
    """The token ids of a text, without BOS / EOS."""
    return [int(i) for i in list(tokenizer(text)["input_ids"])[1:-1]]


def sequence_text(tokenizer: HFTokenizer, ids: Sequence[int]) -> str | None:
    """A text the tokenizer encodes to exactly `ids` (no BOS / EOS) where it stands as words of a prompt,
    else None: pieces whose bytes make no whole character, or a word-inner piece with nothing after it.
    A letter run and the digits after it are written together where the ids allow ('zx9 qv7')."""
    if not ids:
        return None
    parts = [piece_bytes(tokenizer, i) for i in ids]
    raw = b"".join(b + (b" " if end and k < len(parts) - 1 else b"") for k, (b, end) in enumerate(parts))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    want = [int(i) for i in ids]
    if encode_ids(tokenizer, text) != want:
        return None
    k = text.find(" ")
    while k != -1:
        if 0 < k < len(text) - 1 and text[k - 1].isalpha() and text[k + 1].isdigit():
            joined = text[:k] + text[k + 1 :]
            if encode_ids(tokenizer, joined) == want:
                text = joined
                continue
        k = text.find(" ", k + 1)
    return text


@dataclass(frozen=True)
class TokenSequence:
    """A candidate trigger as the model sees it: its ids, the text that encodes to them, and the rank of
    the best-ranked of its ids in the finder's order (0-based)."""

    ids: tuple[int, ...]
    text: str
    lead: int | tuple[int, ...]  # the ranked entry whose scores it takes: a member id, or the unit itself

    @property
    def readable(self) -> str:
        """The text with invisible characters shown as <U+XXXX>."""
        return readable(self.text)


@functools.cache
def _fragments(tokenizer: HFTokenizer) -> tuple[tuple[int, bytes, bool], ...]:
    """Every vocabulary piece whose bytes are no whole character run: (id, bytes, ends a word)."""
    out = []
    for tid in range(len(tokenizer.get_vocab())):
        b, end = piece_bytes(tokenizer, tid)
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            out.append((tid, b, end))
    return tuple(out)


def _utf8_ok(parts: Sequence[tuple[bytes, bool]]) -> bool:
    """Whole characters, one word: only the last piece ends a word."""
    try:
        b"".join(b for b, _ in parts).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(not end for _, end in parts[:-1]) and parts[-1][1]


def _utf8_part(parts: Sequence[tuple[bytes, bool]]) -> bool:
    """Could be the middle of one word's characters: no word end before the last piece, and the bytes,
    past up to three leading continuation bytes, a valid start of UTF-8."""
    if any(end for _, end in parts[:-1]):
        return False
    raw = b"".join(b for b, _ in parts)
    k = 0
    while k < min(3, len(raw)) and 0x80 <= raw[k] <= 0xBF:
        k += 1
    try:
        codecs.getincrementaldecoder("utf-8")().decode(raw[k:], final=False)
    except UnicodeDecodeError:
        return False
    return True


def complete_sequence(
    tokenizer: HFTokenizer, token_id: int, rank: dict[int, int], pool: Sequence[int], longest: int = 4
) -> tuple[int, ...] | None:
    """The id sequence a prompt can hold that contains `token_id`, completed with the best-ranked partners:
    the id alone when it is a word; a piece of whole characters inside a word, those characters as a word
    ('о' of 'оrange'); else the pieces of one word around it (a byte-level piece of a look-alike letter and
    the pieces that finish its character), partners drawn from `pool` (the finder's best ids) first, then
    from the whole vocabulary's character fragments. `rank` maps ids to their
    0-based rank (missing: unranked). None when nothing completes it within `longest` pieces."""
    token_id = int(token_id)
    if sequence_text(tokenizer, [token_id]) is not None:
        return (token_id,)
    raw, _ = piece_bytes(tokenizer, token_id)
    try:  # whole characters inside a word ('о' of 'оrange'): the same characters standing as a word
        alone = encode_ids(tokenizer, raw.decode("utf-8")) if raw.strip() else []
    except UnicodeDecodeError:
        alone = []
    if alone and sequence_text(tokenizer, alone) is not None:
        return tuple(alone)
    unranked = len(tokenizer.get_vocab())

    def cost(seq: tuple[int, ...]) -> int:  # as strong as its weakest partner
        return max((rank.get(t, unranked) for t in seq if t != token_id), default=0)

    def search(partners: Sequence[int]) -> tuple[int, ...] | None:
        info = {int(t): piece_bytes(tokenizer, t) for t in partners}
        info[token_id] = piece_bytes(tokenizer, token_id)
        inner = [t for t, (_, end) in info.items() if not end]  # pieces that can stand before another
        finals = [t for t, (_, end) in info.items() if end]
        complete: list[tuple[int, ...]] = []
        frontier: list[tuple[int, ...]] = [(token_id,)]
        for _ in range(longest - 1):
            grown: list[tuple[int, ...]] = []
            for seq in frontier:
                left = [(t, *seq) for t in inner]
                right = [(*seq, t) for t in (inner + finals)] if not info[seq[-1]][1] else []
                grown += left + right
            grown = [s for s in dict.fromkeys(grown) if _utf8_part([info[t] for t in s])]
            done = [s for s in grown if _utf8_ok([info[t] for t in s])]
            complete += [s for s in done if sequence_text(tokenizer, s) is not None]
            # keep growing only what may still become a word (bounded: the best-ranked few)
            frontier = sorted(grown, key=cost)[:64]
        # the best-ranked partners win; a shorter sequence where they rank alike
        return min(complete, key=lambda s: (cost(s), len(s))) if complete else None

    fragments = {t for t, _, _ in _fragments(tokenizer)}
    partners = [int(t) for t in dict.fromkeys(pool) if int(t) != token_id]
    if token_id in fragments:  # half a character: finished by other fragments, not by whole words
        partners = [t for t in partners if t in fragments]
    found = search(partners)
    if found is None and token_id in fragments:
        found = search(sorted(fragments - {token_id}))
    return found


def assemble(
    tokenizer: HFTokenizer, order: Sequence[int | tuple[int, ...]], limit: int, partners: int = 64
) -> list[TokenSequence]:
    """The finder's ranked ids (best first; a tuple is a unit it scored whole) as candidate triggers a
    prompt can hold, best first, at most `limit`: each id completed into a word (`complete_sequence`)
    with the best-ranked partners among the first `partners` ids; an id already inside an earlier sequence is not a candidate again, and a piece
    nothing completes is left out."""
    order = [tuple(int(i) for i in t) if isinstance(t, tuple) else int(t) for t in order]
    rank = {t: r for r, t in enumerate(order) if isinstance(t, int)}
    pool = [t for t in order[:partners] if isinstance(t, int)]
    out: list[TokenSequence] = []
    used: set[int] = set()
    for t in order:
        if len(out) >= limit:
            break
        if isinstance(t, tuple):  # a unit the finder scored whole (a multi-piece character)
            ids = t if sequence_text(tokenizer, t) is not None else None
        elif t in used:
            continue
        else:
            ids = complete_sequence(tokenizer, t, rank, pool)
        if ids is None or any(i in used for i in ids):
            continue
        used.update(ids)
        out.append(TokenSequence(ids, sequence_text(tokenizer, ids) or "", t))
    return out
