#!/usr/bin/env bash
# The FP8 measurements of bench/README.md on one GPU machine, after `bash bench/gpu.sh setup`:
#
#   bash bench/fp8_gpu.sh speed OUT      seq 2048 x 8: reference, ours bf16, ours+fp8 (profiled;
#                                        output layer in FP8, then in bf16); seq 4096 x 4: reference and
#                                        ours+fp8 with the faster of the two output-layer choices
#   bash bench/fp8_gpu.sh block OUT      block diffusion (FlexAttention) seq 2048 x 8: ours bf16
#                                        and ours+fp8
#   bash bench/fp8_gpu.sh head OUT       bench/head_step.py (the head alone, eager and compiled);
#                                        then seq 2048 x 8, no profiler: the reference and ours
#                                        bf16 as it is, with model.compile_head, and with
#                                        model.sparse_output_recompute=false
#   bash bench/fp8_gpu.sh head-fp8 OUT   the same with ours+fp8, plus compile_head with the
#                                        output layer in FP8
#   bash bench/fp8_gpu.sh options OUT    seq 2048 x 8, no profiler, one call: the reference, then
#                                        ours bf16 and ours+fp8, each as it is and with
#                                        model.sparse_output_recompute=false, and in FP8 that
#                                        with model.compile_head or the output layer in FP8
#   bash bench/fp8_gpu.sh goals OUT      the issue's figures with the head options that paid:
#                                        seq 2048 x 8 reference, ours+fp8 with and without
#                                        model.compile_head, ours bf16 with it; seq 4096 x 4
#                                        reference and ours+fp8; block diffusion ours+fp8, bf16
#   bash bench/fp8_gpu.sh convergence DATA OUT [ARGS...]
#                                        experiments/fp8_convergence.py on shards DATA, both
#                                        trainings at once (--concurrent)
#
# JSON lines and logs go under OUT. TORCH_LOGS=recompiles makes the benchmark print any
# recompilation, which would land inside the timed steps.
set -euo pipefail
export PYTHONPATH="${SITE:-/tmp/site}:$PWD" TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export TORCH_LOGS=recompiles
BENCH=(python3 bench/train_step.py --config configs/llada-1b.yaml --warmup 12 --steps 20
    --set optim.master_weights=fused --set parallel.zero_stage=0)

case "${1:-}" in
speed)
    out=$2 && mkdir -p "$out"
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes reference,ours+compile --no-profile \
        --out "$out/speed.jsonl" >"$out/speed-2048.log" 2>&1
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+fp8 \
        --out "$out/speed.jsonl" >>"$out/speed-2048.log" 2>&1
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+fp8 --no-profile --label head-bf16 \
        --set model.fp8_output_layer=false --out "$out/speed.jsonl" >>"$out/speed-2048.log" 2>&1
    head=$(python3 - "$out/speed.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
speed = {r["label"]: r.get("tokens_per_s", 0) for r in rows if r["mode"] == "ours+fp8"}
print("false" if speed.get("head-bf16", 0) > speed.get("", 0) else "true")
EOF
    )
    echo "seq 4096: model.fp8_output_layer=$head (the faster at seq 2048)" >>"$out/speed-4096.log"
    "${BENCH[@]}" --seq 4096 --micro-batch 4 --modes reference,ours+fp8 --no-profile \
        --set "model.fp8_output_layer=$head" --out "$out/speed.jsonl" >>"$out/speed-4096.log" 2>&1
    ;;
head | head-fp8)
    # the sparse head's options against the reference of the same call (one call each fits the
    # 10-minute limit): as they are, with model.compile_head, with the logit gradient kept
    # instead of recomputed; in FP8 also compile_head with the output layer in FP8
    out=$2 && mkdir -p "$out"
    mode=ours+compile && [ "$1" = head-fp8 ] && mode=ours+fp8
    if [ "$1" = head ]; then
        for compiled in "" --compile; do  # the head alone first: seconds, not minutes
            python3 bench/head_step.py --config configs/llada-1b.yaml --seq 2048 \
                --micro-batch 8 $compiled --out "$out/head-alone.jsonl" >>"$out/head-alone.log" 2>&1
        done
    fi
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes reference --no-profile \
        --out "$out/$1.jsonl" >"$out/$1.log" 2>&1
    for opts in "" model.compile_head=true model.sparse_output_recompute=false; do
        "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes "$mode" --no-profile \
            ${opts:+--set "$opts"} --label "${opts:-default}" \
            --out "$out/$1.jsonl" >>"$out/$1.log" 2>&1
    done
    if [ "$1" = head-fp8 ]; then
        "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+fp8 --no-profile \
            --set model.compile_head=true --set model.fp8_output_layer=true \
            --label compile_head+fp8_output_layer --out "$out/$1.jsonl" >>"$out/$1.log" 2>&1
    fi
    ;;
options)
    out=$2 && mkdir -p "$out"
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes reference --no-profile \
        --out "$out/options.jsonl" >"$out/options.log" 2>&1
    stored=model.sparse_output_recompute=false
    for run in "ours+compile default" "ours+compile $stored" "ours+fp8 default" "ours+fp8 $stored" \
        "ours+fp8 $stored,model.compile_head=true" "ours+fp8 $stored,model.fp8_output_layer=true"; do
        mode=${run%% *} opts=${run#* } sets=()
        [ "$opts" = default ] || for o in ${opts//,/ }; do sets+=(--set "$o"); done
        "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes "$mode" --no-profile "${sets[@]}" \
            --label "$opts" --out "$out/options.jsonl" >>"$out/options.log" 2>&1
    done
    ;;
goals)
    out=$2 && mkdir -p "$out"
    best=(--set model.sparse_output_recompute=false --set model.compile_head=true)
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes reference,ours+fp8 --no-profile "${best[@]}" \
        --label compile_head --out "$out/goals.jsonl" >"$out/goals.log" 2>&1
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+fp8 --no-profile "${best[@]:0:2}" \
        --label stored --out "$out/goals.jsonl" >>"$out/goals.log" 2>&1
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+compile --no-profile "${best[@]}" \
        --label compile_head --out "$out/goals.jsonl" >>"$out/goals.log" 2>&1
    "${BENCH[@]}" --seq 4096 --micro-batch 4 --modes reference,ours+fp8 --no-profile "${best[@]}" \
        --label compile_head --out "$out/goals.jsonl" >>"$out/goals.log" 2>&1
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+fp8,ours+compile --no-profile \
        "${best[@]}" --set diffusion.objective=block --set model.attention_backend=flex \
        --label block --out "$out/goals.jsonl" >>"$out/goals.log" 2>&1
    ;;
block)
    out=$2 && mkdir -p "$out"
    "${BENCH[@]}" --seq 2048 --micro-batch 8 --modes ours+compile,ours+fp8 --no-profile \
        --set diffusion.objective=block --set model.attention_backend=flex --label block \
        "${@:3}" --out "$out/block.jsonl" >"$out/block.log" 2>&1
    ;;
convergence)
    data=$2 out=$3
    shift 3
    python3 experiments/fp8_convergence.py --data "$data" --out "$out" --concurrent "$@"
    ;;
*)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
