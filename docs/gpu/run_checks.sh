#!/usr/bin/env bash
# The GPU checks of docs/GPU.md in one script, for a CUDA machine with the project installed (`pip install -e
# '.[test]'`). Writes everything under ${OUT:-gpu_out}; record the results in docs/GPU.md with the date and device.
#   1. the default test tier on CUDA in fp32 (greedy equality, compiled path included) and the bf16 smoke tests;
#   2. the engine benchmark on a ~1B-parameter random pair (hidden 2048, 24 layers, vocab 32000; its 1-layer
#      self-draft gives a controlled acceptance), bf16, batch 1, 4 and 16: transformers greedy / assisted /
#      prompt lookup, mmspec eager and compiled (CUDA graphs) rows, compile time apart;
#   3. the same benchmark's small pair in fp32, where every row must equal transformers' greedy output.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.csv" 2>&1
"$py" -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$out/versions.txt"

MMSPEC_TEST_DEVICE=cuda timeout ${SUITE_S:-1500} "$py" -m pytest -q -x -p no:cacheprovider \
  > "$out/suite_cuda_fp32.txt" 2>&1; echo "suite rc=$?" >> "$out/summary.txt"

timeout ${BENCH_S:-900} "$py" -m mmspec bench engine --device cuda --dtype bfloat16 --hidden 2048 --layers 24 \
  --vocab 32000 --batch-sizes 1 4 16 --new-tokens 128 --compile on --out "$out/engine_1b_bf16" \
  > "$out/engine_1b_bf16.log" 2>&1; echo "engine 1b bf16 rc=$?" >> "$out/summary.txt"

timeout ${BENCH_S:-900} "$py" -m mmspec bench engine --device cuda --dtype float32 --compile on \
  --out "$out/engine_small_fp32" > "$out/engine_small_fp32.log" 2>&1
echo "engine small fp32 rc=$?" >> "$out/summary.txt"
cat "$out/summary.txt"
