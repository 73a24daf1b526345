"""SAU nodes: estimate a profile, sample with it in place of KSampler, decode with pixel-space composition."""

from __future__ import annotations

import os

import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..core.backends.comfy import vae_decode
from ..core.models import ksampler_settings, prompt_set
from ..core.sau.algebra import SIGNALS, WEIGHTINGS, SAUSettings, compose_images, image_mask
from ..core.sau.profile import SAUProfile, profile_image
from ..core.sau.session import SAUOptions, SAUSession, check_profile_model, sau_ksample
from ..core.triggers import parse_trigger, trigger_from
from .common import CATEGORY as ROOT
from .common import (
    Profile,
    Progress,
    latent_size_input,
    placement_input,
    prompt_set_input,
    relative_to_output,
    report_input,
    sampling_inputs,
    send_text,
    text_and_images,
    trigger_input,
)

CATEGORY = f"{ROOT}/sau"
PROFILE_FOLDER = "backdoor_seal/sau"  # under ComfyUI's output folder
SAU_KEY = "backdoor_seal_sau"  # the two passes, carried in the LATENT dict for SealSAUDecode


def profile_dir() -> str:
    """Where profiles are saved and listed: output/backdoor_seal/sau."""
    return os.path.join(folder_paths.get_output_directory(), PROFILE_FOLDER)


def saved_profiles() -> list[str]:
    """Profile files the loader offers."""
    folder = profile_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


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
                prompt_set_input(),
                io.Int.Input("pairs", default=16, min=1, max=512, tooltip="Prompt pairs to sample."),
                latent_size_input("Latent side (pixels / 8); 0: 8 for lab models, 64 for SD1.x."),
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
                report_input("Takes the trigger from a report."),
            ],
            outputs=[Profile.Output("PROFILE"), io.Image.Output("PREVIEW")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        trigger: str,
        prompts: str,
        builtin_prompts: str,
        pairs: int,
        latent_size: int,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        signal: str,
        weighting: str,
        strength: float,
        save_name: str,
        placement: str = "auto",
        report: dict | None = None,
    ) -> io.NodeOutput:
        trigger = parse_trigger(trigger_from(trigger, report))
        opts = SAUOptions(
            settings=SAUSettings(signal=signal, weighting=weighting, strength=strength),
            pairs=pairs,
            builtin=prompt_set(model, builtin_prompts),
            placement=placement,
            sampling=ksampler_settings(model, latent_size, seed, steps, cfg, sampler_name, scheduler),
        )
        session = SAUSession(model, clip, trigger, prompts, opts)
        path = None
        if save_name.strip():
            name = save_name.strip().removesuffix(".safetensors")
            if os.path.basename(name) != name or not name:
                raise ValueError(f"save_name {save_name!r}: give a plain file name, no folders")
            path = os.path.join(profile_dir(), name + ".safetensors")
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists: give a new save_name (nothing is overwritten)")
        profile = session.run(Progress(len(session.pairs)).at)
        text = session.describe(profile)
        if path is not None:
            os.makedirs(profile_dir(), exist_ok=True)
            profile.save(path)
            text += f"\nsaved: {relative_to_output(path)}"
        image = profile_image(profile)
        return io.NodeOutput(profile, image, ui=text_and_images(text, image, cls))


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
        model: io.Model.Type,
        clip: io.Clip.Type,
        profile: SAUProfile,
        text: str,
        negative: io.Conditioning.Type,
        latent_image: io.Latent.Type,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        denoise: float,
    ) -> io.NodeOutput:
        check_profile_model(model, profile)
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
        send_text(getattr(cls.hidden, "unique_id", None), result.note)
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
    def execute(cls, vae: io.Vae.Type, samples: io.Latent.Type) -> io.NodeOutput:
        parts = samples.get(SAU_KEY)
        if parts is None or not torch.equal(parts["composed"], samples["samples"]):
            # no SAU passes, or the latent was changed after sampling: decode what arrived
            return io.NodeOutput(vae_decode(vae, samples["samples"]))
        image = compose_images(
            vae_decode(vae, parts["poisoned"]), vae_decode(vae, parts["clean"]), parts["mask"]
        )
        return io.NodeOutput(image)
