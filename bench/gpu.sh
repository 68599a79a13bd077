#!/usr/bin/env bash
# Run the benchmarks on a bare GPU machine that has CUDA PyTorch but none of our other
# dependencies and no network: install them from carried wheels, then benchmark.
#
#   bash bench/gpu.sh setup                 install WHEELS/*.whl into SITE (no index, no deps)
#   bash bench/gpu.sh flash-build LOG       build flash-attn from WHEELS/src/*.tar.gz in the
#                                           background (setsid); progress and timing go to LOG;
#                                           FLASH_HEADDIMS="64 128" builds only those head dims
#                                           in bf16 (bench/flash_trim.py: 12 units instead of 73)
#   bash bench/gpu.sh flash-status LOG      one line: elapsed seconds, objects compiled / total
#   bash bench/gpu.sh flash-wait LOG SECS   wait up to SECS for the build, then install its wheel
#                                           into SITE (exit 1 if it is not there by then)
#   bash bench/gpu.sh bench OUT [ARGS...]   bench/train_step.py with ARGS, JSON lines to OUT
#   bash bench/gpu.sh convergence DATA OUT [ARGS...]
#                                           experiments/fp8_convergence.py on shards DATA
#
# Wheels to carry (built or downloaded on a machine with network, Python 3.12):
#   DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8
#   pip download --no-deps --python-version 3.12 --only-binary :all: megatron-core==0.16.1 \
#       pydantic pydantic-core annotated-types typing-inspection hjson webdataset braceexpand
#   pip download --no-deps --python-version 3.12 --only-binary :all: torchao==0.18.0
#       (model.fp8 and the *+fp8 modes; its float8 training needs none of its C++ extensions)
#   flash-attn sdist (optional): the .tar.gz from PyPI into WHEELS/src/
set -euo pipefail
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The image's `9.0a` breaks DeepSpeed's JIT op builds; plain 9.0 builds them.
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1

case "${1:-}" in
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    python3 -c "import deepspeed, megatron.core, webdataset, torch; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0))"
    if ls "$WHEELS"/torchao-*.whl >/dev/null 2>&1; then
        python3 -c "import torch, torchao.float8; print('torchao', torchao.__version__, 'FP8 tensor cores:', torch.cuda.get_device_capability(0) >= (8, 9))"
    fi
    ;;
flash-build)
    log=$(realpath -m "$2")
    work=/tmp/flash-build && rm -rf "$work" && mkdir -p "$work"
    tar -xzf "$WHEELS"/src/flash_attn-*.tar.gz -C "$work" --strip-components 1
    if [ -n "${FLASH_HEADDIMS:-}" ]; then
        # shellcheck disable=SC2086  # one argument per head dim
        python3 bench/flash_trim.py "$work" $FLASH_HEADDIMS
    fi
    date +%s >"$log.start"
    (cd "$work" && FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 \
        MAX_JOBS=${MAX_JOBS:-8} setsid nohup python3 -m pip wheel -v --no-deps \
        --no-build-isolation --no-index -w /tmp/flash-wheel . >"$log" 2>&1 &)
    ;;
flash-status)
    log=$(realpath -m "$2")
    start=$(cat "$log.start")
    total=$(grep -c 'csrc/flash_attn/src/flash_.*\.cu"' /tmp/flash-build/setup.py)
    done_=$(find /tmp/flash-build/build -name '*.o' 2>/dev/null | wc -l)
    wheel=$(ls /tmp/flash-wheel/*.whl 2>/dev/null || true)
    echo "flash-attn build: $(($(date +%s) - start)) s, $done_ objects of $((total + 1)) sources, wheel: ${wheel:-none}"
    ;;
flash-wait)
    deadline=$(($(date +%s) + $3))
    until ls /tmp/flash-wheel/*.whl >/dev/null 2>&1 || [ "$(date +%s)" -ge "$deadline" ]; do
        sleep 10
    done
    bash "$0" flash-status "$2"
    ls /tmp/flash-wheel/*.whl >/dev/null 2>&1 || { tail -5 "$2"; exit 1; }
    echo "flash-attn wheel built in $(($(stat -c %Y /tmp/flash-wheel/*.whl) - $(cat "$2.start"))) s"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" /tmp/flash-wheel/*.whl
    python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)"
    ;;
bench)
    out=$2
    shift 2
    python3 bench/train_step.py --out "$out" "$@"
    ;;
convergence)
    data=$2 out=$3
    shift 3
    python3 experiments/fp8_convergence.py --data "$data" --out "$out" "$@"
    ;;
*)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
