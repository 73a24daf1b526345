"""Per-model work kept on disk so it is done once: a folder of small JSON files named by a key's hash.

The folder is `BACKDOOR_SEAL_CACHE` when set, else the user's cache folder (platformdirs: on Linux
~/.cache/backdoor-seal). A key is every input that decides the result (the model's weights fingerprint, the
prompts, the settings, a format number); a hit is read, a miss is computed and written atomically. A file
that does not parse is treated as a miss and replaced; nothing in a file names a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .safetensors_io import write_json


def cache_dir() -> Path:
    """The cache folder (not created until something is written)."""
    env = os.environ.get("BACKDOOR_SEAL_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("backdoor-seal"))


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, ensure_ascii=True, default=str)


def key_hash(kind: str, key: dict[str, Any]) -> str:
    """The file stem of a cache entry: its kind and the SHA-256 of its key's canonical JSON."""
    return f"{kind}-{hashlib.sha256(_canonical(key).encode()).hexdigest()[:32]}"


def cached(kind: str, key: dict[str, Any], compute: Callable[[], dict]) -> tuple[dict, bool]:
    """compute()'s JSON-able dict, read from the cache when an entry with this key exists. Returns (value,
    hit). An unreadable cache folder or file only costs the computation."""
    canonical = json.loads(_canonical(key))  # the key as a file holds it (tuples read back as lists)
    path = cache_dir() / kind / f"{key_hash(kind, key)}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") == canonical:
            return entry["value"], True
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": canonical, "value": value}, overwrite=True)
    except OSError:
        pass  # a read-only home: the result is still returned
    return value, False
