#!/usr/bin/env bash
# What only a GPU shows, in about 8 minutes on one card, without the network:
#   1. versions (driver, CUDA, torch, card) and bf16 + torch.compile training vs fp32  (scripts.gpu_check)
#   2. throughput, MFU and peak memory at d8 and d20, bf16, compiled, batch 32 x 2048  (scripts.bench_model)
#   3. the smoke profile end to end on the GPU, every stage incl. RL, and its wall time
#   4. RL rollouts at d8, batched vs one prompt at a time                              (scripts.bench_rl)
# Each part has its own time limit; a part that fails or runs out of time is reported and the rest go on.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # default gpu_check/; writes OUT_DIR/gpu_check.md
#
# Python: NANOCHAT_PYTHON, else .venv/bin/python; on a bare node (neither) it first does the
# pipeline's set-up (driver check, uv, `uv sync`). A machine with torch+CUDA but no uv needs the
# rustbpe extension built elsewhere (it is abi3: one build serves Python >= 3.10):
#   mkdir -p build/pyext && cp -r .venv/lib/python3*/site-packages/rustbpe build/pyext/   # where built
# build/pyext is put on PYTHONPATH. Without CUDA it says so and runs only part 1 (fp32 twice).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NANOCHAT_PYTHON:-}" ]; then
    PY=$NANOCHAT_PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    # A bare node: the system python3 has no torch, and would report "no CUDA device"
    echo "[gpu_check] no .venv yet: setting it up first (uv sync: torch with CUDA, about 3 GB)"
    python3 -m nanochat.driver_check || exit 2
    source scripts/install_uv.sh
    uv sync || { echo "[gpu_check] uv sync failed (its message is above)" >&2; exit 2; }
    PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[gpu_check] $PY cannot import torch: run the set-up first (uv sync, or" \
         "bash run_aquarat_small.sh), or point NANOCHAT_PYTHON at a Python that has torch" >&2
    exit 2
fi
OUT=${1:-gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/gpu_check.md"
export PYTHONPATH="$PWD:$PWD/build/pyext${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
export NANOCHAT_BASE_DIR="$OUT/base"
echo "# GPU check ($(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))" \
    > "$REPORT"
echo >> "$REPORT"

# part NAME SECONDS CMD...: runs CMD with a time limit, its output into OUT/NAME.log and the report
part() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "[gpu_check] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status="ok"
    [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
    [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit}s"
    echo "[gpu_check] $name: $status in $((SECONDS - t0)) s"
    {
        echo "## $name: $status, $((SECONDS - t0)) s"
        echo
        echo '```'
        tail -n 40 "$OUT/$name.log"
        echo '```'
        echo
    } >> "$REPORT"
    return 0
}

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
part versions_and_bf16 120 "$PY" -m scripts.gpu_check --out "$OUT/bf16.md"
[ -f "$OUT/bf16.md" ] && cat "$OUT/bf16.md" >> "$REPORT"
if [ "$CUDA" != 1 ]; then
    echo "[gpu_check] no CUDA device visible to torch: parts 2-4 need one, skipped" | tee -a "$REPORT"
    exit 0
fi
# at the gpu profile's micro-batch (32 x 2048): tokens/s, MFU and the peak memory that batch needs
part bench_model 210 "$PY" -m scripts.bench_model --skip-cpu --gpu-depths 8,20 --gpu-batch-size 32
# the smoke profile without uv (--no-sync) and with this python; W&B disabled; its own base dir
part smoke_profile 150 env NANOCHAT_PYTHON="$PY" bash run_aquarat_small.sh --profile smoke --no-sync \
    --run gpu_smoke
part rl_rollouts_d8 90 env NANOCHAT_TOKENIZER_DIR="$NANOCHAT_BASE_DIR/runs/gpu_smoke/tokenizer" \
    "$PY" -m scripts.bench_rl --random-depth 8 --prompts 16 --samples 8 \
    --max-new-tokens 256 --steps 2
echo "[gpu_check] written: $REPORT"
