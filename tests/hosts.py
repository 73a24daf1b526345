"""The ComfyUI hosts the server tests run on: the default one (0.3.75, also ComfyUI as a library) and
the second (upstream 0.8.0, which scripts/provision.sh copies only where its tree exists)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ["0.3.75", "0.8.0"]
SECOND_HOST = ROOT / ".comfyui-0.8.0"
SECOND_MISSING = "second host not provisioned: no ../shared/comfyui-0.8.0 tree (scripts/provision.sh)"


def second_host_ready() -> bool:
    """Whether the second host was provisioned."""
    return (SECOND_HOST / "main.py").is_file()
