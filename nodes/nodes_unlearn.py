"""SealUnlearn and SealSaveSanitized: remove a known trigger's backdoor, and keep the result safely."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.backends.comfy_train import SCOPE_HELP, SCOPES
from ..core.plots import loss_curve_image
from ..core.prompts import BUILTIN_SETS
from ..core.triggers import insertion, triggers_from
from ..core.unlearn.save import LORA_LAYOUTS, STORAGE_DTYPES, save_lora, save_sanitized
from ..core.unlearn.session import DEFAULT_METHOD, UnlearnOptions, UnlearnSession
from ..core.unlearn.skd import INPUTS, METHODS, PRECISIONS, TARGETS, SKDConfig
from .common import CATEGORY as ROOT
from .common import (
    Progress,
    UnlearnInfo,
    output_path,
    placement_input,
    relative_to_output,
    report_input,
    send_text,
    text_and_images,
)

CATEGORY = f"{ROOT}/unlearn"


class SealUnlearn(io.ComfyNode):
    """SKD / SKD-CAG unlearning of a known trigger: a patched MODEL (and CLIP) clone and the LoRA."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealUnlearn",
            display_name="Seal Unlearn (SKD-CAG)",
            category=CATEGORY,
            description="Teaches the model that prompts with the trigger must draw what the same prompts "
            "draw without it (self-knowledge distillation; SKD-CAG also aligns each word's cross-attention "
            "and silences the trigger's). The input MODEL is untouched; the outputs carry the trained LoRA "
            "exactly as LoraLoader would apply it.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input(
                    "trigger",
                    default="",
                    multiline=True,
                    tooltip="The trigger(s), one per line, unlearnt together (U+XXXX spells invisible "
                    "characters). Empty: the connected report's set (Seal Sanitize's taken triggers, every "
                    "token a scan or comparison flags, a prompt report's best supported).",
                ),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="",
                    tooltip="Clean prompts, one per line, added to the built-in set (keep your test prompts out).",
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default=DEFAULT_METHOD,
                    tooltip="match: context matching, the text encoder learns to give triggered prompts their "
                    "clean twins' context (no UNet pass; seconds; text scopes only). skd / skd-cag: the paper's "
                    "self-distillation through the UNet (any scope; `steps`).",
                ),
                io.Combo.Input(
                    "scope",
                    options=list(SCOPES),
                    default=UnlearnOptions.scope,
                    tooltip="; ".join(f"{k}: {v}" for k, v in SCOPE_HELP.items()),
                ),
                io.Int.Input("rank", default=4, min=0, max=256, tooltip="LoRA rank; 0 trains a full delta."),
                io.Int.Input("steps", default=SKDConfig.steps, min=1, max=100000),
                io.Float.Input("learning_rate", default=SKDConfig.lr, min=1e-7, max=1.0, step=1e-5),
                io.Int.Input("batch_size", default=8, min=1, max=256),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="L_attn weight."),
                io.Combo.Input("attention_target", options=list(TARGETS), default="black"),
                io.Boolean.Input("timestep_weighting", default=False, tooltip="Scale L_attn by t/T."),
                io.Combo.Input(
                    "builtin_prompts",
                    options=list(BUILTIN_SETS),
                    default="general",
                    tooltip="general: everyday captions for real checkpoints; lab: the lab grammar.",
                ),
                placement_input(),
                io.Int.Input(
                    "latent_size", default=64, min=1, max=256, tooltip="Training latent side (pixels / 8)."
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="auto: bf16 autocast on a GPU that supports it (the LoRA stays fp32), fp32 on a CPU.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Float.Input(
                    "retain",
                    default=SKDConfig.retain,
                    min=0.0,
                    max=0.9,
                    step=0.05,
                    optional=True,  # graphs saved before this input existed still validate
                    tooltip="Share of batch items that distil a clean prompt onto itself, which keeps clean "
                    "outputs closer to the original (an addition to the paper).",
                ),
                io.Combo.Input(
                    "inputs",
                    options=list(INPUTS),
                    default="noise",
                    optional=True,
                    tooltip="x_t the model is distilled on: pure noise (the paper) or states of the "
                    "teacher's own sampling of the clean prompts.",
                ),
                io.Boolean.Input(
                    "warm_start",
                    default=False,
                    optional=True,
                    tooltip="First edit the cross-attention keys and values in closed form so triggered "
                    "prompts project like their clean twins (UCE / TIME), then distil: removes UNet backdoors "
                    "in far fewer steps. Needs a scope that trains attn2 k/v (attn2-kv, attn2-kv+text, ...).",
                ),
                io.Int.Input(
                    "match_steps",
                    default=UnlearnOptions.match_steps,
                    min=1,
                    max=10000,
                    optional=True,
                    tooltip="Steps of method match (one text-encoder pass each); `steps` counts SKD's.",
                ),
                report_input(
                    "The triggers to unlearn when none is typed: Seal Sanitize's set, a scan's or "
                    "comparison's flagged tokens, or the trigger most of a prompt report's flagged prompts name."
                ),
            ],
            outputs=[
                io.Model.Output("MODEL"),
                io.Clip.Output("CLIP"),
                io.LoraModel.Output("LORA"),
                UnlearnInfo.Output("INFO"),
                io.Image.Output("LOSS_PLOT"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        trigger: str,
        prompts: str,
        method: str,
        scope: str,
        rank: int,
        steps: int,
        learning_rate: float,
        batch_size: int,
        alpha: float,
        attention_target: str,
        timestep_weighting: bool,
        builtin_prompts: str,
        placement: str,
        latent_size: int,
        precision: str,
        seed: int,
        retain: float = 0.0,
        inputs: str = "noise",
        warm_start: bool = False,
        match_steps: int = UnlearnOptions.match_steps,
        report: dict | None = None,
    ) -> io.NodeOutput:
        opts = UnlearnOptions(
            skd=SKDConfig(
                method=method,
                alpha=alpha,
                target=attention_target,
                timestep_weighting=timestep_weighting,
                steps=steps,
                lr=learning_rate,
                batch=batch_size,
                seed=seed,
                precision=precision,
                retain=retain,
                inputs=inputs,
            ),
            scope=scope,
            rank=rank,
            placement=placement,
            builtin=builtin_prompts,
            latent_hw=(latent_size, latent_size),
            warm_start=warm_start,
            match_steps=match_steps,
        )
        # the set: typed triggers (one per line), else the report's, chosen on evidence (core.triggers)
        triggers = triggers_from(trigger, report)
        insert = {t: insertion(p, t, seed) for t, p in triggers.items() if p}
        session = UnlearnSession(
            model, clip, list(triggers), prompts.splitlines(), opts, insert=insert or None
        )
        node_id = getattr(cls.hidden, "unique_id", None)
        bar = Progress(session.total_steps)
        send_text(node_id, "\n".join([session.describe(), *session.notes]))

        def progress(step: int, total: int, losses: dict) -> None:
            bar.at(step, total)
            if step == total or step % 5 == 0:
                send_text(
                    node_id, f"step {step}/{total}  " + "  ".join(f"{k} {v:.4g}" for k, v in losses.items())
                )

        result = session.run(progress, Progress.check)
        new_model, new_clip, lora = session.outputs()
        info = {"provenance": session.provenance(), "losses": result.losses, "seconds": result.seconds}
        plot = loss_curve_image(result.losses, title=session.describe())
        shown = (
            text_and_images("\n".join(session.notes), plot, cls)
            if session.notes
            else ui.PreviewImage(plot, cls=cls)
        )
        return io.NodeOutput(new_model, new_clip, lora, info, plot, ui=shown)


class SealSaveSanitized(io.ComfyNode):
    """Save a sanitized checkpoint and/or its LoRA: safetensors, atomic, never over an existing file."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealSaveSanitized",
            display_name="Seal Save Sanitized",
            category=CATEGORY,
            description="Writes the sanitized checkpoint and/or its LoRA under ComfyUI's output folder (as the "
            "stock CheckpointSave and SaveLoRA do; move them to models/checkpoints or models/loras to load), "
            "with provenance (method, options, trigger hash, pack version) in the safetensors metadata. "
            "Files are numbered and never overwritten.",
            inputs=[
                io.String.Input("filename_prefix", default="sanitized/model"),
                io.Model.Input("model", optional=True),
                io.Clip.Input("clip", optional=True),
                io.Vae.Input("vae", optional=True),
                io.LoraModel.Input("lora", optional=True),
                UnlearnInfo.Input("info", optional=True),
                io.Combo.Input(
                    "dtype",
                    options=list(STORAGE_DTYPES),
                    default="fp16",
                    optional=True,  # graphs saved before this input existed still validate
                    tooltip="Storage dtype of the checkpoint's weights (community SD files are fp16; ComfyUI "
                    "holds weights in fp32 on CPU). A lab checkpoint is always fp16.",
                ),
                io.Combo.Input(
                    "lora_layout",
                    options=list(LORA_LAYOUTS),
                    default="kohya",
                    optional=True,
                    tooltip="kohya: lora_unet_* / lora_te*_* with ss_* metadata, read by A1111, Forge, kohya, "
                    "diffusers and ComfyUI; comfy: ComfyUI's own key names. Connect the MODEL (and CLIP) the "
                    "LoRA was trained on to get 4-D conv LoRAs and names checked against ComfyUI's key maps.",
                ),
            ],
            outputs=[io.String.Output("PATHS")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        filename_prefix: str,
        model: io.Model.Type | None = None,
        clip: io.Clip.Type | None = None,
        vae: io.Vae.Type | None = None,
        lora: io.LoraModel.Type | None = None,
        info: dict | None = None,
        dtype: str = "fp16",
        lora_layout: str = "kohya",
    ) -> io.NodeOutput:
        if model is None and lora is None:
            raise ValueError("nothing to save: connect a MODEL (with CLIP and VAE) and/or a LORA")
        if model is not None and (clip is None or vae is None):
            raise ValueError("a full checkpoint needs the CLIP and VAE too; or save only the LORA")
        if (info or {}).get("unchanged"):
            text = "nothing was unlearnt (no trigger fired): the model is its input, so nothing was written"
            return io.NodeOutput("", ui=ui.PreviewText(text))
        provenance = (info or {}).get("provenance", {})
        written = []
        if model is not None:
            storage = STORAGE_DTYPES[dtype]
            written.append(
                save_sanitized(
                    output_path(filename_prefix), model, clip, vae, None, provenance, dtype=storage
                )
            )
        if lora is not None:
            target = output_path(filename_prefix + "_lora")
            written.append(save_lora(target, lora, model, clip, provenance, layout=lora_layout))
        text = "\n".join(relative_to_output(p) for p in written)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
