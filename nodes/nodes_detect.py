"""SealDetectPrompt and SealScanModel: find a backdoor's trigger in prompts, or in the whole vocabulary."""

from __future__ import annotations

from comfy_api.latest import io

from ..core.detect.report import prompt_verdicts, scan_image, scan_summary, token_scores_images
from ..core.detect.scan import ScanSettings
from ..core.detect.session import DetectOptions, PromptDetection, scan_model, scan_prompts
from ..core.diff.prompts import differential_images
from ..core.diff.session import detect_with_base
from ..core.models import latent_side, prompt_set
from ..core.prompts import prompt_lines
from ..core.triggers import parse_trigger
from .common import CATEGORY as ROOT
from .common import DetectionReport, Progress, latent_size_input, prompt_set_input, text_and_images

CATEGORY = f"{ROOT}/detect"


def prompt_set_inputs() -> list:
    """The clean prompts, the built-in set after them, and the probe latent's size (all optional)."""
    return [
        io.String.Input(
            "clean_prompts",
            multiline=True,
            default="",
            optional=True,
            tooltip="Prompts you know are clean, one per line, for calibration (added to the built-in set).",
        ),
        prompt_set_input(optional=True),
        latent_size_input("Probe latent side; 0 = auto.", optional=True),
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
                *prompt_set_inputs(),
                io.Int.Input(
                    "calibration_prompts",
                    default=DetectOptions.calibration_prompts,
                    min=0,
                    max=256,
                    optional=True,
                    tooltip="Built-in clean prompts the thresholds are calibrated on (after your clean_prompts). "
                    "Each costs about one prompt check; a calibration is cached per model and reused.",
                ),
                io.Model.Input(
                    "base_model",
                    optional=True,
                    tooltip="The base this model was fine-tuned from (with base_clip): each token is then scored "
                    "by what it does to this model minus what it does to the base.",
                ),
                io.Clip.Input("base_clip", optional=True, tooltip="The base's CLIP (with base_model)."),
            ],
            outputs=[DetectionReport.Output("REPORT"), io.Image.Output("TOKEN_SCORES")],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        prompts: str,
        clean_prompts: str = "",
        builtin_prompts: str = "auto",
        latent_size: int = 0,
        calibration_prompts: int = DetectOptions.calibration_prompts,
        base_model: io.Model.Type | None = None,
        base_clip: io.Clip.Type | None = None,
    ) -> io.NodeOutput:
        checked = [parse_trigger(p) for p in prompt_lines(prompts)]
        if not checked:
            raise ValueError("no prompt to check: write one prompt per line in 'prompts'")
        opts = DetectOptions(
            lab=prompt_set(model, builtin_prompts) == "lab",
            latent_side=latent_side(model, latent_size),
            calibration_prompts=calibration_prompts,
        )
        calibration_set = PromptDetection.builtin_calibration(opts, clean_prompts)
        if len(calibration_set) < 2:
            raise ValueError(
                "calibration needs at least 2 clean prompts: write some in clean_prompts or raise "
                "calibration_prompts"
            )
        if (base_model is None) != (base_clip is None):
            raise ValueError("connect both base_model and base_clip (the base's MODEL and CLIP), or neither")
        if base_model is not None:
            progress = Progress(len(calibration_set) + len(checked))
            report = detect_with_base(
                base_model, base_clip, model, clip, checked, calibration_set, opts, progress.tick
            )
            images = differential_images(report["prompts"], report["thresholds"]["threshold_z"])
            return io.NodeOutput(
                report, images, ui=text_and_images(prompt_verdicts(report["prompts"]), images, cls)
            )
        detection = PromptDetection(model, clip, opts)
        progress = Progress(len(calibration_set) + len(checked))
        detection.calibrate(calibration_set, tick=progress.tick)
        report = detection.run(checked, tick=progress.tick)
        images = token_scores_images(report["prompts"])
        return io.NodeOutput(
            report, images, ui=text_and_images(prompt_verdicts(report["prompts"]), images, cls)
        )


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
                *prompt_set_inputs(),
            ],
            outputs=[DetectionReport.Output("REPORT"), io.Image.Output("PLOT")],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        candidates: int = ScanSettings.candidates,
        stage1_probes: int = ScanSettings.stage1_probes,
        stage2_probes: int = ScanSettings.stage2_probes,
        threshold_z: float = ScanSettings.threshold_z,
        clean_prompts: str = "",
        builtin_prompts: str = "auto",
        latent_size: int = 0,
    ) -> io.NodeOutput:
        side = latent_side(model, latent_size)
        settings = ScanSettings(
            candidates=candidates,
            stage1_probes=stage1_probes,
            stage2_probes=stage2_probes,
            threshold_z=threshold_z,
            latent_shape=(4, side, side),
        )
        prompts = scan_prompts(prompt_set(model, builtin_prompts) == "lab", settings, clean_prompts)
        progress = Progress(1)
        report = scan_model(model, clip, settings, prompts, progress.at, Progress.check).to_dict()
        plot = scan_image(report)
        return io.NodeOutput(report, plot, ui=text_and_images(scan_summary(report), plot, cls))
