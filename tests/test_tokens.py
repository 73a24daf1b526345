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
