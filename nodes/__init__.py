"""Thin ComfyUI V3 node wrappers over core/; one module per job, no algorithm code here."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .nodes_attention import SealAttentionCapture, SealAttentionHeatmaps
from .nodes_detect import SealDetectPrompt, SealScanModel
from .nodes_diff import SealCompareLora, SealCompareModels
from .nodes_evaluate import SealEvaluate
from .nodes_info import SealModelInfo
from .nodes_lab import SealLabCheckpointLoader, SealLabFamilyModel
from .nodes_sanitize import SealSanitize
from .nodes_sau import SealLoadSAUProfile, SealSAUDecode, SealSAUProfile, SealSAUSampler
from .nodes_unlearn import SealSaveSanitized, SealUnlearn

NODES: list[type[io.ComfyNode]] = [
    SealModelInfo,
    SealLabCheckpointLoader,
    SealLabFamilyModel,
    SealAttentionCapture,
    SealAttentionHeatmaps,
    SealDetectPrompt,
    SealScanModel,
    SealCompareModels,
    SealCompareLora,
    SealSanitize,
    SealUnlearn,
    SealSaveSanitized,
    SealSAUProfile,
    SealLoadSAUProfile,
    SealSAUSampler,
    SealSAUDecode,
    SealEvaluate,
]


class SealExtension(ComfyExtension):
    """Every node of the pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The node classes ComfyUI registers."""
        return list(NODES)
