"""SAU nodes: estimate a profile, sample with it in place of KSampler, decode with pixel-space composition."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..core.plots import figure_to_image, new_figure
from ..core.tokens import readable
from ..core.unlearn.sau import (
    SIGNALS,
    WEIGHTINGS,
    SAUProfile,
    SAUSettings,
    compose_images,
    estimate_profile,
    image_mask,
    model_fingerprint,
    sau_ksample,
)
from ..core.unlearn.session import training_pairs, trigger_from
from .nodes_detect import PROMPT_SETS, calibration_prompts, latent_shape
from .nodes_unlearn import DetectionReport, _send_text, placement_input, trigger_input

CATEGORY = "backdoor-seal/sau"
Profile = io.Custom("SEAL_SAU_PROFILE")
PROFILE_FOLDER = "backdoor_seal/sau"  # under ComfyUI's output folder
SAU_KEY = "backdoor_seal_sau"  # the two passes, carried in the LATENT dict for SealSAUDecode


def sampling_inputs(control_after_generate: bool = False) -> list:
    """KSampler's seed, steps, cfg, sampler and scheduler widgets, with its defaults (profile and sampler match)."""
    return [
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=0xFFFFFFFFFFFFFFFF,
            control_after_generate=control_after_generate or None,
        ),
        io.Int.Input("steps", default=20, min=1, max=10000),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
    ]


def profile_dir() -> str:
    """Where profiles are saved and listed: output/backdoor_seal/sau."""
    return os.path.join(folder_paths.get_output_directory(), PROFILE_FOLDER)


def saved_profiles() -> list[str]:
    """Profile files the loader offers."""
    folder = profile_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def profile_image(profile: SAUProfile) -> torch.Tensor:
    """Where the backdoor writes (|tau| per latent pixel) and where it acts (the mean activation map), as an IMAGE."""
    panels = [("|tau|", profile.tau.float().norm(dim=0))]
    if profile.activation is not None:
        panels.append((f"{profile.settings.signal} map", profile.activation.float()))
    fig = new_figure(3.4 * len(panels), 3.4)
    for i, (title, values) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        shown = ax.imshow(values.numpy(), cmap="magma")
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"SAU profile for {readable(profile.trigger)} ({profile.pairs} pairs)", fontsize=10)
    fig.tight_layout()
    return figure_to_image(fig)


def _check_model(model, profile: SAUProfile) -> None:
    found = model_fingerprint(model.model.diffusion_model.state_dict())
    if found != profile.model_hash:
        raise ValueError(
            f"this SAU profile was estimated on another model (fingerprint {profile.model_hash}, this one "
            f"{found}); estimate a profile on this model with Seal SAU Profile"
        )


class SealSAUProfile(io.ComfyNode):
    """Estimate SAU's trigger latent from clean/triggered prompt pairs sampled from the same seeds."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealSAUProfile",
            display_name="Seal SAU Profile",
            category=CATEGORY,
            description="Samples each prompt with and without the trigger from one seed; the mean difference "
            "(the trigger latent) and the mask settings make a small profile for Seal SAU Sampler. Nothing "
            "is trained and the MODEL is untouched. Sample at the size you will use.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                trigger_input(),
                io.String.Input(
                    "prompts",
                    multiline=True,
                    default="",
                    tooltip="Clean prompts, one per line, put before the built-in set; the trigger is "
                    "inserted into each.",
                ),
                io.Combo.Input(
                    "builtin_prompts",
                    options=list(PROMPT_SETS),
                    default="auto",
                    tooltip="auto: the lab grammar for lab models, everyday captions otherwise.",
                ),
                io.Int.Input("pairs", default=16, min=1, max=512, tooltip="Prompt pairs to sample."),
                io.Int.Input(
                    "latent_size",
                    default=0,
                    min=0,
                    max=256,
                    tooltip="Latent side (pixels / 8); 0: 8 for lab models, 64 for SD1.x.",
                ),
                *sampling_inputs(),
                io.Combo.Input(
                    "signal",
                    options=list(SIGNALS),
                    default=SAUSettings.signal,
                    tooltip="What the secondary mask is made from: the trigger tokens' cross-attention "
                    "maps, or where the two passes' latents differ.",
                ),
                io.Combo.Input(
                    "weighting",
                    options=list(WEIGHTINGS),
                    default=SAUSettings.weighting,
                    tooltip="union: a convex blend with the masks' union; reference: the reference code's "
                    "1.5x where both masks fire.",
                ),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05),
                io.String.Input(
                    "save_name",
                    default="",
                    tooltip="Saves the profile as output/backdoor_seal/sau/NAME.safetensors (never over a file).",
                ),
                placement_input(optional=True),
                DetectionReport.Input("report", optional=True, tooltip="Takes the trigger from a report."),
            ],
            outputs=[Profile.Output("PROFILE"), io.Image.Output("PREVIEW")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        trigger,
        prompts,
        builtin_prompts,
        pairs,
        latent_size,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        signal,
        weighting,
        strength,
        save_name,
        placement="auto",
        report=None,
    ) -> io.NodeOutput:
        from ..core.lab.zoo import parse_trigger

        trigger = parse_trigger(trigger_from(trigger, report))
        clean = calibration_prompts(model, prompts, builtin_prompts, pairs, seed)
        pair_list = [(p.clean, p.triggered) for p in training_pairs(trigger, clean, placement, seed)][:pairs]
        path = None
        if save_name.strip():
            name = save_name.strip().removesuffix(".safetensors")
            if os.path.basename(name) != name or not name:
                raise ValueError(f"save_name {save_name!r}: give a plain file name, no folders")
            path = os.path.join(profile_dir(), name + ".safetensors")
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists: give a new save_name (nothing is overwritten)")
        bar = comfy.utils.ProgressBar(len(pair_list))

        def on_pair(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        _, h, w = latent_shape(model, latent_size)
        settings = SAUSettings(signal=signal, weighting=weighting, strength=strength)
        profile = estimate_profile(
            model,
            clip,
            trigger,
            pair_list,
            seed,
            settings,
            steps,
            cfg,
            sampler_name,
            scheduler,
            (h, w),
            on_pair,
        )
        text = (
            f"SAU profile for {readable(trigger)}: {profile.pairs} pairs at {h}x{w} latents, signal {signal}"
        )
        if path is not None:
            os.makedirs(profile_dir(), exist_ok=True)
            profile.save(path)
            text += f"\nsaved: {os.path.relpath(path, folder_paths.get_output_directory())}"
        image = profile_image(profile)
        return io.NodeOutput(
            profile,
            image,
            ui={**ui.PreviewImage(image, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()},
        )


class SealLoadSAUProfile(io.ComfyNode):
    """Load a profile saved by Seal SAU Profile (safetensors only)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealLoadSAUProfile",
            display_name="Seal Load SAU Profile",
            category=CATEGORY,
            description="Loads an SAU profile from output/backdoor_seal/sau.",
            inputs=[io.Combo.Input("profile", options=saved_profiles())],
            outputs=[Profile.Output("PROFILE")],
        )

    @classmethod
    def execute(cls, profile: str) -> io.NodeOutput:
        path = os.path.join(profile_dir(), profile)
        if os.path.basename(profile) != profile or not os.path.isfile(path):
            raise FileNotFoundError(f"no SAU profile {profile!r} in {profile_dir()}")
        return io.NodeOutput(SAUProfile.load(path))


class SealSAUSampler(io.ComfyNode):
    """KSampler with SAU: a triggered prompt is sampled again without the trigger and the two composed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealSAUSampler",
            display_name="Seal SAU Sampler",
            category=CATEGORY,
            description="Use in place of KSampler. The positive prompt is typed here (SAU must remove the "
            "trigger from it). A prompt without the trigger is one plain pass, identical to KSampler's; a "
            "triggered one is also sampled without the trigger from the same noise, and the clean latent "
            "replaces the poisoned one where the trigger acts. Decode with VAEDecode, or with Seal SAU "
            "Decode to keep every pixel outside the mask as drawn.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                Profile.Input("profile"),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The positive prompt."),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                *sampling_inputs(control_after_generate=True),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Latent.Output("LATENT"), io.Mask.Output("MASK")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        profile,
        text,
        negative,
        latent_image,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
    ) -> io.NodeOutput:
        _check_model(model, profile)
        callback = latent_preview.prepare_callback(model, steps)  # each update passes its own total
        result = sau_ksample(
            model,
            clip,
            text,
            negative,
            latent_image,
            profile,
            seed,
            steps,
            cfg,
            sampler_name,
            scheduler,
            denoise,
            callback,
        )
        out = {k: v for k, v in latent_image.items() if k != SAU_KEY}
        out["samples"] = result.samples
        if result.triggered:
            out[SAU_KEY] = {
                "poisoned": result.poisoned,
                "clean": result.clean,
                "mask": result.mask,
                "composed": result.samples,
            }
        _send_text(getattr(cls.hidden, "unique_id", None), result.note)
        h, w = result.samples.shape[-2:]
        mask = image_mask(result.mask, (8 * h, 8 * w))  # the region Seal SAU Decode blends
        return io.NodeOutput(out, mask, ui=ui.PreviewText(result.note))


class SealSAUDecode(io.ComfyNode):
    """VAEDecode for SAU latents: the two passes decoded and blended in pixel space."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealSAUDecode",
            display_name="Seal SAU Decode",
            category=CATEGORY,
            description="Decodes both of Seal SAU Sampler's passes and blends the images with its mask, so "
            "pixels outside the mask are exactly the plain sampling's (a latent blend changes them a little: "
            "the VAE decoder mixes the whole latent). Any other LATENT is decoded as VAEDecode does.",
            inputs=[io.Vae.Input("vae"), io.Latent.Input("samples")],
            outputs=[io.Image.Output("IMAGE")],
        )

    @classmethod
    def execute(cls, vae, samples) -> io.NodeOutput:
        parts = samples.get(SAU_KEY)
        if parts is None or not torch.equal(parts["composed"], samples["samples"]):
            # no SAU passes, or the latent was changed after sampling: decode what arrived
            return io.NodeOutput(vae.decode(samples["samples"]))
        image = compose_images(vae.decode(parts["poisoned"]), vae.decode(parts["clean"]), parts["mask"])
        return io.NodeOutput(image)
