#!/usr/bin/env bash
# The GPU check: one command, on one GPU with 16 cores, within 8 minutes.
#
#     bash bench/gpu_check.sh            # figures in bench/out/gpu/*.json, a summary on stdout
#
# 1. training images/s of every architecture at its paper's crop, bf16 + channels_last, with MFU
#    (bench/gpu_train.py; the step alone, data already on the GPU);
# 2. `segpipe train` on 1 GPU (Ray Train + Ray Data feed) against a plain PyTorch loop (DataLoader, same
#    cores, same step) on the same data (bench/train.py --device cuda);
# 3. `segpipe evaluate` and `segpipe predict` images/s on one GPU, against the one-process loop
#    (bench/gpu_inference.py, bench/predict.py --num-gpus 1);
# 4. `segpipe serve` with a GPU model replica against one uvicorn process on the same GPU
#    (bench/serve.py --device cuda).
# Each part has its own time limit, so one slow part cannot take the others' time; a part that fails or
# runs out of time is reported and the rest still run. Needs .venv (`make setup`) or PY=python-with-segpipe.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONWARNINGS=ignore RAY_ADDRESS=local
"$PY" - <<'EOF' || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
started=$(date +%s)
failed=()
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^\s*$' | tail -n 25
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $(( $(date +%s) - t0 )) s"
    [ "$code" -eq 0 ] || failed+=("$name")
}
part train_per_arch 150 "$PY" bench/gpu_train.py --seconds 5 --json-out "$OUT/train_per_arch.json"
part train_vs_loop 110 "$PY" bench/train.py --device cuda --model deeplab_largefov --width 1 --crop 321 \
    --batch-size 20 --epochs 3 --num-train 400 --workdir "$OUT/train" --json-out "$OUT/train_vs_loop.json"
part evaluate 60 "$PY" bench/gpu_inference.py --images 200 --json-out "$OUT/evaluate.json"
part predict 60 "$PY" bench/predict.py --images 500 --width 1 --num-gpus 1 --json-out "$OUT/predict.json"
part serve 90 "$PY" bench/serve.py --device cuda --cases deeplab --seconds 6 --soak 0 --json-out "$OUT/serve.json"
echo "gpu_check: $(( $(date +%s) - started )) s in all; figures in $OUT/"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: failed or out of time: ${failed[*]}" >&2
    exit 1
fi
