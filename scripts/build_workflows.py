"""Write the example workflows: workflows/NAME.json (UI format, for people) and tests/workflows/NAME.api.json
(the API format the frontend queues for it, which the server tests run). Graphs come from core/demo.py;
widget order and defaults from a real ComfyUI's /object_info. Run: .venv/bin/python scripts/build_workflows.py"""

from __future__ import annotations

import json
from pathlib import Path

from backdoor_seal.core.backends.comfy import ensure_comfy_importable
from backdoor_seal.core.comfy_host import ComfyServer
from backdoor_seal.core.demo import WORKFLOWS
from backdoor_seal.core.workflows import api_from_ui, ui_from_api

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Build every workflow in core.demo.WORKFLOWS against a fresh headless ComfyUI."""
    with ComfyServer(ensure_comfy_importable(), log_path=ROOT / ".cache" / "build-workflows.log") as server:
        info = server.client().get_json("/object_info", timeout=120)
    for name, (title, graph) in WORKFLOWS.items():
        ui = ui_from_api(graph(), info, title)
        (ROOT / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
        api = api_from_ui(ui, info)
        (ROOT / "tests" / "workflows" / f"{name}.api.json").write_text(
            json.dumps(api, indent=2, ensure_ascii=False) + "\n"
        )
        print(f"wrote workflows/{name}.json and tests/workflows/{name}.api.json")


if __name__ == "__main__":
    main()
