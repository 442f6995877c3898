#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent GPU machine (about 8 minutes on one H200):
#
#   bash scripts/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --dry-run   # on a CPU: the same steps at toy sizes (~3 minutes)
#   bash scripts/gpu_check.sh OUT_DIR --only tests,train   # rerun some steps; --help lists them
#
#   1. versions, the GPU                                                    -> OUT/versions.txt
#   2. the tests marked `device` (model, training, eval, export) on CUDA   -> OUT/tests.log
#      (LLAVA_TEST_DEVICE=cuda; CPU stays the default everywhere else)
#   3. scripts/benchmark.py --arch course and --arch align, bf16, SDPA, --sweep
#                                                                           -> OUT/bench_course.json, bench_align.json
#   3b. the same for stages 2 and 3 (--tune_llm full / lora, 512 text tokens)
#                                                                           -> OUT/bench_stage2_full.json, bench_stage3_lora.json
#   3c. one course stage-2 step's memory per GPU without sharding, with fsdp-full-shard (torchrun, 1 process)
#       and with --fsdp_offload too                                      -> OUT/bench_fsdp_{none,shard,offload}.json
#   4. 100 steps of the course preset at real size through the ordinary train_stage1.py path: random
#      weights built from configs/ (scripts/random_models.py), bf16 frozen weights, --pack, the feature
#      cache (scripts/cache_features.py)                                    -> OUT/train_summary.json, train.log
#   5. stage 2 on step 4's checkpoint under torchrun --nproc-per-node 1 --train_strategy fsdp-full-shard: FSDP2's
#      fully_shard, DCP checkpoints and the gathered llm/ on a GPU       -> OUT/fsdp_summary.json, fsdp.log
#   Everything printed also goes to OUT/gpu_check.log; models and data go to $WORK (default /tmp/gpu_check).
#
# Packages. The lent machine's image has torch 2.11 and transformers 5.17; both are supported: the
# project asks for transformers >= 5.17, and the whole test suite passes on transformers 5.17.0 with
# huggingface_hub 1.33 (checked on a CPU). The image lacks tensorboardX (and the optional modelscope),
# so this script installs every wheel found in .whl/ first. Prepare them here, once, and carry .whl:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl tensorboardX==2.6.5      # pure Python: any platform
# and on the device:  run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"])
set -uo pipefail
STEPS_ALL="versions tests bench bench_tune bench_fsdp models cache train fsdp"
usage() {
    cat <<USAGE
usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run] [--only STEP[,STEP...]]

  OUT_DIR      where the figures and logs go (created)
  --dry-run    the same steps on a CPU at toy sizes (~3 minutes); without it a CUDA GPU is required
  --only LIST  run only these steps, comma-separated, in their usual order: $STEPS_ALL
               (train needs models and cache, fsdp needs train, from this run or an earlier one with the same WORK)
  -h, --help   this text
Environment: WORK (models and data, default /tmp/gpu_check), PYTHON (default python3).
USAGE
}
OUT="" DRY="" ONLY=$STEPS_ALL
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=--dry-run ;;
        --only) [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs a list of steps" >&2; exit 2; }
                ONLY=${2//,/ }; shift
                for s in $ONLY; do
                    case " $STEPS_ALL " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: $STEPS_ALL)" >&2; exit 2 ;; esac
                done ;;
        -*) echo "gpu_check.sh: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu_check.sh: one OUT_DIR only (got '$OUT' and '$1')" >&2; exit 2; }
           OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gpu_check}
PY=${PYTHON:-python3}
# No GPU and no --dry-run: say so before anything is built or written (the real sizes would
# spend minutes building gigabytes of random models under WORK, then fail on the device tests).
if [ -z "$DRY" ] && ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run it on the GPU machine," \
         "or add --dry-run for the CPU rehearsal at toy sizes" >&2
    exit 3
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if [ "$DRY" = "--dry-run" ]; then
    DEVICE=cpu; ARCHS="tiny tiny_align"; LIMIT=4; LAYERS=2; STEPS=4; BATCH=4; NTRAIN=64; BENCH_STEPS=1; TUNE_LEN=64
    FSDP_STEPS=4
else
    DEVICE=cuda; ARCHS="course align"; LIMIT=1024; LAYERS=0; STEPS=100; BATCH=16; NTRAIN=1024; BENCH_STEPS=5; TUNE_LEN=512
    FSDP_STEPS=20
fi
status=()
step() {  # step NAME SECONDS LOG CMD...: run with a time limit (its output also to LOG unless -),
          # record how it ended, go on either way
    local name=$1 limit=$2 log=$3; shift 3
    echo; echo "=== $name ($(date +%T), limit ${limit}s)"
    local t0=$SECONDS rc
    if [ "$log" = - ]; then timeout "$limit" "$@"; rc=$?
    else timeout "$limit" "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}; fi
    status+=("$name: exit $rc in $((SECONDS - t0))s")
}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

wanted versions && step versions 60 - $PY - <<EOF
import importlib, json, platform, torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
       "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if torch.cuda.is_available() else None}
for name in ("transformers", "tokenizers", "safetensors", "tensorboardX", "pyarrow", "PIL", "flash_attn"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:
        out[name] = f"missing ({type(e).__name__})"
print(json.dumps(out, indent=2))
open("$OUT/versions.txt", "w").write(json.dumps(out, indent=2) + "\n")
if "$DEVICE" == "cuda" and not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible")
EOF

# pytest.ini already passes -q: one more would be -qq, which drops the "N passed" line from tests.log.
wanted tests && step "tests on $DEVICE" 240 "$OUT/tests.log" env LLAVA_TEST_DEVICE=$DEVICE $PY -m pytest -m device

wanted bench && for arch in $ARCHS; do
    step "benchmark $arch" 150 - $PY scripts/benchmark.py --arch "$arch" --device "$DEVICE" --sweep --batch_size 16 \
        --sweep_limit $LIMIT --steps $BENCH_STEPS --warmup 2 --json "$OUT/bench_${arch}.json"
done

# Stages 2 and 3 at the course's settings (512 text tokens): full tuning (fp32 master weights, gradient
# checkpointing, batch 4) and LoRA (r 8 on q/k/v/o, batch 8): tokens/s and peak memory.
wanted bench_tune && step "benchmark ${ARCHS%% *} stage 2 (full)" 150 - $PY scripts/benchmark.py --arch "${ARCHS%% *}" --device "$DEVICE" \
    --tune_llm full --gradient_checkpointing --batch_size 4 --text_len $TUNE_LEN --answer_len $((TUNE_LEN / 2)) \
    --steps $BENCH_STEPS --warmup 2 --json "$OUT/bench_stage2_full.json"
wanted bench_tune && step "benchmark ${ARCHS%% *} stage 3 (lora)" 150 - $PY scripts/benchmark.py --arch "${ARCHS%% *}" --device "$DEVICE" \
    --tune_llm lora --batch_size 8 --text_len $TUNE_LEN --answer_len $((TUNE_LEN / 2)) \
    --steps $BENCH_STEPS --warmup 2 --json "$OUT/bench_stage3_lora.json"

# One course stage-2 step (full, gradient checkpointing, batch 4): what one GPU holds without sharding, under
# fsdp-full-shard on a one-process mesh (the same state plus FSDP's buffers), and with the shards offloaded.
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node 1"
FSDP_BENCH="--arch ${ARCHS%% *} --device $DEVICE --tune_llm full --gradient_checkpointing --batch_size 4 --text_len $TUNE_LEN
            --answer_len $((TUNE_LEN / 2)) --steps $BENCH_STEPS --warmup 2 --train_strategy fsdp-full-shard"
wanted bench_fsdp && step "benchmark stage 2, no sharding" 150 - $PY scripts/benchmark.py $FSDP_BENCH \
    --json "$OUT/bench_fsdp_none.json"
wanted bench_fsdp && step "benchmark stage 2, fsdp-full-shard" 150 - $TORCHRUN scripts/benchmark.py $FSDP_BENCH \
    --json "$OUT/bench_fsdp_shard.json"
wanted bench_fsdp && [ "$DEVICE" = cuda ] && step "benchmark stage 2, fsdp-full-shard + offload" 200 - $TORCHRUN \
    scripts/benchmark.py $FSDP_BENCH --fsdp_offload --json "$OUT/bench_fsdp_offload.json"

wanted models && rm -rf "$WORK/rand" && step "random real-size models" 120 - $PY scripts/random_models.py --preset clip-zh-qwen3-0.6b --out "$WORK/rand" \
    --layers $LAYERS --n_train $NTRAIN --n_eval 64
wanted cache && step "feature cache" 60 - $PY scripts/cache_features.py --vision_tower "$WORK/rand/vision" \
    --data_root "$WORK/rand/data/train" --eval_data_root "$WORK/rand/data/eval" --out "$WORK/rand/features" \
    --device "$DEVICE"
# Random weights cannot be aligned in 100 steps: an image_gap (or flat_loss) alarm here is expected and
# says nothing about the machine; this step measures speed and memory.
wanted train && rm -rf "$WORK/runs" "$WORK/ck" && step "train $STEPS steps (random weights: alarms expected)" 180 \
    "$OUT/train.log" $PY train_stage1.py --vision_tower "$WORK/rand/vision" --llm "$WORK/rand/llm" \
    --data_root "$WORK/rand/data/train" --eval_data_root "$WORK/rand/data/eval" --features_cache "$WORK/rand/features" \
    --pack --max_steps $STEPS --batch_size $BATCH --eval_interval $((STEPS / 2)) --eval_samples 64 --sample_replies 2 \
    --log_interval 10 --device "$DEVICE" --run_name gpu_check --runs_dir "$WORK/runs" --checkpoints_dir "$WORK/ck"
wanted train && cp "$WORK/runs/gpu_check/summary.json" "$OUT/train_summary.json" 2>/dev/null

# Stage 2 from that checkpoint, sharded by FSDP2 on one GPU: fully_shard, the DCP resume state, llm/ gathered.
wanted fsdp && rm -rf "$WORK/runs/fsdp" "$WORK/ck/fsdp" && step "stage 2 under fsdp-full-shard (torchrun, 1 process)" 240 \
    "$OUT/fsdp.log" $TORCHRUN train_stage2.py --stage1 "$WORK/ck/gpu_check" --data_format sa1b \
    --data_root "$WORK/rand/data/train" --eval_data_root "$WORK/rand/data/eval" --train_strategy fsdp-full-shard \
    --max_steps $FSDP_STEPS --batch_size 4 --eval_interval $((FSDP_STEPS / 2)) --eval_samples 32 --sample_replies 2 \
    --save_interval $((FSDP_STEPS / 2)) --device "$DEVICE" --run_name fsdp --runs_dir "$WORK/runs" --checkpoints_dir "$WORK/ck"
wanted fsdp && cp "$WORK/runs/fsdp/summary.json" "$OUT/fsdp_summary.json" 2>/dev/null

echo; echo "=== gpu_check done ($DEVICE)"
printf '  %s\n' "${status[@]}"
