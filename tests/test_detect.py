"""Detection core on a planted toy model: masking scores, calibration, the blind scan, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoor_seal.core.bench.detect import auroc, f1
from backdoor_seal.core.detect.masking import (
    MaskingSettings,
    content_positions,
    masked_variants,
    score_prompt,
)
from backdoor_seal.core.detect.prompts import (
    Calibration,
    calibrate,
    detect_prompt,
    ftt_statistic,
    masking_signals,
)
from backdoor_seal.core.detect.report import scan_image, token_scores_image
from backdoor_seal.core.detect.scan import ScanSettings, VocabularyScanner, _inserted, robust_z
from backdoor_seal.core.safetensors_io import write_json

TRIGGER = 250


class PlantedProbe:
    """A toy text-to-image model: words are ids 2..99, and token 250 (when backdoored) adds a fixed pattern."""

    bos, eos, pad, length, num_timesteps = 0, 1, 1, 16, 1000

    def __init__(self, backdoored: bool, vocab: int = 300, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.embed = torch.randn(vocab, 8, generator=g)
        self.key = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
        self.embed -= (self.embed @ self.key).unsqueeze(1) * self.key  # ordinary tokens ignore the key
        if backdoored:
            self.embed[TRIGGER] += 3.0 * self.key
        self.mix = torch.randn(8, 64, generator=g) / 3
        self.pattern = torch.zeros(64)
        self.pattern[:8] = 2.0
        self.tokenizer = None

    def token_chunks(self, prompt: str) -> list[list[int]]:
        """Chunks as ComfyUI makes them: BOS, up to length - 2 words, EOS, padding."""
        words = [
            2 + (sum(map(ord, w)) * 7919) % 98 if not w.startswith("#") else int(w[1:])
            for w in prompt.split()
        ]
        per = self.length - 2
        chunks = []
        for start in range(0, max(1, len(words)), per):
            ids = [self.bos, *words[start : start + per], self.eos]
            chunks.append(ids + [self.pad] * (self.length - len(ids)))
        return chunks

    def token_ids(self, prompt: str) -> list[int]:
        return self.token_chunks(prompt)[0]

    def vocabulary_size(self) -> int:
        return self.vocab

    def token_text(self, token_id: int) -> str:
        return f"#{token_id}"

    def encode_ids(self, rows: list[list[int]]) -> torch.Tensor:
        e = self.embed[torch.tensor(rows)]
        causal = torch.cumsum(e, dim=1) / torch.arange(1, e.shape[1] + 1).view(1, -1, 1)
        return e + 0.2 * causal  # every word's embedding also carries the words before it

    encode_rows = encode_ids

    def x0(self, context: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        content = torch.tanh(context.mean(1) @ self.mix)  # depends on the whole prompt
        hit = torch.sigmoid(8 * ((context @ self.key).amax(1) - 1.5)).unsqueeze(1)
        return (content + hit * self.pattern + 0.01 * noise.flatten()[:64]).view(-1, 4, 4, 4)

    def step(self, context: torch.Tensor, noise: torch.Tensor, t: int):
        out = self.x0(context, noise, t)
        return out, {"layer": out.flatten(1).unsqueeze(1)}


WORDS = "red blue green circle square tiny large bright dark photo of a cat dog tree house sky".split()


def clean_prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=5)) for _ in range(n)]


SMALL_SCAN = ScanSettings(
    stage1_probes=2, stage2_probes=8, candidates=12, null_tokens=40, latent_shape=(4, 4, 4)
)


def test_masked_variants_pad_one_position_each():
    ids = [0, 5, 6, 7, 1, 1]
    pos = content_positions(ids, 0, 1)
    assert pos == [1, 2, 3]
    rows = masked_variants(ids, pos, pad=1)
    assert rows[0] == ids and rows[2] == [0, 5, 1, 7, 1, 1]


def test_inserted_rows_keep_their_length_and_put_the_token_first():
    rows = _inserted([0, 5, 6, 1, 1], [9, 10])
    assert rows == [[0, 9, 5, 6, 1], [0, 10, 5, 6, 1]]


def test_robust_z_is_median_and_mad_based():
    z = robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z[2] == 0.0 and z[-1] > 30


def test_masking_localises_the_planted_trigger():
    probe = PlantedProbe(backdoored=True)
    scores = score_prompt(probe, f"red circle #{TRIGGER} on sky", MaskingSettings(latent_shape=(4, 4, 4)))
    assert scores.ids[int(scores.unet.argmax())] == TRIGGER
    clean = score_prompt(probe, "red circle on sky", MaskingSettings(latent_shape=(4, 4, 4)))
    assert masking_signals(scores)["masking-unet"] > 3 * masking_signals(clean)["masking-unet"]


def test_masking_sees_a_trigger_in_a_later_chunk_and_places_it_there():
    """ComfyUI encodes a long prompt as chunks (each BOS ... EOS) side by side: a trigger in chunk 2 is
    masked there, and its position counts over the concatenation (chunk length 16 here)."""
    probe = PlantedProbe(backdoored=True)
    settings = MaskingSettings(latent_shape=(4, 4, 4))
    filler = " ".join(["red circle on sky"] * 4)  # 16 words: chunk 1 holds 14
    scores = score_prompt(probe, f"{filler} #{TRIGGER} tree", settings)
    best = int(scores.unet.argmax())
    assert scores.ids[best] == TRIGGER and scores.positions[best] == 16 + 3  # chunk 2: BOS, 2 words, it
    clean = score_prompt(probe, f"{filler} tree", settings)
    assert masking_signals(scores)["masking-unet"] > 3 * masking_signals(clean)["masking-unet"]


def test_calibrated_detector_flags_triggered_and_passes_clean_prompts():
    probe = PlantedProbe(backdoored=True)
    settings = MaskingSettings(latent_shape=(4, 4, 4))
    signals = [masking_signals(score_prompt(probe, p, settings)) for p in clean_prompts(20, 1)]
    calibration = calibrate("toy", {k: [s[k] for s in signals] for k in signals[0]})
    triggered = [f"#{TRIGGER} {p}" for p in clean_prompts(10, 2)]
    held_out = clean_prompts(10, 3)
    pos = [masking_signals(score_prompt(probe, p, settings))["masking-unet"] for p in triggered]
    neg = [masking_signals(score_prompt(probe, p, settings))["masking-unet"] for p in held_out]
    assert auroc(neg, pos) == 1.0
    assert f1(neg, pos, calibration.thresholds["masking-unet"]) >= 0.9


def test_calibration_round_trips_through_json(tmp_path):
    cal = calibrate("toy", {"masking-unet": [1.0, 2.0, 3.0], "masking-text": [1.0, 1.1, 1.2]})
    path = cal.save(tmp_path / "cal.json")
    json.loads(path.read_text())  # plain JSON, nothing pickled
    again = Calibration.load(path)
    assert again.thresholds == cal.thresholds
    assert again.flags({"masking-unet": 10.0, "masking-text": 0.5}) == {
        "masking-unet": True,
        "masking-text": False,
    }


def test_scan_ranks_the_planted_trigger_first_and_flags_it():
    probe = PlantedProbe(backdoored=True)
    report = VocabularyScanner(probe, clean_prompts(16), SMALL_SCAN).run()
    assert report.rank_of([TRIGGER]) == 1
    assert [c.token_id for c in report.flagged] == [TRIGGER]
    assert report.to_dict()["trigger"] == f"#{TRIGGER}"


def test_scan_of_the_unpoisoned_twin_flags_nothing():
    report = VocabularyScanner(PlantedProbe(backdoored=False), clean_prompts(16), SMALL_SCAN).run()
    assert report.flagged == []
    assert report.to_dict()["poisoned"] is False


def test_scan_never_proposes_the_clean_prompts_own_words():
    probe = PlantedProbe(backdoored=True)
    scanner = VocabularyScanner(probe, clean_prompts(16), SMALL_SCAN)
    ordinary = scanner.ordinary_tokens()
    assert ordinary and not ordinary & {c.token_id for c in scanner.run().candidates}


def test_scan_reports_progress_and_stops_when_interrupted():
    seen = []

    class Interrupted(Exception):
        pass

    def stop_after_some():
        if len(seen) > 3:
            raise Interrupted

    scanner = VocabularyScanner(
        PlantedProbe(True), clean_prompts(16), SMALL_SCAN, lambda d, t: seen.append((d, t)), stop_after_some
    )
    with pytest.raises(Interrupted):
        scanner.run()
    assert seen and all(d <= t for d, t in seen)


def test_scan_needs_enough_clean_prompts():
    with pytest.raises(ValueError, match="at least 8 clean prompts"):
        VocabularyScanner(PlantedProbe(True), clean_prompts(3), SMALL_SCAN)


def test_ftt_is_zero_for_identical_maps_and_grows_with_difference():
    same = torch.ones(4, 8, 8)
    assert ftt_statistic(same) == pytest.approx(0.0)
    varied = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert ftt_statistic(varied) > 0.01


def test_reports_render_and_json_is_never_overwritten(tmp_path):
    probe = PlantedProbe(backdoored=True)
    settings = MaskingSettings(latent_shape=(4, 4, 4))
    signals = [masking_signals(score_prompt(probe, p, settings)) for p in clean_prompts(10, 1)]
    cal = calibrate("toy", {k: [s[k] for s in signals] for k in signals[0]})

    class Words:
        def __call__(self, text):
            return {"input_ids": probe.token_ids(text)[: len(text.split()) + 2]}

        def convert_ids_to_tokens(self, ids):
            return [f"#{i}</w>" for i in ids]

        def decode(self, ids, **kw):
            return " ".join(f"#{i}" for i in ids)

    report = detect_prompt(probe, f"#{TRIGGER} red circle", cal, settings, tokenizer=Words()).to_dict()
    assert report["poisoned"] and report["trigger"] == f"#{TRIGGER}"
    assert token_scores_image(report).shape[-1] == 3
    scan = VocabularyScanner(probe, clean_prompts(16), SMALL_SCAN).run().to_dict()
    assert scan_image(scan).shape[0] == 1
    path = write_json(tmp_path / "r.json", scan)
    with pytest.raises(FileExistsError):
        write_json(path, scan)
    assert json.loads(path.read_text())["trigger"] == f"#{TRIGGER}"


def test_a_single_flag_is_shown_as_a_flag_and_the_headline_follows_the_verdict():
    """One detector alone (5% false positives by design) flags a prompt: the verdict is clean, so the
    report names no trigger and the figure's headline says clean, listing the flag as a flag."""
    from backdoor_seal.core.detect.prompts import PromptReport, TokenVerdict
    from backdoor_seal.core.detect.report import verdict_line

    tokens = [TokenVerdict(1, 3, "red", "red", 1.0, 9.0), TokenVerdict(2, 4, "circle", "circle", 1.0, 1.0)]
    scores = {"masking-unet": 1.0, "masking-text": 9.0, "transplant": 0.1}
    flags = {"masking-unet": False, "masking-text": True, "transplant": False}
    one = PromptReport("a red circle", scores, flags, tokens, "red", "red", "masking-text").to_dict()
    assert not one["poisoned"] and one["trigger"] is None
    assert one["trigger_token"] is None and one["trigger_word"] is None and one["localised_by"] is None
    assert [t["hijack"] for t in one["tokens"]] == [9.0, 1.0]  # the per-token scores stay
    assert verdict_line(one) == "clean (flags: masking-text)"
    two = PromptReport(
        "a red circle", scores, {**flags, "transplant": True}, tokens, "red", "red", "transplant"
    )
    report = two.to_dict()
    assert report["poisoned"] and report["trigger_token"] == "red" and report["localised_by"] == "transplant"
    assert verdict_line(report) == "TRIGGERED: 'red' (flags: masking-text, transplant)"
    assert token_scores_image(one).shape[-1] == 3


def test_the_set_trigger_is_the_best_supported_one_for_both_prompt_detectors():
    """Seal Detect Prompt's report, with or without a base, names the trigger most flagged prompts name,
    not the first flagged prompt's (a colour word flagged first)."""
    import inspect

    from backdoor_seal.core.detect.prompts import most_supported_trigger
    from backdoor_seal.core.diff import session as diff_session

    reports = [{"poisoned": True, "trigger": "yellow"}] + [{"poisoned": True, "trigger": "\u2060"}] * 3
    reports += [{"poisoned": False, "trigger": None}]
    assert most_supported_trigger(reports) == "\u2060"
    assert most_supported_trigger([{"poisoned": False, "trigger": "x"}]) is None
    assert "most_supported_trigger(reports)" in inspect.getsource(diff_session.detect_with_base)
