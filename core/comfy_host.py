"""A headless ComfyUI server on 127.0.0.1 and a small /prompt client (stdlib; following progress over the
websocket uses aiohttp, which every ComfyUI install has)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

# a host provisioned with packages of its own keeps them here, first on its path (scripts/provision.sh)
HOST_DEPS = ".seal-deps"
PROGRESS_TEXT = 3  # ComfyUI's BinaryEventTypes.TEXT: a node's progress text (protocol.py)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """A prompt was rejected or failed on the server."""


class ComfyClient:
    """Posts API-format graphs to /prompt and waits for them through /history."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get_json(self, path: str, timeout: float = 30) -> Any:
        """GET a JSON endpoint."""
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:  # noqa: S310 (loopback)
            return json.loads(r.read())

    def post_json(self, path: str, value: Any, timeout: float = 30) -> None:
        """POST a JSON value (e.g. a frontend setting)."""
        req = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(value).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310 (loopback)
            pass

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        """GET raw bytes (e.g. /view)."""
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:  # noqa: S310
            return r.read()

    def queue(self, graph: dict[str, Any], workflow: dict[str, Any] | None = None) -> str:
        """Submit a graph; return its prompt id, or raise with the server's validation errors.

        `workflow` (UI format) goes along as the frontend sends it, so SaveImage embeds it in its PNGs."""
        payload: dict[str, Any] = {"prompt": graph, "client_id": self.client_id}
        if workflow is not None:
            payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        body = json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + "/prompt", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise ComfyError(f"/prompt rejected the graph: {e.read().decode(errors='replace')}") from None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict[str, Any]:
        """Poll /history until the prompt finished; raise with the node's error if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") == "error":
                    msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    detail = msgs[0][1] if msgs else entry["status"]
                    raise ComfyError(f"prompt {prompt_id} failed: {json.dumps(detail)[:4000]}")
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def follow(self, on_text: Callable[[str, str], None]) -> Callable[[], None]:
        """Call on_text(node id, text) for every progress text and progress bar update the server sends
        over its websocket (/ws), from a background thread; returns a function that stops following.
        Without aiohttp, or when the socket fails, nothing is followed (progress is a nicety)."""
        stop = threading.Event()

        async def listen() -> None:
            import asyncio

            import aiohttp

            url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url, heartbeat=30) as ws:
                while not stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) >= 8:
                        event, size = struct.unpack(">II", msg.data[:8])
                        if event == PROGRESS_TEXT:
                            node = msg.data[8 : 8 + size].decode(errors="replace")
                            on_text(node, msg.data[8 + size :].decode(errors="replace"))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data.get("type") == "progress":
                            d = data["data"]
                            on_text(str(d.get("node")), f"{d.get('value')}/{d.get('max')}")
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

        def main() -> None:
            import asyncio

            try:
                asyncio.run(listen())
            except Exception:  # noqa: BLE001 (no aiohttp, a closed socket: the run goes on without progress)
                pass

        thread = threading.Thread(target=main, name="comfy-progress", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(timeout=5)

        return halt

    def run(
        self, graph: dict[str, Any], timeout: float = 600, workflow: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue a graph and return its /history entry (outputs per node id)."""
        return self.wait(self.queue(graph, workflow), timeout=timeout)

    def fetch_image(self, image: dict[str, str]) -> bytes:
        """The bytes of an image listed in a node's UI output."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get_bytes("/view?" + query)

    def fetch_rgb(self, images: list[dict[str, str]]) -> list:
        """Images listed in a node's UI output, as uint8 RGB arrays."""
        import io

        import numpy as np
        from PIL import Image

        return [np.asarray(Image.open(io.BytesIO(self.fetch_image(i))).convert("RGB")) for i in images]


class ComfyServer:
    """Runs `python main.py --cpu` from a ComfyUI folder on a loopback port; a context manager."""

    def __init__(
        self,
        comfy_root: str | os.PathLike,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        extra_model_paths: dict[str, str] | None = None,
        output_dir: str | os.PathLike | None = None,
        python: str = sys.executable,
        startup_timeout: float = 180,
    ):
        self.root = Path(comfy_root)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else self.root / f"seal-server-{self.port}.log"
        self.extra_model_paths = extra_model_paths or {}
        self.output_dir = output_dir
        self.python = python
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> ComfyClient:
        """A client bound to this server."""
        return ComfyClient(self.url)

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ComfyServer:
        """Start the server and wait until /object_info answers."""
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
        ]
        if self.extra_model_paths:
            yaml_path = self.log_path.with_suffix(".paths.yaml")
            lines = ["backdoor_seal_test:", "  base_path: /"] + [
                f"  {k}: {v}" for k, v in self.extra_model_paths.items()
            ]
            yaml_path.write_text("\n".join(lines) + "\n")
            cmd += ["--extra-model-paths-config", str(yaml_path)]
        if self.output_dir:
            cmd += ["--output-directory", str(self.output_dir)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed with the process)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        deps = self.root / HOST_DEPS
        if deps.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with {self.proc.returncode} at start-up:\n{self.log()[-4000:]}"
                )
            try:
                self.client().get_json("/object_info", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log()[-4000:]}"
        )

    def stop(self) -> None:
        """Terminate the server (kill after 20 s)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
