"""SealLabCheckpointLoader: load a lab model (MODEL, CLIP, VAE) by name; SealLabFamilyModel: a tiny random-weight
SD1.5 / SD2.x / SDXL built with ComfyUI's own classes, for testing plumbing."""

from __future__ import annotations

from functools import lru_cache

import folder_paths
from comfy_api.latest import io

from ..core.backends.comfy_families import FAMILIES, PREDICTIONS, build_family
from ..core.backends.comfy_lab import load_lab_checkpoint
from ..core.lab.zoo import LAB_MODELS
from .common import CATEGORY

LAB_FOLDER = "backdoor_seal_lab"


def register_lab_folder() -> None:
    """Add the shipped lab models to ComfyUI's model folders (extra_model_paths may add more)."""
    folder_paths.add_model_folder_path(LAB_FOLDER, str(LAB_MODELS))
    folder_paths.folder_names_and_paths[LAB_FOLDER][1].add(".safetensors")


register_lab_folder()


class SealLabCheckpointLoader(io.ComfyNode):
    """Load one of the lab's tiny SD-shaped models: clean or carrying a real, trained backdoor."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealLabCheckpointLoader",
            display_name="Seal Lab Checkpoint Loader",
            category=f"{CATEGORY}/lab",
            description="Loads a backdoor-seal lab model (64x64 toy world) as ordinary MODEL, CLIP and VAE.",
            inputs=[io.Combo.Input("lab_model", options=folder_paths.get_filename_list(LAB_FOLDER))],
            outputs=[io.Model.Output("MODEL"), io.Clip.Output("CLIP"), io.Vae.Output("VAE")],
        )

    @classmethod
    def execute(cls, lab_model: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(LAB_FOLDER, lab_model)
        # prompts' embedding:name resolve where the stock Load Checkpoint's do
        model, clip, vae, _ = load_lab_checkpoint(path, folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


@lru_cache(maxsize=6)
def _family_model(family: str, prediction: str, seed: int):
    # Nodes never edit a MODEL's weights in place, so one build serves every run with the same key.
    return build_family(family, "tiny", prediction=prediction, seed=seed)


class SealLabFamilyModel(io.ComfyNode):
    """A tiny random-weight instance of ComfyUI's real SD15 / SD20 / SDXL classes (same code paths, small channels)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealLabFamilyModel",
            display_name="Seal Lab Family Model",
            category=f"{CATEGORY}/lab",
            description="Builds a tiny SD1.5, SD2.x or SDXL model with ComfyUI's own model, text-encoder and VAE "
            "classes and RANDOM weights, for testing a workflow's plumbing in seconds: every node runs the code "
            "paths of that family, but the images are noise and no result says anything about a real model.",
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd15"),
                io.Combo.Input(
                    "prediction",
                    options=list(PREDICTIONS),
                    default="eps",
                    tooltip="eps, or v (v-prediction, as the SD2.x 768 models).",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output("MODEL"), io.Clip.Output("CLIP"), io.Vae.Output("VAE")],
        )

    @classmethod
    def execute(cls, family: str, prediction: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(*_family_model(family, prediction, seed))
