"""The engine: plain torch. Only core/backends/comfy*.py import ComfyUI, and only lazily."""
