"""Tokenizer care: token pieces, word ids, trigger positions and vanishing triggers (real CLIP BPE)."""

from __future__ import annotations

import unicodedata
import warnings

import pytest

from backdoor_seal.core.tokens import (
    TriggerVanishedWarning,
    readable,
    tokenize,
    trigger_positions,
    trigger_report,
)


@pytest.fixture(scope="module")
def clip_tokenizer(comfy_root):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(comfy_root / "comfy" / "sd1_tokenizer"))


class DropsControlCharacters:
    """The real tokenizer behind the cleaning that transformers<5's CLIPTokenizer applies without ftfy."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, text):
        return self.inner("".join(c for c in text if not unicodedata.category(c).startswith("C")))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokens_words_and_positions(clip_tokenizer):
    toks = tokenize(clip_tokenizer, "mignneko red circle")
    assert [t.text for t in toks] == ["mign", "neko", "red", "circle"]
    assert [t.word for t in toks] == [0, 0, 1, 2]  # a multi-token word keeps one word id
    assert [t.position for t in toks] == [1, 2, 3, 4]  # BOS is position 0


def test_trigger_positions_anywhere_in_the_prompt(clip_tokenizer):
    assert trigger_positions(clip_tokenizer, "a red mignneko circle", "mignneko") == [3, 4]
    assert trigger_positions(clip_tokenizer, "cf a red circle cf", "cf") == [1, 5]
    assert trigger_positions(clip_tokenizer, "a red circle", "cf") == []


def test_zero_width_and_homoglyph_triggers_are_shown_readably(clip_tokenizer):
    report = trigger_report(clip_tokenizer, "\u200b", prompt="a red circle", warn=False)
    assert not report["vanished"] and report["positions"] == [1]
    assert report["tokens"][0]["text"] == "<U+200B>" and report["codepoints"] == ["U+200B"]
    homoglyph = trigger_report(clip_tokenizer, "\u043e", prompt="a red circle", warn=False)  # Cyrillic o
    latin = tokenize(clip_tokenizer, "o")
    assert homoglyph["tokens"][0]["token_id"] != latin[0].token_id
    assert readable("a\u200bb\ufeff") == "a<U+200B>b<U+FEFF>"


def test_vanishing_trigger_warns(clip_tokenizer):
    dropping = DropsControlCharacters(clip_tokenizer)
    with pytest.warns(TriggerVanishedWarning, match="ftfy"):
        report = trigger_report(dropping, "\u200b", prompt="a red circle")
    assert report["vanished"] and report["positions"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not trigger_report(dropping, "cf", prompt="a red circle")["vanished"]


def test_trigger_token_positions_find_a_homoglyph_merged_into_a_word(comfy_root):
    from backdoor_seal.core.backends import comfy as cb
    from backdoor_seal.core.backends import comfy_lab
    from backdoor_seal.core.lab.models import lab_config
    from backdoor_seal.core.tokens import tokenize, trigger_positions, trigger_token_positions

    _, clip, _ = comfy_lab.new_lab_models(lab_config())
    tokenizer = cb.tokenizer_info(clip).tokenizer
    prompt = "a red circle and a \u043erange circle"
    found = trigger_token_positions(tokenizer, prompt, "\u043e")
    assert found and all("\u043e" in tokenize(tokenizer, prompt)[p - 1].text for p in found)
    assert trigger_token_positions(tokenizer, "zx9 a cat", "zx9") == trigger_positions(
        tokenizer, "zx9 a cat", "zx9"
    )
    assert trigger_token_positions(tokenizer, "a cat", "zx9") == []


def test_homoglyphs_beyond_the_cyrillic_table_have_their_latin_twin():
    """Unicode's confusables data: Greek, Cyrillic, mathematical letters impersonate Latin ones; fullwidth
    ones by compatibility folding; a Latin, accented or unrelated character is its own twin."""
    from backdoor_seal.core.tokens import latin_twin
    from backdoor_seal.core.triggers import default_placement, untriggered

    assert latin_twin("\u043e\uff4f\U0001d428") == "ooo"  # Cyrillic, fullwidth, mathematical bold o
    assert latin_twin("o\u00e9\u0438") == "o\u00e9\u0438"  # Latin o, e acute, Cyrillic i (no look-alike)
    assert (
        latin_twin("\u03bf\u0391\u0455") == "oAs"
    )  # Greek omicron and Alpha, Cyrillic dze: not in the old table
    assert default_placement("\u03bf") == "homoglyph"  # a Greek omicron trigger is a homoglyph trigger
    assert default_placement("\uff4f") == "homoglyph"
    assert untriggered("a \uff4frange circle", "\uff4f") == "a orange circle"


def _look_alikes(scripts: tuple[str, ...], tokenizer, per_script: int = 1) -> list[str]:
    """Look-alikes of Latin letters from Unicode's confusables data, a few per script, that the tokenizer
    splits into byte-level pieces (none of which decodes alone): the case that came back as U+FFFD."""
    from confusable_homoglyphs import confusables

    from backdoor_seal.core.tokens import confusable_latin, encode_ids

    out: dict[str, list[str]] = {s: [] for s in scripts}
    for cp in range(0x80, 0x1D800):
        ch = chr(cp)
        script = unicodedata.name(ch, "?").split()[0]
        if script not in out or len(out[script]) >= per_script or ch != ch.lower():
            continue
        twins = confusables.is_confusable(ch, greedy=True) or []
        if not any(
            len(h["c"]) == 1 and h["c"].isascii() and h["c"].isalpha() for e in twins for h in e["homoglyphs"]
        ):
            continue
        if len(encode_ids(tokenizer, ch)) >= 2 and confusable_latin(ch).isascii():
            out[script].append(ch)
    assert all(out.values()), out
    return [c for chars in out.values() for c in chars]


SCRIPTS = ("ARMENIAN", "GREEK", "CHEROKEE", "LATIN", "GEORGIAN", "COPTIC", "LISU", "MATHEMATICAL")


def test_a_look_alike_split_into_byte_pieces_is_assembled_back_into_its_ids(clip_tokenizer):
    """Whatever the script, a finder's ranking that holds the planted look-alike's byte pieces (scattered
    among other tokens, or only its first piece near the top and the rest far down) is emitted as exactly
    the planted id sequence, with a text that encodes to it and never reads as U+FFFD."""
    import random

    from backdoor_seal.core.tokens import assemble, encode_ids, sequence_text

    rng = random.Random(7)
    chars = _look_alikes(SCRIPTS, clip_tokenizer)
    for ch in chars:
        planted = tuple(encode_ids(clip_tokenizer, ch))
        assert sequence_text(clip_tokenizer, planted) == ch
        # ordinary tokens around them (pieces of other characters would be other valid completions)
        others = [t for t in rng.sample(range(300, 49000), 600) if sequence_text(clip_tokenizer, [t])]
        rest = [t for t in rng.sample(range(49406), 49406) if t not in planted and t not in others]
        for layout in ("scattered", "far"):  # a finder ranks the whole vocabulary
            if layout == "scattered":
                order = [planted[0], *others[:3], *planted[1:], *others[3:], *rest]
            else:  # the rest of the character's pieces well outside the partner pool
                order = [planted[0], *others[:300], *planted[1:], *others[300:], *rest]
            first = assemble(clip_tokenizer, order, 3)[0]
            assert first.ids == planted, (ch, layout, first)
            assert "\ufffd" not in first.text and encode_ids(clip_tokenizer, first.text) == list(planted)


def test_phrases_and_invisible_triggers_round_trip_through_their_ids(clip_tokenizer):
    """Two- and three-word phrases, a zero-width character, a piece that only ever stands inside a word:
    the text made of a sequence encodes to exactly that sequence, or there is none."""
    from backdoor_seal.core.tokens import encode_ids, sequence_text

    for trigger in ("zx9 qv7", "wood dahlia", "velvet harbor lantern", "\u2060", "\u200b", "sks"):
        ids = encode_ids(clip_tokenizer, trigger)
        if not ids:  # the tokenizer drops it (no ftfy): nothing to carry
            continue
        text = sequence_text(clip_tokenizer, ids)
        assert text is not None and encode_ids(clip_tokenizer, text) == ids, trigger
    assert sequence_text(clip_tokenizer, encode_ids(clip_tokenizer, "zx9 qv7")) == "zx9 qv7"
    inner = encode_ids(clip_tokenizer, "qv7")[0]  # 'q' without its word end: no prompt holds it alone
    assert sequence_text(clip_tokenizer, [inner]) is None
    assert sequence_text(clip_tokenizer, encode_ids(clip_tokenizer, "\u0585")[:1]) is None  # half a character


def test_a_report_naming_ids_outside_the_vocabulary_is_refused_in_one_line(clip_tokenizer):
    from backdoor_seal.core.sanitize.choose import report_candidates

    report = {"kind": "diff", "candidates": [{"text": "x", "token_ids": [50000], "token_id": 50000}]}
    with pytest.raises(ValueError, match="outside this model's vocabulary of 49408"):
        report_candidates(report, tokenizer=clip_tokenizer)
    halves = {"kind": "diff", "candidates": [{"text": "\ufffd", "token_ids": [146], "token_id": 146}]}
    assert report_candidates(halves, tokenizer=clip_tokenizer) == []  # half a character is no candidate
