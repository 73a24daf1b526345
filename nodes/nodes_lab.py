"""SealLabCheckpointLoader: load a lab model (MODEL, CLIP, VAE) by name."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

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
        model, clip, vae, _ = load_lab_checkpoint(path)
        return io.NodeOutput(model, clip, vae)
