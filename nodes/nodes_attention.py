"""SealAttentionCapture and SealAttentionHeatmaps: which word drives which region."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.attention import CaptureSettings, CrossAttentionRecorder
from ..core.backends.comfy import attach_attention_recorder, clip_position_labels, text_conditioning
from ..core.heatmaps import overlay_grid
from .common import CATEGORY as ROOT
from .common import Attention

CATEGORY = f"{ROOT}/attention"


class SealAttentionCapture(io.ComfyNode):
    """Patch a MODEL so that sampling with it records per-token cross-attention maps."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealAttentionCapture",
            display_name="Seal Attention Capture",
            category=CATEGORY,
            description="Encodes the prompt and returns a MODEL whose cross-attention layers record "
            "per-token maps while any sampler runs it. The output itself is unchanged: ComfyUI's own "
            "attention kernel still computes it. Connect ATTENTION to Seal Attention Heatmaps. Works with "
            "Deep Shrink (maps recorded at each grid are resized and averaged) and with IPAdapter-style "
            "attention packs placed before or after it; a call it cannot read is skipped with one warning.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input(
                    "text", multiline=True, tooltip="The positive prompt (its tokens label the maps)."
                ),
                io.Int.Input(
                    "resolution", default=16, min=4, max=128, tooltip="Maps are resized to this square grid."
                ),
                io.String.Input(
                    "layers",
                    default="",
                    tooltip="Comma-separated parts of layer names to record (e.g. 'input_blocks, output_blocks'); "
                    "empty records every cross-attention layer.",
                ),
                io.Int.Input("first_step", default=0, min=0, max=10000),
                io.Int.Input(
                    "last_step", default=-1, min=-1, max=10000, tooltip="Exclusive; -1 = to the end."
                ),
            ],
            outputs=[
                io.Model.Output("MODEL"),
                io.Conditioning.Output("CONDITIONING"),
                Attention.Output("ATTENTION"),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: io.Model.Type,
        clip: io.Clip.Type,
        text: str,
        resolution: int,
        layers: str,
        first_step: int,
        last_step: int,
    ) -> io.NodeOutput:
        settings = CaptureSettings(
            layers=tuple(p.strip() for p in layers.split(",") if p.strip()),
            first_step=first_step,
            last_step=None if last_step < 0 else last_step,
            resolution=resolution,
        )
        recorder = CrossAttentionRecorder(settings)
        recorder.labels = [clip_position_labels(clip, text)]
        conditioning = text_conditioning(clip, text)
        return io.NodeOutput(attach_attention_recorder(model, recorder), conditioning, recorder)


class SealAttentionHeatmaps(io.ComfyNode):
    """Overlay each token's attention map on the images sampled with the captured MODEL."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealAttentionHeatmaps",
            display_name="Seal Attention Heatmaps",
            category=CATEGORY,
            description="A grid with one row per image: the image, then one overlay per prompt token, "
            "labelled with the token (invisible and non-ASCII characters shown as <U+XXXX>).",
            inputs=[
                Attention.Input("attention"),
                io.Image.Input("images"),
                io.Int.Input("max_tokens", default=8, min=1, max=77),
                io.Boolean.Input("include_bos_eos", default=False),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05),
                io.Combo.Input("colormap", options=["inferno", "jet", "viridis", "magma", "turbo"]),
            ],
            outputs=[io.Image.Output("IMAGE")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        attention: CrossAttentionRecorder,
        images: io.Image.Type,
        max_tokens: int,
        include_bos_eos: bool,
        opacity: float,
        colormap: str,
    ) -> io.NodeOutput:
        grid = overlay_grid(
            attention.maps(), images, max_tokens, opacity, colormap, include_special=include_bos_eos
        )
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
