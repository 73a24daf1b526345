"""backdoor-seal: ComfyUI entry point (V3). Importing it never imports ComfyUI modules.

Nothing here imports at module level: pytest (importlib mode) loads this file on its own when the
checkout's folder name is no Python identifier (`backdoor-seal`), and a relative import would fail.
"""

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY", "__version__", "comfy_entrypoint"]


def __getattr__(name: str):
    if name == "__version__":  # one place for the version: core/version.py
        from .core.version import __version__

        return __version__
    raise AttributeError(name)


async def comfy_entrypoint():
    """Return the pack's ComfyExtension; ComfyUI calls this once at start-up."""
    from .nodes import SealExtension

    return SealExtension()
