"""SealEvaluate: attack success before and after cleaning, clean fidelity, and the figures, in one node."""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import numpy as np
from comfy_api.latest import io, ui

from ..core.evaluate.figures import report_image
from ..core.evaluate.metrics import LabJudge, TargetJudge, clip_vision_embedder
from ..core.evaluate.report import evaluate, model_drawer
from ..core.lab.attacks import KINDS
from ..core.unlearn.prompts import evaluation_prompts
from ..core.unlearn.session import training_pairs, trigger_from
from .nodes_detect import PROMPT_SETS, is_lab_model, latent_shape
from .nodes_sau import Profile, sampling_inputs
from .nodes_unlearn import DetectionReport, placement_input, trigger_input

CATEGORY = "backdoor-seal/evaluate"
Evaluation = io.Custom("SEAL_EVALUATION")
REPORT_UI_KEY = "seal_report"  # the web extension renders this UI output as a table


def judge_for(lab_detector: str, target, clip_vision):
    """The target-image judge when a target is connected, else the chosen lab detector."""
    embed = clip_vision_embedder(clip_vision) if clip_vision is not None else None
    if target is not None:
        image = (target[0].detach().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        return TargetJudge(image, embed=embed), embed
    if lab_detector != "none":
        return LabJudge(lab_detector), embed
    raise ValueError(
        "no way to tell whether the backdoor fired: connect a target IMAGE (what the backdoor draws) or "
        "choose the lab detector of a lab model"
    )


class SealEvaluate(io.ComfyNode):
    """Original against cleaned: attack success on triggered prompts, fidelity on clean ones, same seeds."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealEvaluate",
            display_name="Seal Evaluate",
            category=CATEGORY,
            description="Samples clean prompts and their triggered twins with the original and the cleaned "
            "model (or with SAU, when a profile is connected) from the same seeds. Attack success is judged "
            "against a target IMAGE of the backdoor's payload, or by a lab detector; clean fidelity is SSIM "
            "and PSNR of cleaned against original images; CLIP image similarity is added when a CLIP vision "
            "model is connected.",
            inputs=[
                io.Model.Input("original_model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                trigger_input(),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="",
                    tooltip="Clean test prompts, one per line (keep them apart from the cleaning prompts), "
                    "put before the built-in held-out set; the trigger is inserted into each.",
                ),
                io.Combo.Input("builtin_prompts", options=list(PROMPT_SETS), default="auto"),
                io.Int.Input(
                    "count", default=16, min=1, max=1024, tooltip="How many prompt pairs to sample."
                ),
                io.Combo.Input(
                    "lab_detector",
                    options=["none", *KINDS],
                    default="none",
                    tooltip="For lab models: the attack's exact detector judges (unused when a target is connected).",
                ),
                io.Int.Input(
                    "latent_size", default=0, min=0, max=256, tooltip="0: 8 for lab models, 64 for SD1.x."
                ),
                *sampling_inputs(),
                io.Model.Input("cleaned_model", optional=True, tooltip="The model after unlearning."),
                io.Clip.Input(
                    "cleaned_clip",
                    optional=True,
                    tooltip="The text encoder after unlearning (default: clip).",
                ),
                Profile.Input(
                    "sau_profile", optional=True, tooltip="Evaluates SAU sampling on the original."
                ),
                io.Image.Input("target", optional=True, tooltip="What the backdoor draws (its payload)."),
                io.ClipVision.Input("clip_vision", optional=True),
                DetectionReport.Input("report", optional=True, tooltip="Takes the trigger from a report."),
                placement_input(optional=True),
            ],
            outputs=[Evaluation.Output("REPORT"), io.Image.Output("FIGURE")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        original_model,
        clip,
        vae,
        trigger,
        prompts,
        builtin_prompts,
        count,
        lab_detector,
        latent_size,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        cleaned_model=None,
        cleaned_clip=None,
        sau_profile=None,
        target=None,
        clip_vision=None,
        report=None,
        placement="auto",
    ) -> io.NodeOutput:
        from ..core.lab.zoo import parse_trigger

        if cleaned_model is None and sau_profile is None:
            raise ValueError("nothing to compare: connect the cleaned MODEL, or an SAU profile")
        trigger = parse_trigger(trigger_from(trigger, report))
        judge, embed = judge_for(lab_detector, target, clip_vision)
        lab = is_lab_model(original_model) if builtin_prompts == "auto" else builtin_prompts == "lab"
        clean = [p.strip() for p in prompts.splitlines() if p.strip()] + evaluation_prompts(lab, count, seed)
        pairs = [(p.clean, p.triggered) for p in training_pairs(trigger, clean, placement, seed)][:count]
        _, h, w = latent_shape(original_model, latent_size)
        sampling = ((h, w), steps, cfg, sampler_name, scheduler)
        before = model_drawer(original_model, clip, vae, *sampling)
        if sau_profile is not None:
            from ..core.unlearn.sau import sau_drawer

            after = sau_drawer(original_model, clip, vae, sau_profile, *sampling)
        else:
            after = model_drawer(cleaned_model, cleaned_clip or clip, vae, *sampling)
        bar = comfy.utils.ProgressBar(4)

        def progress(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        seeds = [(seed + i) % 2**64 for i in range(len(pairs))]
        result = evaluate(trigger, pairs, seeds, before, after, judge, embed, progress)
        data = result.to_json()
        data["method"] = "sau" if sau_profile is not None else "model"
        figure = report_image(result)
        shown = {
            **ui.PreviewImage(figure, cls=cls).as_dict(),
            **ui.PreviewText(result.summary()).as_dict(),
            REPORT_UI_KEY: [data],
        }
        return io.NodeOutput(data, figure, ui=shown)
