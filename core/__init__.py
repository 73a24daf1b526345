"""The engine: plain torch. Only core/backends/comfy.py imports ComfyUI, and only lazily."""
