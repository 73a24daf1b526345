"""backdoor-seal: ComfyUI entry point (V3). Importing it never imports ComfyUI modules."""

from .core.version import __version__

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY", "__version__", "comfy_entrypoint"]


async def comfy_entrypoint():
    """Return the pack's ComfyExtension; ComfyUI calls this once at start-up."""
    from .nodes import SealExtension

    return SealExtension()
