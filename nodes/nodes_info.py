"""SealModelInfo: what the engine sees in a model."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..core.backends.comfy import describe_model
from .common import CATEGORY


class SealModelInfo(io.ComfyNode):
    """Report the UNet family, its cross-attention layers and the text encoder's tokenizer."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SealModelInfo",
            display_name="Seal Model Info",
            category=CATEGORY,
            description="Walks the model and reports its UNet family, the cross-attention layers the "
            "backdoor engine will read, and the tokenizer of each text encoder.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", optional=True),
            ],
            outputs=[io.String.Output("report", tooltip="The report as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: io.Model.Type, clip: io.Clip.Type | None = None) -> io.NodeOutput:
        info = describe_model(model, clip)
        text = json.dumps(info, indent=2)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
