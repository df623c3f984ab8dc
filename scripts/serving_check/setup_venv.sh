#!/usr/bin/env bash
# Create (or reuse) .venv-serving at the repository root with the `speculators`
# package installed by pip. It lives apart from .venv because speculators pins
# transformers (<=5.19) and torch (<=2.14.1) ranges the project does not use.
#
# Usage: bash scripts/serving_check/setup_venv.sh
# Env:   SERVING_VENV      venv path            (default: <repo>/.venv-serving)
#        SPECULATORS_SPEC  pip requirement      (default: speculators)
#        SERVING_PYTHON    interpreter for venv (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SERVING_VENV:-$repo/.venv-serving}"
spec="${SPECULATORS_SPEC:-speculators}"
py="${SERVING_PYTHON:-python3}"

probe='import importlib.metadata as m, speculators, torch, transformers
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
print("speculators", m.version("speculators"), "| torch", torch.__version__,
      "| transformers", transformers.__version__, "| python", __import__("sys").version.split()[0])'

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "$probe" >/dev/null 2>&1; then
    echo "[setup_venv] reusing $venv"
    "$venv/bin/python" -c "$probe"
    exit 0
fi

echo "[setup_venv] creating $venv"
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

# Prefer a CPU build of torch when one lies in a pip find-links folder (this
# saves several GB of CUDA wheels on CPU-only machines). torchvision is then
# pinned to the matching release through a constraint on torch's version.
constraints="$venv/serving-constraints.txt"
: > "$constraints"
cpu_wheel=""
pyver="$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    [[ -d "$dir" ]] || continue
    cand="$(ls "$dir"/torch-*+cpu-"$pyver"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$cand" ]]; then cpu_wheel="$cand"; break; fi
done
if [[ -n "$cpu_wheel" ]]; then
    echo "[setup_venv] installing CPU torch from $cpu_wheel"
    "${pip[@]}" install --quiet "$cpu_wheel"
    tv="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)"
    echo "torch==$tv" >> "$constraints"
fi

echo "[setup_venv] pip install $spec"
"${pip[@]}" install --quiet -c "$constraints" "$spec"

# PyPI's torchvision/torchaudio wheels are CUDA builds; next to a CPU torch their
# compiled ops fail to register ("operator torchvision::nms does not exist") and
# transformers then cannot import PreTrainedModel. speculators itself never
# imports either package (they are install-time dependencies only), so a broken
# one is removed rather than left to poison `import transformers`.
for pkg in torchvision torchaudio; do
    if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)" \
        && ! "$venv/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        echo "[setup_venv] $pkg does not load with this torch build; uninstalling it (unused by speculators)"
        "${pip[@]}" uninstall --quiet -y "$pkg"
    fi
done

echo "[setup_venv] installed:"
"$venv/bin/python" -c "$probe"
"${pip[@]}" list --format=freeze 2>/dev/null \
    | grep -i -E '^(speculators|torch|torchvision|torchaudio|transformers|safetensors|pydantic)==' || true
