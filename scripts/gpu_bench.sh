#!/usr/bin/env bash
# `backdoor-seal bench gpu` on the workplace's remote GPU machine (nvidia-h200), in one `run` call.
#
# That machine has python3 3.12 with torch (cu130), numpy, safetensors, scipy, scikit-image, matplotlib,
# pillow, tqdm, einops, transformers, tokenizers, ... but no internet, no ComfyUI and not this pack. So:
#   - the four wheels the bench's imports need beyond those travel in .whl/ (ignored, carried):
#     torchsde + trampoline (ComfyUI's k-diffusion samplers), confusable-homoglyphs and platformdirs (ours);
#   - a slim copy of the provisioned ComfyUI travels in .comfy-gpu/ (ignored, carried): comfy/ and its
#     sibling packages without __pycache__, tests, the frontend, models and the other families' tokenizers;
#   - backdoor_seal is the repository root itself (pyproject maps it so): a symlink <work>/pkgs/backdoor_seal
#     -> the checkout on PYTHONPATH makes it importable; COMFYUI_PATH points ensure_comfy_importable at the
#     slim ComfyUI.
#
# 1. Here, once (and again after ComfyUI or the pins below change):
#        scripts/gpu_bench.sh --prepare
#    It adds /.whl/ and /.comfy-gpu/ to .git/info/exclude, downloads the wheels, builds .comfy-gpu/ from
#    .comfyui/ (or $COMFY_SRC) and prints what would travel. The tree that travels is limited to 64 MiB
#    (tracked + untracked-not-ignored files + carried paths); lab_models/ alone is about 69 MiB, so
#    move it out of the checkout for the call and back afterwards (the bench builds random-weight models
#    in memory and never reads lab_models/; nothing is committed or changed in git by the move):
#        mv lab_models /tmp/lab_models.away      # before the run call
#        mv /tmp/lab_models.away lab_models      # after it; `git status` is clean again
#    --prepare prints the size with and without lab_models/.
#
# 2. The device call (15 minutes of device time per task, all tries; a fresh machine takes a minute or
#    two to start; the full bench, SD1.5 then SDXL, should take a few minutes on an H200):
#        run(command="bash scripts/gpu_bench.sh", carry=[".whl", ".comfy-gpu"], timeout_s=450)
#    Extra arguments go to `bench gpu` (defaults: --arch sd15 sdxl, full size). Each architecture's line
#    is written as soon as it is done, so a call cut off at its limit still brings back SD1.5's line in
#    gpu.jsonl. A lighter rerun for what is missing, on the still-warm machine (it stays warm 30 s):
#        run(command="bash scripts/gpu_bench.sh --arch sdxl --scan-slice 1024 --repeats 2",
#            carry=[".whl", ".comfy-gpu"], timeout_s=300)
#    then give_back unless you rerun at once. Files back: gpu.jsonl (the records), gpu.log (stderr),
#    env.txt (nvidia-smi, versions, commit).
#
# 3. Afterwards, here (FILES_AT is the reply's files_at):
#        cat "$FILES_AT/gpu.jsonl" >> docs/results/gpu.jsonl
#        .venv/bin/backdoor-seal bench table        # fills README's GPU section from docs/results/gpu.jsonl
#
# A local rehearsal of the remote run on a CPU (any python with torch and the packages above, no pack
# installed into it): PYTHON=/tmp/gpuvenv/bin/python scripts/gpu_bench.sh --tiny --arch sd15 sdxl ...
#
# Environment: PYTHON (default python3), OUT (where gpu.jsonl goes; the device sets it; default
# out/gpu here, which .gitignore covers), GPU_BENCH_WORK (scratch for the wheels' target and the
# package link; default /tmp/gpu-bench), COMFY_SRC (--prepare's ComfyUI; default .comfyui).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WHEELS=(torchsde==0.2.6 trampoline==0.1.2 confusable-homoglyphs==3.3.1 platformdirs==4.14.9)
LIMIT=$((64 * 1024 * 1024))

tree_bytes() { # what travels besides the carried paths: tracked and untracked-not-ignored files present
    git ls-files -z --cached --others --exclude-standard | sort -zu |
        (cd "$ROOT" && xargs -0 stat -c '%s' 2>/dev/null) | awk '{s += $1} END {print s + 0}'
}

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

prepare() {
    local src=${COMFY_SRC:-$ROOT/.comfyui}
    [[ -f $src/comfy/model_management.py ]] || { echo "no ComfyUI at $src (make provision)" >&2; exit 1; }
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    for pattern in /.whl/ /.comfy-gpu/; do
        grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >>"$exclude"
    done

    mkdir -p .whl
    local have=1 spec name
    for spec in "${WHEELS[@]}"; do
        name=${spec%%==*}
        name=${name//-/_}
        compgen -G ".whl/${name}-${spec##*==}-*.whl" >/dev/null || have=0
    done
    if [[ $have == 0 ]]; then
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    fi

    # ComfyUI's Python (the bench imports ~170 modules of comfy/; the rest is small and kept for safety)
    # and the data it reads for SD1.x / SDXL (sd1_tokenizer/, the CLIP configs); not the tokenizers of
    # other families (llama, qwen, t5, ...: 18 MB, read only when such a model is built).
    rm -rf .comfy-gpu
    mkdir -p .comfy-gpu
    local parts=(comfy comfy_api comfy_execution comfy_config utils requirements.txt pyproject.toml)
    local f
    for f in "$src"/*.py; do parts+=("$(basename "$f")"); done
    local have_parts=()
    for f in "${parts[@]}"; do [[ -e $src/$f ]] && have_parts+=("$f"); done
    tar -C "$src" -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='comfy/comfy_types/examples' \
        --exclude='comfy/text_encoders/*_tokenizer' "${have_parts[@]}" | tar -C .comfy-gpu -xf -

    local tree whl comfy with_lab
    tree=$(tree_bytes)
    whl=$(du -sb .whl | cut -f1)
    comfy=$(du -sb .comfy-gpu | cut -f1)
    with_lab=$((tree + whl + comfy))
    ls -l .whl
    echo "tree $(mib "$tree"), .whl $(mib "$whl"), .comfy-gpu $(mib "$comfy"): $(mib "$with_lab") travels"
    if [[ -d lab_models ]]; then
        local lab
        lab=$(du -sb lab_models | cut -f1)
        echo "without lab_models/ ($(mib "$lab")): $(mib $((with_lab - lab)))"
        ((with_lab <= LIMIT)) || echo "over the 64 MiB limit: move lab_models/ out of the checkout for the run call"
    fi
}

if [[ ${1:-} == --prepare ]]; then
    prepare
    exit 0
fi

# --- the run (on the device machine, or a local rehearsal) ---------------------------------------------
WORK=${GPU_BENCH_WORK:-/tmp/gpu-bench}
OUT=${OUT:-$ROOT/out/gpu}
mkdir -p "$OUT" "$WORK/pkgs"
if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf "$WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl
fi
ln -sfn "$ROOT" "$WORK/pkgs/backdoor_seal"
export PYTHONPATH="$WORK/pkgs:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z ${COMFYUI_PATH:-} && -f .comfy-gpu/comfy/model_management.py ]]; then
    export COMFYUI_PATH=$ROOT/.comfy-gpu
fi
export PYTHONUNBUFFERED=1

{
    date -u +%FT%TZ
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
    echo "COMFYUI_PATH=${COMFYUI_PATH:-} args: $*"
} 2>&1 | tee "$OUT/env.txt"

# stdout is the records, one JSON object per architecture (flushed as each finishes); stderr the log
set +e
"$PY" -m backdoor_seal.core.cli bench gpu "$@" 2> >(tee "$OUT/gpu.log" >&2) | tee "$OUT/gpu.jsonl"
rc=${PIPESTATUS[0]}
set -e
wait  # the stderr tee
if ((rc != 0)); then
    echo "bench gpu failed (exit $rc); see gpu.log" >&2
    exit "$rc"
fi
"$PY" - "$OUT/gpu.jsonl" <<'EOF'
import json, sys
lines = [line for line in open(sys.argv[1]) if line.strip()]
records = [json.loads(line) for line in lines]  # fails on a non-JSON line
if not records:
    sys.exit("bench gpu printed no record")
for r in records:
    print(f"ok: {r['device']} {r['arch']} ({r['size']}) in {r['seconds']} s", file=sys.stderr)
EOF
