"""SealDetectPrompt and SealScanModel: find a backdoor's trigger in prompts, or in the whole vocabulary."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..core.detect.masking import MaskingSettings
from ..core.detect.prompts import (
    builtin_clean_prompts,
    calibrate_on,
    detect_prompt,
    probe_latent_shape,
    transplant_scanner,
)
from ..core.detect.report import scan_image, token_scores_image
from ..core.detect.scan import ScanSettings, VocabularyScanner
from ..core.tokens import readable
from .nodes_unlearn import DetectionReport

CATEGORY = "backdoor-seal/detect"
PROMPT_SETS = ("auto", "general", "lab")


def is_lab_model(model) -> bool:
    """Whether a MODEL is one of the pack's lab models (8x8 latents, lab grammar)."""
    return type(getattr(model.model, "model_config", None)).__name__ == "LabSD"


def calibration_prompts(model, text: str, builtin: str, n: int, seed: int = 1) -> list[str]:
    """The user's clean prompts followed by the built-in set (auto: the lab grammar for lab models)."""
    lab = is_lab_model(model) if builtin == "auto" else builtin == "lab"
    own = [p.strip() for p in text.splitlines() if p.strip()]
    return own + builtin_clean_prompts(lab, n, seed)


def latent_shape(model, side: int) -> tuple[int, int, int]:
    """Probe latent: the given side, or 8 for lab models and 64 for real ones when 0."""
    return probe_latent_shape(is_lab_model(model), side)


def _text_and_images(text: str, images: torch.Tensor, cls) -> dict:
    """UI output showing a text and images together in the node."""
    return {**ui.PreviewImage(images, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}


def _prompt_set_inputs() -> list:
    return [
        io.String.Input(
            "clean_prompts",
            multiline=True,
            default="",
            optional=True,
            tooltip="Prompts you know are clean, one per line, for calibration (added to the built-in set).",
        ),
        io.Combo.Input(
            "builtin_prompts",
            options=list(PROMPT_SETS),
            default="auto",
            optional=True,
            tooltip="auto: the lab grammar for lab models, everyday captions otherwise.",
        ),
        io.Int.Input(
            "latent_size", default=0, min=0, max=256, optional=True, tooltip="Probe latent side; 0 = auto."
        ),
    ]


class SealDetectPrompt(io.ComfyNode):
    """Scores prompts for a trigger (token masking; each token transplanted into clean probes) and names it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealDetectPrompt",
            display_name="Seal Detect Prompt",
            category=CATEGORY,
            description="For each prompt, masks every token in turn and measures how much one denoising step "
            "moves (UNet change over text-embedding change, and how much the other words' embeddings move), and "
            "puts each token in front of clean probe prompts to see whether it forces the same change on all. "
            "Thresholds are calibrated on clean prompts of the same model. Outputs a report (connect it to "
            "Seal Unlearn as the trigger source) and a chart of per-token scores.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input(
                    "prompts", multiline=True, default="", tooltip="Prompts to check, one per line."
                ),
                *_prompt_set_inputs(),
            ],
            outputs=[DetectionReport.Output("REPORT"), io.Image.Output("TOKEN_SCORES")],
        )

    @classmethod
    def execute(
        cls, model, clip, prompts, clean_prompts="", builtin_prompts="auto", latent_size=0
    ) -> io.NodeOutput:
        from ..core.backends.comfy_probe import ComfyProbe
        from ..core.lab.zoo import parse_trigger

        checked = [parse_trigger(p.strip()) for p in prompts.splitlines() if p.strip()]
        if not checked:
            raise ValueError("no prompt to check: write one prompt per line in 'prompts'")
        probe = ComfyProbe(model, clip)
        settings = MaskingSettings(latent_shape=latent_shape(model, latent_size))
        calibration_set = calibration_prompts(model, clean_prompts, builtin_prompts, 24)
        probes = calibration_prompts(model, "", builtin_prompts, 32, seed=0)  # apart from the calibration set
        transplant = transplant_scanner(probe, probes, settings.latent_shape)
        bar = comfy.utils.ProgressBar(len(calibration_set) + len(checked))

        def tick() -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update(1)

        calibration = calibrate_on(probe, calibration_set, settings, transplant, progress=tick)
        reports = []
        for p in checked:
            reports.append(detect_prompt(probe, p, calibration, settings, transplant=transplant).to_dict())
            tick()
        flagged = [r for r in reports if r["poisoned"]]
        report = {
            "kind": "prompt",
            "poisoned": bool(flagged),
            "trigger": flagged[0]["trigger"] if flagged else None,
            "thresholds": calibration.thresholds,
            "prompts": reports,
        }
        images = [token_scores_image(r) for r in reports]
        h = max(i.shape[1] for i in images)
        w = max(i.shape[2] for i in images)
        padded = torch.ones(len(images), h, w, 3)
        for k, i in enumerate(images):
            padded[k, : i.shape[1], : i.shape[2]] = i[0]
        lines = [
            f"{'TRIGGERED' if r['poisoned'] else 'clean'}: {r['prompt']}"
            + (f"  -> trigger {readable(r['trigger'])!r}" if r["poisoned"] else "")
            for r in reports
        ]
        return io.NodeOutput(report, padded, ui=_text_and_images("\n".join(lines), padded, cls))


class SealScanModel(io.ComfyNode):
    """Ranks every vocabulary token by how strongly it hijacks the model: no triggered prompt needed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealScanModel",
            display_name="Seal Scan Model",
            category=CATEGORY,
            description="Puts every token of the tokenizer's vocabulary in front of clean prompts, takes one "
            "denoising step and ranks the tokens by how far they move the image; the strongest are re-scored "
            "on many prompts by the change all prompts share, and flagged when they stand out even among "
            "those. Lab models take minutes on a CPU; SD checkpoints need a GPU.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Int.Input("candidates", default=ScanSettings.candidates, min=4, max=1024, optional=True),
                io.Int.Input(
                    "stage1_probes", default=ScanSettings.stage1_probes, min=1, max=16, optional=True
                ),
                io.Int.Input(
                    "stage2_probes", default=ScanSettings.stage2_probes, min=2, max=64, optional=True
                ),
                io.Float.Input(
                    "threshold_z",
                    default=ScanSettings.threshold_z,
                    min=0.0,
                    max=100.0,
                    step=0.5,
                    optional=True,
                    tooltip="Robust z-score (against every token the second stage scored) above which a "
                    "token is flagged.",
                ),
                *_prompt_set_inputs(),
            ],
            outputs=[DetectionReport.Output("REPORT"), io.Image.Output("PLOT")],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        candidates=ScanSettings.candidates,
        stage1_probes=ScanSettings.stage1_probes,
        stage2_probes=ScanSettings.stage2_probes,
        threshold_z=ScanSettings.threshold_z,
        clean_prompts="",
        builtin_prompts="auto",
        latent_size=0,
    ) -> io.NodeOutput:
        from ..core.backends.comfy_probe import ComfyProbe

        settings = ScanSettings(
            candidates=candidates,
            stage1_probes=stage1_probes,
            stage2_probes=stage2_probes,
            threshold_z=threshold_z,
            latent_shape=latent_shape(model, latent_size),
        )
        prompts = calibration_prompts(model, clean_prompts, builtin_prompts, max(32, stage2_probes))
        bar = comfy.utils.ProgressBar(1)

        def progress(done: int, total: int) -> None:
            bar.update_absolute(done, total)

        scanner = VocabularyScanner(
            ComfyProbe(model, clip),
            prompts,
            settings,
            progress,
            comfy.model_management.throw_exception_if_processing_interrupted,
        )
        report = scanner.run().to_dict()
        plot = scan_image(report)
        top = "\n".join(
            f"{k + 1}. {readable(c['text'])!r} z={c['score_z']:.1f}{'  FLAGGED' if c['flagged'] else ''}"
            for k, c in enumerate(report["candidates"][:10])
        )
        head = (
            f"poisoned: trigger {readable(report['trigger'])!r}"
            if report["poisoned"]
            else "no token above threshold"
        )
        return io.NodeOutput(report, plot, ui=_text_and_images(f"{head}\n{top}", plot, cls))
