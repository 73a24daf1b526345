"""backdoor-seal: ComfyUI entry point (V3). Importing it never imports ComfyUI modules."""

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension; ComfyUI calls this once at start-up."""
    from .nodes import SealExtension

    return SealExtension()
