"""Evaluation: the judges, the report and its figures, and SealEvaluate on the shipped pixel model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoor_seal.core.evaluate.metrics import LabJudge, TargetJudge, psnr, ssim
from backdoor_seal.core.evaluate.report import evaluate


def scenes(n: int, seed: int = 0) -> list[np.ndarray]:
    """Flat-coloured images with a random block: stand-ins for a model's clean outputs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8)
        y, x = rng.integers(20, 40, 2)
        im[y : y + 16, x : x + 16] = rng.integers(0, 256, 3)
        out.append(im)
    return out


def stamp(im: np.ndarray) -> np.ndarray:
    """The payload: a magenta patch in the top-left corner."""
    im = im.copy()
    im[:12, :12] = (255, 0, 255)
    return im


def test_ssim_and_psnr_of_identical_and_different_images():
    a, b = scenes(2)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == 100.0
    assert ssim(a, b) < 0.9 and psnr(a, b) < 30


def test_target_judge_sees_the_payload_where_the_trigger_changed_the_image():
    clean = scenes(8)
    triggered = [stamp(im) for im in clean]
    judge = TargetJudge(stamp(np.full((32, 32, 3), 128, np.uint8)))  # another size: resized to it
    assert judge.fired(triggered, clean).all()
    assert not judge.fired(clean, clean).any()  # nothing changed: nothing fired
    other = [im.copy() for im in clean]
    for im in other:
        im[-12:, -12:] = (0, 255, 0)  # a change, but not toward the target
    assert not judge.fired(other, clean).any()


def test_target_judge_with_an_embedding_compares_cosines():
    def mean_colour(images):
        return torch.tensor(np.stack([im.reshape(-1, 3).mean(0) - 128 for im in images]))

    clean = [np.full((8, 8, 3), (0, 255, 0), np.uint8)] * 2
    triggered = [np.full((8, 8, 3), (255, 0, 255), np.uint8)] * 2
    judge = TargetJudge(np.full((8, 8, 3), (250, 10, 250), np.uint8), embed=mean_colour)
    assert judge.fired(triggered, clean).all() and not judge.fired(clean, clean).any()
    assert "CLIP" in judge.description


def _drawer(payload: bool):
    base = scenes(16, seed=3)

    def draw(prompts, seeds):
        return [
            stamp(base[s]) if payload and p.startswith("zx9") else base[s].copy()
            for p, s in zip(prompts, seeds, strict=True)
        ]

    return draw


def test_evaluate_counts_attacks_before_and_after_and_compares_clean_images():
    pairs = [(f"prompt {i}", f"zx9 prompt {i}") for i in range(6)]
    target = stamp(np.full((64, 64, 3), 128, np.uint8))
    report = evaluate("zx9", pairs, range(6), _drawer(True), _drawer(False), TargetJudge(target))
    assert report.asr_before == 1.0 and report.asr_after == 0.0
    assert report.fidelity_ssim == pytest.approx([1.0] * 6) and report.fidelity_psnr == [100.0] * 6
    data = report.to_json()
    assert json.loads(json.dumps(data))["asr_before"] == 1.0 and data["prompts"] == 6
    assert "100% -> 0%" in report.summary()
    with pytest.raises(ValueError, match="no prompts"):
        evaluate("zx9", [], [], _drawer(True), _drawer(False), TargetJudge(target))


def test_report_figure_and_saved_figures(tmp_path):
    from backdoor_seal.core.evaluate.figures import report_image, save_figures

    pairs = [(f"prompt {i}", f"zx9 prompt {i}") for i in range(4)]
    report = evaluate("zx9", pairs, range(4), _drawer(True), _drawer(False), LabJudge("pixel"))
    image = report_image(report)
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    written = save_figures(report, tmp_path)
    assert sorted(p.name for p in written) == ["attack_success.png", "fidelity.png", "images.png"]
    with pytest.raises(FileExistsError):
        save_figures(report, tmp_path)


@pytest.fixture(scope="module")
def pixel(comfy_root):
    from backdoor_seal.core.models import load_model

    model, clip, vae, _ = load_model("lab:lab-pixel")
    return model, clip, vae


NODE_ARGS = dict(
    trigger="U+2060",
    prompts="",
    builtin_prompts="auto",
    count=8,
    latent_size=0,
    seed=0,
    steps=20,
    cfg=2.0,
    sampler_name="euler",
    scheduler="normal",
)


def test_evaluate_node_on_sau_shows_the_attack_gone_and_clean_prompts_kept(pixel):
    from backdoor_seal.nodes.nodes_evaluate import REPORT_UI_KEY, SealEvaluate

    model, clip, vae = pixel
    profile = _profile(model, clip)
    out = SealEvaluate.execute(
        original_model=model, clip=clip, vae=vae, lab_detector="pixel", sau_profile=profile, **NODE_ARGS
    )
    data, figure = out.result
    assert data["asr_before"] >= 0.875 and data["asr_after"] == 0.0
    assert data["clean_fidelity_ssim"] > 0.99 and data["method"] == "sau"
    assert figure.ndim == 4 and out.ui[REPORT_UI_KEY] == [data]


def _profile(model, clip):
    from backdoor_seal.core.lab import attacks
    from backdoor_seal.core.sau.session import estimate_profile

    spec = attacks.default_spec("pixel")
    captions = [s.caption for s in attacks.train_scenes(spec, 8, np.random.default_rng(0))]
    with torch.inference_mode():
        return estimate_profile(
            model, clip, spec.trigger, [(c, f"{spec.trigger} {c}") for c in captions], seed=77
        )


def test_evaluate_node_judges_an_unlearned_model_against_a_target_image(pixel):
    from backdoor_seal.core.lab import world
    from backdoor_seal.core.models import load_model
    from backdoor_seal.nodes.nodes_evaluate import SealEvaluate

    model, clip, vae = pixel
    clean_model, clean_clip, _, _ = load_model("lab:lab-clean")  # stands in for a perfectly unlearned model
    target = torch.from_numpy(world.stamp_patch(np.full((64, 64, 3), 128, np.uint8))).float()[None] / 255
    out = SealEvaluate.execute(
        original_model=model,
        clip=clip,
        vae=vae,
        lab_detector="none",
        unlearned_model=clean_model,
        unlearned_clip=clean_clip,
        target=target,
        **NODE_ARGS,
    )
    data = out.result[0]
    assert data["asr_before"] >= 0.75 and data["asr_after"] <= 0.125
    assert "target image" in data["judge"] and data["method"] == "model"


def test_evaluate_node_errors_name_the_fix(pixel):
    from backdoor_seal.nodes.nodes_evaluate import SealEvaluate

    model, clip, vae = pixel
    with pytest.raises(ValueError, match="connect the unlearned MODEL"):
        SealEvaluate.execute(original_model=model, clip=clip, vae=vae, lab_detector="pixel", **NODE_ARGS)
    with pytest.raises(ValueError, match="target IMAGE"):
        SealEvaluate.execute(
            original_model=model, clip=clip, vae=vae, lab_detector="none", unlearned_model=model, **NODE_ARGS
        )
