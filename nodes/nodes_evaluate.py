"""SealEvaluate: attack success before and after removal, clean fidelity, and the figures, in one node."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.backends.comfy import clip_vision_embedder
from ..core.evaluate.figures import report_image
from ..core.evaluate.metrics import LAB_DETECTORS, make_judge
from ..core.evaluate.session import EvaluationOptions, EvaluationSession
from ..core.images import image_to_uint8
from ..core.models import ksampler_settings, prompt_set
from ..core.sau.profile import SAUProfile
from ..core.triggers import parse_trigger, trigger_from
from .common import CATEGORY as ROOT
from .common import (
    REPORT_UI_KEY,
    Evaluation,
    Profile,
    Progress,
    latent_size_input,
    placement_input,
    prompt_set_input,
    renamed_inputs,
    report_input,
    sampling_inputs,
    trigger_input,
)

CATEGORY = f"{ROOT}/evaluate"
# inputs renamed since workflows were shared: old name -> new name
RENAMED = {"cleaned_model": "unlearned_model", "cleaned_clip": "unlearned_clip"}


class SealEvaluate(io.ComfyNode):
    """Original against unlearned (or SAU): attack success on triggered prompts, fidelity on clean ones, same seeds."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealEvaluate",
            display_name="Seal Evaluate",
            category=CATEGORY,
            description="Samples clean prompts and their triggered twins with the original and the unlearned "
            "model (or with SAU, when a profile is connected) from the same seeds. Attack success is judged "
            "against a target IMAGE of the backdoor's payload, or by a lab detector; clean fidelity is SSIM "
            "and PSNR of unlearned against original images; CLIP image similarity is added when a CLIP vision "
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
                    tooltip="Clean test prompts, one per line (keep them apart from the unlearning prompts), "
                    "put before the built-in held-out set; the trigger is inserted into each.",
                ),
                prompt_set_input(),
                io.Int.Input(
                    "count", default=16, min=1, max=1024, tooltip="How many prompt pairs to sample."
                ),
                io.Combo.Input(
                    "lab_detector",
                    options=["none", *LAB_DETECTORS],
                    default="none",
                    tooltip="For lab models: the attack's exact detector judges (unused when a target is connected).",
                ),
                latent_size_input("0: 8 for lab models, 64 for SD1.x."),
                *sampling_inputs(),
                io.Model.Input("unlearned_model", optional=True, tooltip="The model after unlearning."),
                io.Clip.Input(
                    "unlearned_clip",
                    optional=True,
                    tooltip="The text encoder after unlearning (default: clip).",
                ),
                Profile.Input(
                    "sau_profile", optional=True, tooltip="Evaluates SAU sampling on the original."
                ),
                io.Image.Input("target", optional=True, tooltip="What the backdoor draws (its payload)."),
                io.ClipVision.Input("clip_vision", optional=True),
                report_input("Takes the trigger from a report."),
                placement_input(optional=True),
            ],
            outputs=[Evaluation.Output("REPORT"), io.Image.Output("FIGURE")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        original_model: io.Model.Type,
        clip: io.Clip.Type,
        vae: io.Vae.Type,
        trigger: str,
        prompts: str,
        builtin_prompts: str,
        count: int,
        lab_detector: str,
        latent_size: int,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        unlearned_model: io.Model.Type | None = None,
        unlearned_clip: io.Clip.Type | None = None,
        sau_profile: SAUProfile | None = None,
        target: io.Image.Type | None = None,
        clip_vision: io.ClipVision.Type | None = None,
        report: dict | None = None,
        placement: str = "auto",
        **old_names,
    ) -> io.NodeOutput:
        old = renamed_inputs("Seal Evaluate", old_names, RENAMED)
        unlearned_model = unlearned_model if unlearned_model is not None else old.get("unlearned_model")
        unlearned_clip = unlearned_clip if unlearned_clip is not None else old.get("unlearned_clip")
        trigger = parse_trigger(trigger_from(trigger, report))
        embed = clip_vision_embedder(clip_vision) if clip_vision is not None else None
        judge = make_judge(lab_detector, None if target is None else image_to_uint8(target), embed)
        opts = EvaluationOptions(
            count=count,
            lab=prompt_set(original_model, builtin_prompts) == "lab",
            placement=placement,
            sampling=ksampler_settings(
                original_model, latent_size, seed, steps, cfg, sampler_name, scheduler
            ),
        )
        session = EvaluationSession(
            original_model,
            clip,
            vae,
            trigger,
            judge,
            prompts,
            opts,
            unlearned_model,
            unlearned_clip,
            sau_profile,
            embed,
        )
        result = session.run(Progress(4).at)
        data = session.report_json(result)
        figure = report_image(result)
        shown = {
            **ui.PreviewImage(figure, cls=cls).as_dict(),
            **ui.PreviewText(result.summary()).as_dict(),
            REPORT_UI_KEY: [data],
        }
        return io.NodeOutput(data, figure, ui=shown)
