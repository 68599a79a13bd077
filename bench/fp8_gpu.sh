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
#                                        bf16 with the head recomputing its chunks eagerly (the
#                                        defaults before 2026-12-01 evening), with
#                                        model.compile_head, and with the logit gradient kept
#   bash bench/fp8_gpu.sh head-fp8 OUT   the same with ours+fp8, plus compile_head with the
#                                        output layer in FP8
#   bash bench/fp8_gpu.sh options OUT    seq 2048 x 8, no profiler, one call: the reference, then
#                                        ours bf16 and ours+fp8 with the head recomputing and
#                                        with the logit gradient kept, and in FP8 the kept
#                                        gradient with model.compile_head or the output layer in FP8
#   bash bench/fp8_gpu.sh goals OUT      the issue's figures with today's defaults (the logit
#                                        gradient kept, the head's chunks compiled): seq 2048 x 8
#                                        reference, ours+fp8 (and with the head eager), ours
#                                        bf16; seq 4096 x 4 reference and ours+fp8; block
#                                        diffusion ours+fp8 and bf16
#   bash bench/fp8_gpu.sh trees OUT SEQ MICRO NAME=DIR...
#                                        no profiler: the reference, then ours bf16 and ours+fp8
#                                        from this tree and from each DIR (a copy of another
#                                        tree's `pretrain` package, put first on PYTHONPATH), so
#                                        a change is measured against the code before it
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

# one benchmark call without the profiler: `bench SEQ MICRO MODES LABEL OUT SETTING...` appends
# to OUT.jsonl and OUT.log, each SETTING a config override. The head's settings are always
# named in full, so a variant measures the same thing whatever the defaults are.
bench() {
    local seq=$1 micro=$2 modes=$3 label=$4 out=$5 sets=() setting
    shift 5
    for setting in "$@"; do sets+=(--set "$setting"); done
    "${BENCH[@]}" --seq "$seq" --micro-batch "$micro" --modes "$modes" --no-profile \
        "${sets[@]}" --label "$label" --out "$out.jsonl" >>"$out.log" 2>&1
}
RECOMPUTE=model.sparse_output_recompute=true STORED=model.sparse_output_recompute=false
EAGER_HEAD=model.compile_head=false COMPILED_HEAD=model.compile_head=true

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
    # 10-minute limit)
    out=$2 && mkdir -p "$out"
    mode=ours+compile && [ "$1" = head-fp8 ] && mode=ours+fp8
    if [ "$1" = head ]; then
        for compiled in "" --compile; do  # the head alone first: seconds, not minutes
            python3 bench/head_step.py --config configs/llada-1b.yaml --seq 2048 \
                --micro-batch 8 $compiled --out "$out/head-alone.jsonl" >>"$out/head-alone.log" 2>&1
        done
    fi
    bench 2048 8 reference reference "$out/$1"
    bench 2048 8 "$mode" recompute "$out/$1" "$RECOMPUTE" "$EAGER_HEAD"
    bench 2048 8 "$mode" compile_head "$out/$1" "$RECOMPUTE" "$COMPILED_HEAD"
    bench 2048 8 "$mode" stored "$out/$1" "$STORED" "$EAGER_HEAD"
    if [ "$1" = head-fp8 ]; then
        bench 2048 8 ours+fp8 compile_head+fp8_output_layer "$out/$1" "$RECOMPUTE" \
            "$COMPILED_HEAD" model.fp8_output_layer=true
    fi
    ;;
options)
    out=$2/options && mkdir -p "$2"
    bench 2048 8 reference reference "$out"
    for mode in ours+compile ours+fp8; do
        bench 2048 8 "$mode" recompute "$out" "$RECOMPUTE" "$EAGER_HEAD"
        bench 2048 8 "$mode" stored "$out" "$STORED" "$EAGER_HEAD"
    done
    bench 2048 8 ours+fp8 stored+compile_head "$out" "$STORED" "$COMPILED_HEAD"
    bench 2048 8 ours+fp8 stored+fp8_output_layer "$out" "$STORED" "$EAGER_HEAD" \
        model.fp8_output_layer=true
    ;;
goals)
    out=$2/goals && mkdir -p "$2"
    bench 2048 8 reference,ours+fp8 defaults "$out" "$STORED" "$COMPILED_HEAD"
    bench 2048 8 ours+fp8 stored "$out" "$STORED" "$EAGER_HEAD"
    bench 2048 8 ours+compile defaults "$out" "$STORED" "$COMPILED_HEAD"
    bench 4096 4 reference,ours+fp8 defaults "$out" "$STORED" "$COMPILED_HEAD"
    bench 2048 8 ours+fp8,ours+compile block "$out" "$STORED" "$COMPILED_HEAD" \
        diffusion.objective=block model.attention_backend=flex
    ;;
trees)
    out=$2/trees seq=$3 micro=$4 && mkdir -p "$2"
    bench "$seq" "$micro" reference reference "$out" "$STORED" "$COMPILED_HEAD"
    bench "$seq" "$micro" ours+compile,ours+fp8 this "$out" "$STORED" "$COMPILED_HEAD"
    for tree in "${@:5}"; do
        PYTHONPATH="${SITE:-/tmp/site}:${tree#*=}:$PWD" bench "$seq" "$micro" \
            ours+compile,ours+fp8 "${tree%%=*}" "$out" "$STORED" "$COMPILED_HEAD"
    done
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
    sed -n '2,32p' "$0"
    exit 2
    ;;
esac
