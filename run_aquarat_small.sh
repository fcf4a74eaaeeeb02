#!/usr/bin/env bash
# nanochat-aquarat, every stage end to end:
#   set-up -> tokenizer -> pretraining -> mid-training -> SFT -> RL -> evaluation -> report
#
#   bash run_aquarat_small.sh                      # auto: GPU profile when CUDA GPUs are visible, else CPU
#   bash run_aquarat_small.sh --profile cpu        # tiny model on synthetic AQuA, a laptop is enough
#   bash run_aquarat_small.sh --profile smoke      # the stages for a few steps: checks the set-up (~2 min)
#   bash run_aquarat_small.sh --profile gpu --depth 20 --run my-run
#
# Re-running the same command resumes: finished stages are skipped (marker files under
# <base>/runs/<run>/), an interrupted stage resumes from its last checkpoint. --force redoes them all.
# Everything a run trains or writes is its own: checkpoints are tagged with the run name, the report is
# <base>/report/<run>/report.md. .env (beside this script) is read first; the environment wins.
# The whole script is one { ... } block: bash parses it completely before running any of it, so
# editing or git-pulling this file while a run is in progress cannot derail that run.
{
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'EOF'
Usage: bash run_aquarat_small.sh [options]

  --profile auto|cpu|gpu|smoke
                           cpu: tiny model, synthetic data (minutes on a laptop);
                           smoke: every stage but the downloads (data, base_eval) for a few steps, to
                           check an install (learns nothing);
                           gpu: FineWeb-Edu + AQuA-RAT at --depth, torchrun over all GPUs (default auto)
  --run NAME               run name: checkpoint tags, logs, W&B group, markers, report
                           (default NANOCHAT_RUN, else aquarat_small)
  --depth N                model depth for the gpu profile (default 8; 20 for the larger run)
  --nproc N                processes for torchrun (default: number of visible GPUs)
  --device-batch-size N    gpu profile: pretraining rows per micro-batch per GPU (default 32; cut to
                           what fits the GPU's memory by scripts.plan_memory before any download,
                           and halved by base_train itself if a step still runs out of memory)
  --max-seq-len N          gpu profile: context of pretraining, mid-training and SFT (default 2048)
  --shards N               FineWeb-Edu shards to download for the gpu profile (default: enough for
                           the depth's budget of 20 tokens per parameter, estimated: 67 at d8)
  --aqua-data-dir DIR      local AQuA-RAT directory (original JSON-lines or prepared JSONL) instead of Hugging Face
  --seed N                 seed of the training stages (weight init, data order; default 42)
  --from STAGE             redo STAGE and every later one (training stages start over with --fresh):
                           data, tokenizer, tok_eval, base, base_loss, base_eval, mid, sft, rl; each
                           chat stage is evaluated right after it; eval: the three evaluations only
  --force                  redo every stage; training stages start over (--fresh deletes their old checkpoints)
  --gpu-hourly-price USD   what the machine costs per hour, for the report's cost per stage (default 0:
                           no cost shown; launch_lambda.py passes the instance's price)
  --stage-args STAGE=ARGS  extra flags for one stage, after the profile's own (the last of a repeated
                           flag wins): --stage-args "rl=--num-steps 600 --max-new-tokens 768".
                           STAGE is a stage name, or eval for all three evaluations; repeatable
  --nnodes N --node-rank R --master-addr HOST [--master-port P]
                           one of N nodes (machines) of one run: every node runs this same command
                           with its own --node-rank (0 first); torchrun joins their --nproc processes
                           at HOST:P (node 0's address; port default 29500). Single-process stages
                           (downloads, tokenizer, report) run on node 0, the others wait for them.
                           Needs NANOCHAT_BASE_DIR on storage all nodes share (docs/nodes.md)
  --cpu-rehearsal          let --profile gpu run on CPU (gloo under torchrun, --nproc default 2): the
                           gpu profile's exact stages and flags, shrunk with --stage-args, to rehearse
                           a GPU node's run before paying for one (the test suite does this)
  --plan                   print the gpu profile's plan for this depth and GPU count (every stage's
                           steps, tokens, FLOPs, estimated time and cost) and stop
  --no-wandb               no Weights & Biases at all (WANDB_MODE=disabled): only the local JSON-lines
                           files under <base>/runs/<run>/ (changes no result; allowed on a resume)
  --no-sync                skip uv: run with the environment as it is (NANOCHAT_PYTHON, else .venv,
                           else python3), e.g. a torch build installed by hand for an older driver
  -h, --help               this text

Environment (or .env): NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_API_KEY / WANDB_MODE /
WANDB_PROJECT / WANDB_ENTITY / WANDB_BASE_URL, HF_TOKEN. See .env.template. Set by launch_lambda.py:
NANOCHAT_INSTANCE_ID (recorded with the run's lock), NANOCHAT_LOCK_TAKEOVER (an instance id the
Lambda API reports terminated: its lock on the shared filesystem is set aside).
EOF
}

PROFILE=auto RUN="" DEPTH=8 NPROC="" SHARDS="" AQUA_DIR="" FROM="" FORCE=0 SEED=42 PRICE=0
REHEARSAL=0 NO_SYNC=0 NO_WANDB=0 PLAN=0 DEVICE_BATCH=32 SEQ_LEN=2048
NNODES=1 NODE_RANK=0 MASTER_ADDR="" MASTER_PORT=29500
declare -A STAGE_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) PROFILE=${2:?--profile needs a value}; shift 2 ;;
        --run) RUN=${2:?--run needs a value}; shift 2 ;;
        --depth) DEPTH=${2:?--depth needs a value}; shift 2 ;;
        --nproc) NPROC=${2:?--nproc needs a value}; shift 2 ;;
        --shards) SHARDS=${2:?--shards needs a value}; shift 2 ;;
        --aqua-data-dir) AQUA_DIR=${2:?--aqua-data-dir needs a value}; shift 2 ;;
        --from) FROM=${2:?--from needs a value}; shift 2 ;;
        --seed) SEED=${2:?--seed needs a value}; shift 2 ;;
        --gpu-hourly-price) PRICE=${2:?--gpu-hourly-price needs a value}; shift 2 ;;
        --stage-args)
            spec=${2:?--stage-args needs STAGE=ARGS}
            if [[ "$spec" != *=* ]]; then
                echo "--stage-args wants STAGE=ARGS, e.g. \"rl=--num-steps 600\" (got '$spec')" >&2; exit 2
            fi
            STAGE_ARGS[${spec%%=*}]="${STAGE_ARGS[${spec%%=*}]:-} ${spec#*=}"; shift 2 ;;
        --cpu-rehearsal) REHEARSAL=1; shift ;;
        --nnodes) NNODES=${2:?--nnodes needs a value}; shift 2 ;;
        --node-rank) NODE_RANK=${2:?--node-rank needs a value}; shift 2 ;;
        --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
        --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
        --device-batch-size) DEVICE_BATCH=${2:?--device-batch-size needs a value}; shift 2 ;;
        --max-seq-len) SEQ_LEN=${2:?--max-seq-len needs a value}; shift 2 ;;
        --no-sync) NO_SYNC=1; shift ;;
        --no-wandb) NO_WANDB=1; shift ;;
        --plan) PLAN=1; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_aquarat_small.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$PROFILE" in auto|cpu|gpu|smoke) ;; *) echo "--profile must be auto, cpu, gpu or smoke (got '$PROFILE')" >&2; exit 2 ;; esac
STAGES="data tokenizer tok_eval base base_loss base_eval mid sft rl eval"
if [ -n "$FROM" ] && ! [[ " $STAGES " == *" $FROM "* ]]; then
    echo "--from must be one of: $STAGES (got '$FROM')" >&2; exit 2
fi
for name in "${!STAGE_ARGS[@]}"; do
    if ! [[ " $STAGES eval_mid eval_sft eval_rl " == *" $name "* ]]; then
        echo "--stage-args: unknown stage '$name'; stages are: $STAGES (eval = all three evaluations)" >&2
        exit 2
    fi
done
if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then echo "--seed must be a whole number (got '$SEED')" >&2; exit 2; fi
for pair in "--depth:$DEPTH" "--shards:${SHARDS:-1}" "--nproc:${NPROC:-1}" \
        "--device-batch-size:$DEVICE_BATCH" "--max-seq-len:$SEQ_LEN" "--nnodes:$NNODES" \
        "--master-port:$MASTER_PORT"; do
    if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
        echo "${pair%%:*} must be a whole number above 0 (got '${pair#*:}')" >&2; exit 2
    fi
done
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "--node-rank must be 0 to $((NNODES - 1)) for --nnodes $NNODES (got '$NODE_RANK')" >&2; exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "$MASTER_ADDR" ]; then
    echo "--nnodes $NNODES needs --master-addr HOST: node 0's address, reachable from every node" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ "$PLAN" = 0 ] && [[ -n "$FROM" || "$FORCE" = 1 ]]; then
    # the other nodes would see node 0's old markers before node 0 removes them, and skip stages
    # that node 0 redoes (its torchrun would then wait for them forever)
    echo "--from/--force redo stages of a run, which one node must do alone: redo them with" \
         "--nnodes 1 (or start a new --run), then resume on every node" >&2
    exit 2
fi
if ! [[ "$PRICE" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "--gpu-hourly-price must be a number of dollars, e.g. 23.92 (got '$PRICE')" >&2; exit 2
fi
if [ "$REHEARSAL" = 1 ] && [ "$PROFILE" != gpu ]; then
    echo "--cpu-rehearsal rehearses the gpu profile: add --profile gpu" >&2; exit 2
fi
# --from a stage that this profile never runs would redo nothing: refuse it, naming the ones it has
# (checked here for an explicit profile, and again once --profile auto has chosen one)
check_from_stage() {
    if [ "$PROFILE" != gpu ] && [[ "$FROM" == data || "$FROM" == base_eval ]]; then
        echo "--from $FROM: the $PROFILE profile has no $FROM stage (it pretrains on the offline" \
             "synthetic corpus; data and base_eval are the gpu profile's). Its stages: tokenizer" \
             "tok_eval base base_loss mid sft rl eval" >&2
        exit 2
    fi
}
[ "$PROFILE" != auto ] && check_from_stage

# A GPU node whose driver is older than the locked torch's CUDA needs: say so now, before `uv sync`
# spends minutes of a billed node downloading ~3 GB of CUDA wheels it could not use. (With
# --no-sync the torch at hand may be another build: the check after set-up covers that case.)
if [ "$NO_SYNC" = 0 ] && [ "$REHEARSAL" = 0 ] && [[ "$PROFILE" == auto || "$PROFILE" == gpu ]] \
        && command -v python3 >/dev/null 2>&1; then
    python3 -m nanochat.driver_check || { echo "Or run on the CPU: --profile cpu." >&2; exit 2; }
fi

# --- set-up: uv builds .venv (torch, tiktoken, wandb, ...) and compiles the rustbpe crate ----------
if [ "$NO_SYNC" = 1 ]; then
    # the environment as it is: NANOCHAT_PYTHON, else .venv, else python3 (e.g. a machine without uv)
    PY=${NANOCHAT_PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    echo "[setup] --no-sync: using $PY as it is"
else
    source scripts/install_uv.sh
    if ! command -v cargo >/dev/null 2>&1 && ! .venv/bin/python -c "import rustbpe" >/dev/null 2>&1; then
        # maturin (>= 1.8.4) then installs a Rust toolchain by itself; uv's output says little meanwhile
        echo "[setup] no Rust toolchain on PATH: building rustbpe first fetches one into" \
             "~/.cache/puccinialin (about 670 MB, a few minutes, once)"
    fi
    uv sync
    PY=".venv/bin/python"
fi

# .env with python-dotenv's reading of it (as launch_lambda.py does); variables already set win.
if [ -f .env ]; then
    eval "$("$PY" -m nanochat.envfile .env)"
fi

if [ "$NNODES" -gt 1 ] && [ -z "${NANOCHAT_BASE_DIR:-}" ]; then
    # Each node would download, tokenize and checkpoint into its own ~/.cache/nanochat: the shards of
    # the sharded optimizer would be scattered over the nodes and no node could resume the run.
    echo "--nnodes $NNODES needs NANOCHAT_BASE_DIR set to a directory every node shares (the same" \
         "network filesystem, e.g. a Lambda filesystem under /lambda/nfs; see docs/nodes.md):" \
         "the default ~/.cache/nanochat is each node's own disk" >&2
    exit 2
fi
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
RUN=${RUN:-${NANOCHAT_RUN:-aquarat_small}}
export NANOCHAT_RUN="$RUN"
RUN_DIR="$NANOCHAT_BASE_DIR/runs/$RUN"
mkdir -p "$RUN_DIR"
# Node 0 keeps the run's files; node R > 0 its own log and lock beside them
NODE_SUFFIX=$([ "$NODE_RANK" -gt 0 ] && echo "_node$NODE_RANK" || true)
# The run's own tokenizer: another run (another profile's vocabulary) cannot replace it under this run's
# checkpoints, which record it and refuse any other.
export NANOCHAT_TOKENIZER_DIR="${NANOCHAT_TOKENIZER_DIR:-$RUN_DIR/tokenizer}"
LOG="$RUN_DIR/pipeline$NODE_SUFFIX.log"

# One pipeline per run (and node) at a time: a second one would train into the same checkpoints and
# markers. flock on an fd this shell holds open, taken through Python (macOS has no flock command):
# the lock lives as long as this shell or a stage it started, and vanishes with them, even on
# SIGKILL. On a network filesystem the server keeps a lock of a machine that vanished until that
# machine's lease runs out, or longer: so the owner records its instance id, and a resume on a new
# instance (launch_lambda.py resume, after the Lambda API reported the old one terminated) sets
# that lock aside (NANOCHAT_LOCK_TAKEOVER). A lock of an instance still running is never taken.
LOCK="$RUN_DIR/.lock$NODE_SUFFIX" OWNER_FILE="$RUN_DIR/.lock_owner$NODE_SUFFIX"
take_lock() {
    exec 9>>"$LOCK"
    "$PY" -c "import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)" 2>/dev/null
}
if ! take_lock; then
    owner=$(cat "$OWNER_FILE" 2>/dev/null || echo "owner unknown")
    gone=${NANOCHAT_LOCK_TAKEOVER:-}
    if [ -n "$gone" ] && [[ "$owner" == *" instance $gone "* ]]; then
        exec 9>&-
        # the old holder keeps its lock on the file it opened, now under another name
        mv "$LOCK" "$LOCK.stale-$gone"
        if ! take_lock; then
            echo "run '$RUN': could not take its lock even after setting aside $gone's" >&2; exit 2
        fi
        echo "[pipeline] took over the lock of run '$RUN' from: $owner (the Lambda API reports" \
             "instance $gone terminated)" | tee -a "$LOG"
    else
        echo "run '$RUN' is in use by another pipeline ($owner): wait for it to finish, or stop it" \
            "(Ctrl-C or kill PID; it resumes later). A separate run needs another --run NAME." >&2
        exit 2
    fi
fi
echo "pid $$ on $(hostname) instance ${NANOCHAT_INSTANCE_ID:-none} since $(date -u +%FT%TZ)" \
    > "$OWNER_FILE"

# Ctrl-C or SIGTERM (kill, a preemption notice) while a stage runs: the stage is stopped (checkpoints
# are written atomically, so its last complete one survives), one line says where the run stopped,
# and the same command goes on from there.
# the marker names, in the order they run
ALL_STAGES="data tokenizer tok_eval base base_loss base_eval mid eval_mid sft eval_sft rl eval_rl"
CURRENT="" STAGE_PID=""
stopped() {
    trap '' INT TERM  # a second Ctrl-C must not cut this short
    if [ -n "$STAGE_PID" ]; then
        local kids
        # a stage that is a shell function runs its commands as children: stop those too
        kids=$(pgrep -P "$STAGE_PID" 2>/dev/null ||
               awk -v p="$STAGE_PID" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null || true)
        kill -TERM "$STAGE_PID" $kids 2>/dev/null || true  # $kids unquoted: one word per process
        wait "$STAGE_PID" 2>/dev/null || true
    fi
    local where="between stages" next="" done_list="" s newest
    for s in $ALL_STAGES; do [ -f "$RUN_DIR/.done_$s" ] && done_list+=" $s"; done
    if [ -n "$CURRENT" ]; then
        where="during stage $CURRENT"
        # || true: a stage without checkpoints (ls exits 2) must not end the trap under pipefail
        newest=$(ls -d "$NANOCHAT_BASE_DIR/checkpoints/$CURRENT/$RUN"/step_*/meta.json 2>/dev/null |
                 tail -n 1 | sed -E 's|.*/step_0*([0-9]+)/meta.json|\1|' || true)
        if [ -n "$newest" ]; then
            where+=" (newest checkpoint: step $newest)"
            next=", $CURRENT resumes from step $newest"
        else
            next=", $CURRENT starts again"
        fi
    fi
    echo "[pipeline] stopped by $1 $where. Done:${done_list:- nothing yet}. The same command goes on:" \
         "done stages are skipped$next." | tee -a "$LOG" >&2
    exit "$2"
}
trap 'stopped SIGINT 130' INT
trap 'stopped SIGTERM 143' TERM

# The GPUs torch can use; the cpu and smoke profiles and a --cpu-rehearsal never use one, so they
# skip the question (a torch import: seconds on a laptop).
if [[ "$PROFILE" == cpu || "$PROFILE" == smoke || "$REHEARSAL" == 1 ]]; then
    NGPU=0
else
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
# GPUs that torch cannot use (typically a driver older than the CUDA torch was built for): stop, rather
# than run the CPU profile for hours on a billed GPU node. nvidia-smi's output is read whole before it
# is searched: `nvidia-smi | grep -q` or `| head` may close the pipe while nvidia-smi still writes,
# and under pipefail its SIGPIPE would make the test false, or end the script with exit 141 silently.
SMI_GPUS=$( (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null) || true)
if [ "$NGPU" -eq 0 ] && [ "$REHEARSAL" = 0 ] && [[ "$PROFILE" == auto || "$PROFILE" == gpu ]] \
        && [[ $'\n'"$SMI_GPUS" == *$'\n'"GPU "* ]]; then
    DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null || true)
    DRIVER=${DRIVER%%$'\n'*}
    "$PY" - "${DRIVER:-unknown}" >&2 <<'PYEOF'
import sys, torch
driver, cuda = sys.argv[1], torch.version.cuda or "none (a CPU-only build)"
major = cuda.split(".")[0]
need = {"13": "580", "12": "525", "11": "450"}.get(major, "a matching")
print(f"nvidia-smi sees GPUs (driver {driver}), but torch {torch.__version__} cannot use them: it is built "
      f"for CUDA {cuda}, which needs NVIDIA driver >= {need}.\n"
      f"Update the driver, or install the torch build for this node's CUDA (https://download.pytorch.org/whl/,"
      f" e.g. uv pip install --reinstall torch --index-url https://download.pytorch.org/whl/cu126)"
      f" and run again with --no-sync so uv keeps it.\n"
      f"Also check CUDA_VISIBLE_DEVICES. --profile cpu runs on the CPU instead.")
PYEOF
    exit 2
fi
if [ "$PROFILE" = auto ]; then
    if [ "$NGPU" -gt 0 ]; then
        PROFILE=gpu
        # A laptop or workstation with an NVIDIA card gets the node's pipeline: say what that
        # means before any download, and how to get the laptop demo instead.
        echo "[pipeline] --profile auto: torch sees $NGPU CUDA GPU(s), so this is the gpu profile:" \
             "it downloads FineWeb-Edu shards (about 100 MB each, dozens of them) and pretrains a" \
             "depth-$DEPTH model, which takes hours on one GPU. For the laptop demo (tiny model," \
             "synthetic data, ~20 min), stop now (Ctrl-C) and run: bash run_aquarat_small.sh" \
             "--profile cpu" >&2
        if [ -t 0 ]; then
            echo "[pipeline] starting the gpu profile in 15 s ..." >&2
            sleep 15
        fi
    else
        PROFILE=cpu
    fi
    check_from_stage
fi
if [ "$PROFILE" = gpu ] && [ "$NGPU" -eq 0 ] && [ "$REHEARSAL" = 0 ]; then
    echo "--profile gpu asked for, but torch sees no CUDA GPU (and nvidia-smi lists none):" \
         "use --profile cpu" >&2
    exit 2
fi
if [ "$REHEARSAL" = 1 ]; then
    NGPU=0  # the stages see no GPU either: CPU, fp32, gloo
    export CUDA_VISIBLE_DEVICES=""
    NPROC=${NPROC:-2}
fi
NPROC=${NPROC:-$([ "$PROFILE" = gpu ] && echo "$NGPU" || echo 1)}
if [ "$PLAN" = 1 ]; then
    # the plan is the gpu profile's: for this machine's GPUs (--nproc), else for an 8-GPU node
    plan_gpus=$([ "$PROFILE" = gpu ] && echo "$NPROC" || echo 8)
    plan_args=(--depth "$DEPTH" --gpus "$plan_gpus" --max-seq-len "$SEQ_LEN" --hourly-price "$PRICE")
    [ -n "$SHARDS" ] && plan_args+=(--shards "$SHARDS")
    "$PY" -m scripts.plan_run "${plan_args[@]}"
    exit 0
fi
DEVICE=$([ "$NGPU" -gt 0 ] && [ "$PROFILE" = gpu ] && echo cuda || echo cpu)
# CPU threads per process: the cores shared among the processes (torchrun's own default is 1 thread)
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
if [ "$NNODES" -gt 1 ]; then
    # static rendezvous at node 0: every node must start its part of a stage for any to begin
    LAUNCH=("$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK"
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --nproc_per_node="$NPROC" -m)
elif [ "$NPROC" -gt 1 ]; then
    LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m)
else
    LAUNCH=("$PY" -m)
fi

echo "[pipeline] profile=$PROFILE run=$RUN processes=$NPROC threads/process=$OMP_NUM_THREADS" \
     "device=$DEVICE base=$NANOCHAT_BASE_DIR (log: $LOG)" | tee -a "$LOG"
[ "$NNODES" -gt 1 ] && echo "[pipeline] node $NODE_RANK of $NNODES (torchrun at" \
    "$MASTER_ADDR:$MASTER_PORT): $((NPROC * NNODES)) processes in all" | tee -a "$LOG"
[ "$REHEARSAL" = 1 ] && echo "[pipeline] --cpu-rehearsal: the gpu profile's stages, on CPU" | tee -a "$LOG"

# The gpu profile's shard count, when not given: enough text for base_train's default budget (20
# tokens per parameter), at an estimated 250M characters per shard and 4.8 characters per token
# (upstream nanochat's figures for FineWeb-Edu and a 65k vocabulary), divided by the share of the
# tokenised text pretraining's packing trains on (dataloader.KEPT_FRACTION, measured by
# scripts/bench_dataloader.py), plus one shard of margin and the val shard (dataset.shards_needed).
# base_train logs what the run did: train/kept_frac and train/data_passes (and says if text repeated).
if [ "$PROFILE" = gpu ] && [ -z "$SHARDS" ]; then
    SHARDS=$("$PY" -c "
import torch
from nanochat.dataloader import KEPT_FRACTION, PRETRAINING_PACKING
from nanochat.dataset import shards_needed
from nanochat.gpt import GPT, config_from_depth
with torch.device('meta'):
    params = GPT(config_from_depth($DEPTH, 65536, sequence_len=2048)).num_budget_params()
print(shards_needed(20 * params, KEPT_FRACTION[PRETRAINING_PACKING]))")
    echo "[pipeline] --shards: $SHARDS FineWeb-Edu shards for depth $DEPTH (an estimate; see --help)" \
        | tee -a "$LOG"
fi

# The gpu profile's micro-batch for this card's memory, before any download: scripts.plan_memory runs
# the real model and optimizers on fake tensors and takes the largest divisor of --device-batch-size
# whose base step (optimizer state included) fits in 90% of the smallest GPU's memory less 1 GiB (the
# CUDA context, NCCL and fragmentation it cannot see). The total batch is unchanged (more gradient
# accumulation); base_train's own probe still halves it on a real out-of-memory. If the planner
# cannot say, --device-batch-size stays as given. The run's settings keep the requested figure.
REQUESTED_BATCH=$DEVICE_BATCH
if [ "$PROFILE" = gpu ]; then
    # the smallest card's memory; no `| head`, whose early close could SIGPIPE the writer
    GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null |
              sort -n || true)
    GPU_MIB=${GPU_MIB%%$'\n'*}
    PLANNED=""
    if [[ "$GPU_MIB" =~ ^[0-9]+$ ]]; then
        FIT_GIB=$(awk -v m="$GPU_MIB" 'BEGIN { printf "%.1f", m / 1024 * 0.9 - 1 }')  # usable_gib
        PLANNED=$("$PY" -m scripts.plan_memory --depth "$DEPTH" --max-seq-len "$SEQ_LEN" \
                  --device-batch-size "$DEVICE_BATCH" --gpus "$NPROC" --fit-gib "$FIT_GIB" \
                  --print-batch 2>>"$LOG") || PLANNED=""
    fi
    if [[ "$PLANNED" =~ ^[1-9][0-9]*$ ]]; then
        echo "[pipeline] memory plan: --device-batch-size $PLANNED of $DEVICE_BATCH fits" \
             "$FIT_GIB GiB per GPU at depth $DEPTH (uv run python -m scripts.plan_memory)" | tee -a "$LOG"
        DEVICE_BATCH=$PLANNED
    else
        echo "[pipeline] warning: no memory plan (GPU memory '${GPU_MIB:-unknown}' MiB; the" \
             "planner's messages are in $LOG): --device-batch-size $DEVICE_BATCH as given, and" \
             "base_train halves it if a step runs out of memory" | tee -a "$LOG" >&2
    fi
fi

# A run is one set of settings: re-running it with other ones would skip the stages already done
# with the old settings and mix the two. Refused, unless --force / --from say which stages to redo.
SETTINGS="profile=$PROFILE seed=$SEED"
[ "$PROFILE" = gpu ] && SETTINGS+=" depth=$DEPTH shards=$SHARDS aqua-data-dir=${AQUA_DIR:-hf}" \
    && SETTINGS+=" device-batch-size=$REQUESTED_BATCH max-seq-len=$SEQ_LEN"
for name in $(printf '%s\n' "${!STAGE_ARGS[@]}" | sort); do
    SETTINGS+=" $name=[$(echo ${STAGE_ARGS[$name]})]"
done
# Flags that change no result (cadence, --keep-last, logging) may change on a resume, and so may the
# --stage-args of a stage that has not finished (it checks its own resume): see check_run_settings.
if [ -f "$RUN_DIR/settings" ] && [ "$(cat "$RUN_DIR/settings")" != "$SETTINGS" ] \
        && [ "$FORCE" = 0 ] && [ -z "$FROM" ]; then
    "$PY" -m scripts.check_run_settings "$RUN_DIR" "$(cat "$RUN_DIR/settings")" "$SETTINGS" || exit 2
fi
# the run's files (settings, stage times, report) are node 0's to write
[ "$NODE_RANK" = 0 ] && echo "$SETTINGS" > "$RUN_DIR/settings"

# W&B: find out once, in seconds, whether its server answers; if not, every stage runs offline
# (instead of each waiting ~100 s in wandb.init) and the line printed says how to sync later.
[ "$NO_WANDB" = 1 ] && export WANDB_MODE=disabled
WANDB_CHECK=$("$PY" -m nanochat.tracking --check-wandb "$RUN_DIR") || true
if [ -n "$WANDB_CHECK" ]; then
    export WANDB_MODE=offline
    echo "[pipeline] $WANDB_CHECK" | tee -a "$LOG"
fi

# A stage runs unless its marker says it finished; --from/--force redo it. Output is tee'd to the log.
REDO=$FORCE
stage() {
    local name=$1; shift
    if [ "$name" = "$FROM" ]; then REDO=1; fi
    # the evaluations run right after their stages, so --from eval means those three only
    local redo=$REDO
    if [ "$FROM" = eval ]; then
        redo=$FORCE
        if [[ "$name" == eval_* ]]; then redo=1; fi
    fi
    local marker="$RUN_DIR/.done_$name"
    if [ -f "$marker" ] && [ "$redo" = 0 ]; then
        echo "[pipeline] $name: done earlier, skipping ($marker)" | tee -a "$LOG"
        return 0
    fi
    if [ "$NODE_RANK" -gt 0 ] && [[ " $* " != *" torch.distributed.run "* ]]; then
        wait_for_node0 "$name" "$marker"
        return 0
    fi
    rm -f "$marker"
    # A training stage being redone starts over (--fresh); otherwise it resumes its last checkpoint.
    local extra=()
    if [ "$redo" = 1 ] && [[ " base mid sft rl " == *" $name "* ]]; then extra=(--fresh); fi
    # --stage-args: split on spaces, after the profile's flags (argparse keeps the last value)
    local more="${STAGE_ARGS[$name]:-}"
    [[ "$name" == eval_* ]] && more="${STAGE_ARGS[eval]:-} $more"
    local words=()
    read -r -a words <<< "$more"
    extra+=("${words[@]}")
    echo "[pipeline] $name: $(date -u +%FT%TZ)" | tee -a "$LOG"
    local t0=$SECONDS procs=1 out tee_pid rc=0
    [[ " $* " == *" torch.distributed.run "* ]] && procs=$((NPROC * NNODES))
    # In the background, so that `wait` (unlike a foreground command) returns at once when a signal
    # arrives; a background command ignores the terminal's Ctrl-C, and so does tee -i: the trap above
    # decides what stops, and every line the stage printed reaches the log.
    exec {out}> >(tee -ai "$LOG")
    tee_pid=$!
    CURRENT=$name
    "$@" "${extra[@]}" >&"$out" 2>&1 &
    STAGE_PID=$!
    wait "$STAGE_PID" || rc=$?
    STAGE_PID="" CURRENT=""
    exec {out}>&-
    wait "$tee_pid" 2>/dev/null || true
    if [ "$rc" -ne 0 ] && [ "$NNODES" -gt 1 ] && [ "$procs" -gt 1 ]; then
        # a stage spread over nodes stops everywhere when one node's processes stop: say where
        # to look, once, instead of leaving each node's torchrun traceback to be decoded
        echo "[pipeline] stage $name stopped on node $NODE_RANK of $NNODES (exit $rc): this node or" \
             "another one failed or was stopped; the first error is in the log of the node where it" \
             "began ($NANOCHAT_BASE_DIR/runs/$RUN/pipeline*.log). Run the same commands on every" \
             "node: done stages are skipped, $name resumes from its last checkpoint." \
             | tee -a "$LOG" >&2
        exit "$rc"
    elif [ "$rc" -ne 0 ]; then
        echo "[pipeline] stage $name failed (exit $rc): its message is above. Fix that, then run the" \
             "same command: done stages are skipped." | tee -a "$LOG" >&2
        exit "$rc"
    fi
    # wall time, processes and device of the stage, for the report's time and cost table
    [ "$NODE_RANK" = 0 ] && printf \
        '{"stage": "%s", "seconds": %d, "processes": %d, "device": "%s", "finished": "%s"}\n' \
        "$name" $((SECONDS - t0)) "$procs" "$DEVICE" "$(date -u +%FT%TZ)" >> "$RUN_DIR/stages.jsonl"
    touch "$marker"
}

# Node R > 0 leaves a single-process stage to node 0 and waits for its marker on the shared base
# dir, so the data is downloaded and the tokenizer trained once. A marker that never comes means
# node 0 failed, or that this base dir is not the one node 0 writes to.
wait_for_node0() {
    local name=$1 marker=$2 waited=0 limit=${NANOCHAT_NODE_WAIT_S:-7200}
    echo "[pipeline] $name: node 0's to run; waiting for $marker" | tee -a "$LOG"
    while [ ! -f "$marker" ]; do
        if [ "$waited" -ge "$limit" ]; then
            echo "[pipeline] node $NODE_RANK waited ${limit}s for node 0 to finish $name, in vain:" \
                 "is node 0 running (its log: $RUN_DIR/pipeline.log), and is $NANOCHAT_BASE_DIR the" \
                 "same shared filesystem on every node? Then run the same command again." \
                 | tee -a "$LOG" >&2
            exit 2
        fi
        sleep 1 & wait $!  # in the background, so that a Ctrl-C is handled at once
        waited=$((waited + 1))
    done
}

# A stage this profile leaves out, and why: the report says so instead of silently lacking it.
not_run() {
    [ "$NODE_RANK" = 0 ] || return 0
    printf '{"stage": "%s", "not_run": "%s"}\n' "$1" "$2" >> "$RUN_DIR/stages.jsonl"
}

# The gpu profile's downloads, all of them before any training, so that a network problem costs
# minutes, not a pretraining run. What training needs (FineWeb-Edu, AQuA-RAT) stops the run here; the
# CORE bundle is optional: without it base_eval is left out, and the report says so.
# base_eval's own bundle (--stage-args "base_eval=--bundle-dir DIR"): nothing to download, always run
own_core_bundle() { [[ "${STAGE_ARGS[base_eval]:-}" == *--bundle-dir* ]]; }
fetch_data() {  # "$@": --stage-args for data, the shard downloader's flags
    "$PY" -m nanochat.dataset -n "$SHARDS" "$@" || return
    if [ -z "$AQUA_DIR" ]; then "$PY" -m scripts.prepare_aqua || return; fi
    local core_args=()
    read -r -a core_args <<< "${STAGE_ARGS[base_eval]:-}"  # e.g. --bundle-url
    if ! own_core_bundle && ! "$PY" -m scripts.base_eval --download-only "${core_args[@]}"; then
        echo "[pipeline] the CORE eval bundle could not be downloaded: base_eval will be left out" \
             "(the run goes on)"
        not_run base_eval "the CORE eval bundle could not be downloaded (pipeline.log says why)"
    fi
}

if [ "$PROFILE" = smoke ]; then
    # The plumbing of every stage in a couple of minutes on any machine; the numbers mean nothing.
    TOK=(--source synthetic --vocab-size 512 --max-chars 200000)
    BASE=(--depth 2 --aspect-ratio 32 --head-dim 32 --max-seq-len 128 --source synthetic
          --device-batch-size 4 --total-batch-size 512 --num-iterations 10
          --eval-every 5 --eval-tokens 1024 --sample-every -1 --save-every 5)
    BASE_LOSS=(--source synthetic --device-batch-size 4 --split-tokens 2048 --sample-tokens 8)
    MID=(--aqua-source synthetic --synthetic-examples 64 --synthetic-val-examples 16
         --max-seq-len 128 --device-batch-size 4 --total-batch-size 4 --num-iterations 6
         --eval-every 3 --save-every 3)
    SFT=(--aqua-source synthetic --synthetic-examples 64 --synthetic-val-examples 16
         --max-seq-len 128 --device-batch-size 4 --total-batch-size 4 --num-iterations 6
         --eval-every 3 --save-every 3)
    RL=(--aqua-source synthetic --train-examples 32 --eval-problems 8 --examples-per-step 2
        --num-samples 2 --max-new-tokens 16 --num-steps 2 --eval-every 0 --eval-samples 2
        --attn-every 1 --attn-heatmap-every 2 --save-every 1)
    EVAL=(-a SYNTH --synthetic-difficulty easy --split test --max-problems 8 --max-tokens 16)
elif [ "$PROFILE" = cpu ]; then
    # Tiny everything: the offline synthetic AQuA set is the data and the oracle (learnable in minutes).
    # 3-digit chunks: the synthetic corpus then holds its numbers (< 1000) as single tokens (~1700 ids).
    TOK=(--source synthetic --vocab-size 2048 --max-digits 3 --max-chars 2000000)
    # 2 heads of 64: the shape of the runs measured in docs/performance.md and docs/experiments.md.
    # No value embeddings here: with them pretraining reaches a lower loss, but mid-training and
    # SFT score lower on the synthetic test problems (two seeds, docs/experiments.md; issue 16).
    BASE=(--value-embed-every 0 --depth 4 --aspect-ratio 32 --head-dim 64 --max-seq-len 256
          --source synthetic --device-batch-size 16 --total-batch-size 4096 --num-iterations 300
          --eval-every 100 --sample-every 150 --save-every 100)
    BASE_LOSS=(--source synthetic --device-batch-size 16 --split-tokens 131072)
    # Mid-training and SFT are easy synthetic problems; their rationales end by checking the options in
    # order ("B) 12 yes"), which a tiny model learns in a few hundred steps (docs/experiments.md, "The
    # answer format"). Mid-training: 32,000 problems = 1,000 steps; SFT: 500 steps over 8,000 of them.
    MID=(--aqua-source synthetic --synthetic-examples 32000 --synthetic-difficulty easy
         --max-seq-len 256 --device-batch-size 32 --total-batch-size 32 --init-lr-frac 0.3
         --eval-every 250 --save-every 250)
    SFT=(--aqua-source synthetic --synthetic-examples 8000 --synthetic-difficulty easy
         --max-seq-len 256 --device-batch-size 16 --total-batch-size 16 --init-lr-frac 0.3
         --warmdown-ratio 0.3
         --eval-every 250 --save-every 250)
    # RL: the measured setting of docs/rl.md ("What RL does to the CPU profile's model"): 240 steps of 32
    # questions x 8 samples on fresh synthetic train problems, ~6 min on 2 cores
    # (docs/experiments.md, "The profile end to end").
    RL=(--aqua-source synthetic --synthetic-difficulty easy --examples-per-step 32 --num-samples 8
        --max-new-tokens 128 --num-steps 240 --init-lr-frac 0.05 --eval-every 80 --eval-problems 200
        --eval-samples 1 --save-every 40)
    EVAL=(-a SYNTH --synthetic-difficulty easy --split test --max-problems 400 --synthetic-examples 400
          --max-tokens 128)
else
    TOK=(--source fineweb --vocab-size 65536 --max-chars 2000000000)
    # base_train halves --device-batch-size by itself when a step does not fit in GPU memory
    BASE=(--depth "$DEPTH" --source fineweb --device-batch-size "$DEVICE_BATCH" --max-seq-len "$SEQ_LEN")
    BASE_LOSS=(--source fineweb --device-batch-size "$DEVICE_BATCH" --max-seq-len "$SEQ_LEN")
    # AQuA-RAT is fetched from Hugging Face by the data stage (unless --aqua-data-dir): every later
    # stage reads those validated files, offline.
    AQUA_FILES=${AQUA_DIR:-$NANOCHAT_BASE_DIR/data/aqua_rat}
    AQUA=(--aqua-source dir --aqua-data-dir "$AQUA_FILES")
    MID=("${AQUA[@]}" --aqua-train-examples 20000 --aqua-val-examples 254 --synthetic-examples 20000 --mix-synthetic)
    SFT=("${AQUA[@]}" --aqua-train-examples 20000 --aqua-val-examples 254)
    MID+=(--max-seq-len "$SEQ_LEN")
    SFT+=(--max-seq-len "$SEQ_LEN")
    # AQuA-RAT train questions, rl/acc on dev; rationales run long, so 512 new tokens (the truncation
    # rate is logged and warned about; the final test evaluation is the eval stages below).
    RL=("${AQUA[@]}" --examples-per-step 32 --num-samples 8 --max-new-tokens 512 --num-steps 300
        --eval-every 50 --eval-problems 254 --eval-samples 4 --save-every 50)
    EVAL=(-a AQUA,SYNTH --split test --num-samples 4 --temperature 0.7 --max-tokens 512)
    EVAL+=(--aqua-data-dir "$AQUA_FILES")
    stage data fetch_data
fi
if [ "$PROFILE" != gpu ]; then
    not_run data "the $PROFILE profile pretrains on the offline synthetic corpus"
    not_run base_eval "CORE needs the downloaded eval bundle and a FineWeb-Edu model: gpu profile only"
fi

# Every checkpoint of this run is tagged with its name: another run in the same base dir has its own.
TAG=(--tag "$RUN")
FROM_RUN=(--source-tag "$RUN" --tag "$RUN")
stage tokenizer "$PY" -m scripts.tok_train "${TOK[@]}"
stage tok_eval "$PY" -m scripts.tok_eval
stage base "${LAUNCH[@]}" scripts.base_train "${BASE[@]}" --seed "$SEED" "${TAG[@]}"
stage base_loss "${LAUNCH[@]}" scripts.base_loss "${BASE_LOSS[@]}" "${TAG[@]}"
if [ "$PROFILE" = gpu ]; then
    if [ -f "$NANOCHAT_BASE_DIR/eval_bundle/core.yaml" ] || own_core_bundle; then
        stage base_eval "${LAUNCH[@]}" scripts.base_eval --max-per-task 500 "${TAG[@]}"
    else
        echo "[pipeline] base_eval: left out, no CORE eval bundle in $NANOCHAT_BASE_DIR/eval_bundle" \
            | tee -a "$LOG"
    fi
fi
# Each chat checkpoint is evaluated right after its stage, so that a later stage that fails still
# leaves the earlier accuracies in the report; all three see the same problems with the same
# decoding, and the report's accuracy table puts them side by side.
evaluate() {
    stage "eval_$1" "${LAUNCH[@]}" scripts.chat_eval -i "$1" --model-tag "$RUN" "${EVAL[@]}"
}
stage mid "${LAUNCH[@]}" scripts.mid_train "${MID[@]}" --seed "$SEED" "${FROM_RUN[@]}"
evaluate mid
stage sft "${LAUNCH[@]}" scripts.chat_sft "${SFT[@]}" --seed "$SEED" "${FROM_RUN[@]}"
evaluate sft
stage rl "${LAUNCH[@]}" scripts.chat_rl "${RL[@]}" --seed "$SEED" "${FROM_RUN[@]}"
evaluate rl
# The report is rebuilt every time, from whatever the stages have written so far (by node 0).
if [ "$NODE_RANK" -gt 0 ]; then
    echo "[pipeline] node $NODE_RANK finished its part; node 0 writes the report" | tee -a "$LOG"
    exit 0
fi
"$PY" -m scripts.report --run "$RUN" --hourly-price "$PRICE" 2>&1 | tee -a "$LOG"

echo "[pipeline] finished. Report: $NANOCHAT_BASE_DIR/report/$RUN/report.md" | tee -a "$LOG"
if [ -n "${UV_PATH_NOTE:-}" ]; then echo "[pipeline] note: $UV_PATH_NOTE" | tee -a "$LOG"; fi
exit 0
}
