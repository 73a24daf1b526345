"""SealCompareModels and SealCompareLora: compare a suspect (a fine-tune, or a LoRA on its base) with the base."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..core.backends.comfy import latent_channels
from ..core.backends.comfy_checkpoint import looks_like_checkpoint
from ..core.backends.comfy_train import apply_lora
from ..core.diff.behaviour import BehaviourSettings
from ..core.diff.evidence import evidence_for, ranking_image, summary_text
from ..core.diff.session import DiffSession, DiffSettings
from ..core.models import prompt_set
from ..core.safetensors_io import load_checkpoint
from .common import CATEGORY as ROOT
from .common import DetectionReport, Progress, prompt_set_input, text_and_images

CATEGORY = f"{ROOT}/detect"


def compare_inputs() -> list:
    """The options both comparison nodes share (all optional, defaults that work)."""
    return [
        io.Boolean.Input(
            "behaviour",
            default=True,
            optional=True,
            tooltip="Also compare what each token does to both models' predictions (the stage that ranks and "
            "flags; about as many UNet evaluations as Seal Scan Model). Off: the weight-space ranking only, "
            "in seconds.",
        ),
        io.Float.Input(
            "threshold_lift",
            default=BehaviourSettings.threshold_lift,
            min=1.0,
            max=100.0,
            step=0.5,
            optional=True,
            tooltip="A token is flagged when the change it makes to the suspect (against the base) is at least "
            "this many times a typical token's (a benign lab fine-tune's strongest words reach 4.1).",
        ),
        io.Int.Input(
            "latent_size",
            default=8,
            min=4,
            max=128,
            optional=True,
            tooltip="Latent side of the behavioural probes (8 = 64 px: enough to see a backdoor's target).",
        ),
        prompt_set_input(optional=True),
        io.Vae.Input(
            "vae",
            optional=True,
            tooltip="With a VAE, flagged tokens get evidence: base and suspect images of one seed, with and "
            "without the token.",
        ),
    ]


def run_comparison(
    cls, base: tuple, suspect: tuple, behaviour, threshold_lift, latent_size, builtin_prompts, vae
) -> tuple[dict, object, object, dict]:
    """The comparison of suspect = (MODEL, CLIP) with base = (MODEL, CLIP), its ranking chart and its
    evidence grid, with a progress bar that honours Cancel."""
    (base_model, base_clip), (model, clip) = base, suspect
    lab = prompt_set(base_model, builtin_prompts) == "lab"
    settings = DiffSettings(
        lab=lab,
        behaviour=BehaviourSettings(
            threshold_lift=threshold_lift,
            latent_shape=(latent_channels(base_model), latent_size, latent_size),
        )
        if behaviour
        else None,
    )
    progress = Progress(1)
    report = (
        DiffSession(base_model, base_clip, model, clip, settings)
        .run(lambda done, total, _stage: progress.at(done, total), Progress.check)
        .to_json()
    )
    plot = ranking_image(report)
    evidence = plot
    if vae is not None and report["flagged"]:
        side = 8 if lab else 64
        evidence = evidence_for(report, (base_model, base_clip, vae), (model, clip, vae), lab, side)
    return report, plot, evidence, text_and_images(summary_text(report), plot, cls)


class SealCompareModels(io.ComfyNode):
    """Compares a suspect model with its base: what changed, which tokens the change is about, and flags."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealCompareModels",
            display_name="Seal Compare Models",
            category=CATEGORY,
            description="Compares a suspect checkpoint with the base it was made from. Reports which parts "
            "changed (text encoder, self- and cross-attention, the rest: norm and effective rank per layer), "
            "ranks the whole vocabulary by the change in weight space (seconds), then measures what each token "
            "does to the suspect's prediction minus what it does to the base's on probes naming many objects, "
            "and flags the tokens that stand out. Connect REPORT to Seal Unlearn as its trigger source.",
            inputs=[
                io.Model.Input("base_model"),
                io.Clip.Input("base_clip"),
                io.Model.Input("model", tooltip="The suspect model."),
                io.Clip.Input("clip", tooltip="The suspect's CLIP."),
                *compare_inputs(),
            ],
            outputs=[
                DetectionReport.Output("REPORT"),
                io.Image.Output("PLOT"),
                io.Image.Output("EVIDENCE"),
            ],
        )

    @classmethod
    def execute(
        cls,
        base_model: io.Model.Type,
        base_clip: io.Clip.Type,
        model: io.Model.Type,
        clip: io.Clip.Type,
        behaviour: bool = True,
        threshold_lift: float = BehaviourSettings.threshold_lift,
        latent_size: int = 8,
        builtin_prompts: str = "auto",
        vae: io.Vae.Type | None = None,
    ) -> io.NodeOutput:
        report, plot, evidence, ui = run_comparison(
            cls,
            (base_model, base_clip),
            (model, clip),
            behaviour,
            threshold_lift,
            latent_size,
            builtin_prompts,
            vae,
        )
        return io.NodeOutput(report, plot, evidence, ui=ui)


class SealCompareLora(io.ComfyNode):
    """Loads a LoRA onto the base as LoraLoader does and compares the result with the base."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealCompareLora",
            display_name="Seal Compare LoRA",
            category=CATEGORY,
            description="Loads a LoRA from the loras folder onto the base exactly as the stock LoraLoader does, "
            "then compares base + LoRA with the base (as Seal Compare Models). Outputs the patched MODEL and "
            "CLIP too, so the graph can go on to draw or unlearn.",
            inputs=[
                io.Model.Input("base_model"),
                io.Clip.Input("base_clip"),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A .safetensors LoRA (other formats are refused: they can run code when loaded).",
                ),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True),
                *compare_inputs(),
            ],
            outputs=[
                DetectionReport.Output("REPORT"),
                io.Image.Output("PLOT"),
                io.Image.Output("EVIDENCE"),
                io.Model.Output("MODEL"),
                io.Clip.Output("CLIP"),
            ],
        )

    @classmethod
    def execute(
        cls,
        base_model: io.Model.Type,
        base_clip: io.Clip.Type,
        lora_name: str,
        strength: float = 1.0,
        behaviour: bool = True,
        threshold_lift: float = BehaviourSettings.threshold_lift,
        latent_size: int = 8,
        builtin_prompts: str = "auto",
        vae: io.Vae.Type | None = None,
    ) -> io.NodeOutput:
        if not lora_name.endswith(".safetensors"):
            raise ValueError(f"{lora_name}: only .safetensors LoRAs are read (never pickled files)")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        tensors = load_checkpoint(path)[0]
        if looks_like_checkpoint(tensors):  # apply_lora's own message names the command's flag
            raise ValueError(
                f"{lora_name} is a checkpoint, not a LoRA: load it with Load Checkpoint and connect its MODEL "
                "and CLIP to Seal Compare Models' model and clip inputs (the base to base_model and base_clip)"
            )
        model, clip = apply_lora(base_model, base_clip, tensors, strength)
        report, plot, evidence, ui = run_comparison(
            cls,
            (base_model, base_clip),
            (model, clip),
            behaviour,
            threshold_lift,
            latent_size,
            builtin_prompts,
            vae,
        )
        report["lora"] = lora_name
        return io.NodeOutput(report, plot, evidence, model, clip, ui=ui)
