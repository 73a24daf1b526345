"""What the node files share: the pack's custom types, widgets that mean the same everywhere, small helpers.

Node files import this module and the engine, never each other.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..core.prompts import BUILTIN_SETS
from ..core.triggers import PLACEMENTS

CATEGORY = "backdoor-seal"

# Custom types passed between the pack's nodes (plain dicts or engine objects).
DetectionReport = io.Custom("SEAL_DETECTION")  # a prompt or scan report that names a trigger
UnlearnInfo = io.Custom("SEAL_UNLEARN")  # provenance and losses of an unlearning run
Evaluation = io.Custom("SEAL_EVALUATION")  # an evaluation report
Profile = io.Custom("SEAL_SAU_PROFILE")  # an SAU profile (core.sau.profile.SAUProfile)
Attention = io.Custom("SEAL_ATTENTION")  # a cross-attention recorder (core.attention.CrossAttentionRecorder)

REPORT_UI_KEY = "seal_report"  # a report as UI output: the web extension renders it, `make demo` reads it

PROMPT_SETS = ("auto", *(s for s in BUILTIN_SETS if s != "none"))


def renamed_inputs(node: str, given: dict, renames: dict[str, str]) -> dict:
    """Inputs that a workflow saved before a rename still passes under their old names, keyed by the new
    names. ComfyUI (0.3.75 and 0.8.0 alike) hands execute a linked input the schema no longer lists, and
    /prompt cannot refuse it (links are not resolved when it validates), so execute takes them."""
    unknown = [k for k in given if k not in renames]
    if unknown:
        raise ValueError(
            f"{node} has no input {unknown[0]!r} (a workflow saved by another version?); connect that link "
            "to one of the node's inputs instead"
        )
    return {renames[k]: v for k, v in given.items()}


def trigger_input() -> io.String.Input:
    """The trigger text widget shared by every node that acts on a known trigger."""
    return io.String.Input(
        "trigger", default="", tooltip="The trigger text (U+XXXX spells invisible characters)."
    )


def placement_input(optional: bool = False) -> io.Combo.Input:
    """Where a trigger goes in clean prompts."""
    return io.Combo.Input(
        "placement",
        options=["auto", *PLACEMENTS],
        default="auto",
        optional=optional,
        tooltip="Where the trigger goes in the clean prompts; auto: a homoglyph replaces its Latin twin, "
        "anything else goes first.",
    )


def report_input(tooltip: str = "Takes the trigger from a detection report.") -> io.Input:
    """An optional detection report as the trigger source."""
    return DetectionReport.Input("report", optional=True, tooltip=tooltip)


def prompt_set_input(optional: bool = False) -> io.Combo.Input:
    """Which built-in prompt set goes after the user's prompts."""
    return io.Combo.Input(
        "builtin_prompts",
        options=list(PROMPT_SETS),
        default="auto",
        optional=optional,
        tooltip="auto: the lab grammar for lab models, everyday captions otherwise.",
    )


def latent_size_input(tooltip: str, optional: bool = False) -> io.Int.Input:
    """The latent side (pixels / 8); 0 picks 8 for lab models and 64 for SD checkpoints."""
    return io.Int.Input("latent_size", default=0, min=0, max=256, optional=optional, tooltip=tooltip)


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


def send_text(node_id: str | None, text: str) -> None:
    """Progress text under a node in the frontend (nothing when no server runs)."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # headless use without a server: progress text is a nicety
        pass


def text_and_images(text: str, images, cls) -> dict:
    """UI output showing a text and images together in the node."""
    return {**ui.PreviewImage(images, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}


class Progress:
    """A ComfyUI progress bar whose every update first honours Cancel (it raises when interrupted)."""

    def __init__(self, total: int) -> None:
        self.bar = comfy.utils.ProgressBar(total)

    @staticmethod
    def check() -> None:
        """Raise if the user pressed Cancel."""
        comfy.model_management.throw_exception_if_processing_interrupted()

    def tick(self) -> None:
        """One step done."""
        self.check()
        self.bar.update(1)

    def at(self, done: int, total: int) -> None:
        """`done` of `total` steps done."""
        self.check()
        self.bar.update_absolute(done, total)


def output_path(prefix: str, suffix: str = ".safetensors") -> str:
    """The next free numbered name under ComfyUI's output folder, as the stock save nodes number files."""
    out_dir = folder_paths.get_output_directory()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, out_dir)
    return os.path.join(folder, f"{name}_{counter:05}_{suffix}")


def relative_to_output(path: str | os.PathLike) -> str:
    """A written file as the user finds it: relative to ComfyUI's output folder."""
    return os.path.relpath(path, folder_paths.get_output_directory())
