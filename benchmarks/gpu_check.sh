#!/usr/bin/env bash
# One GPU session in one command: build csrc/, run the GPU tests, time the MSDA kernel and
# the train step. Logs and JSON go to $OUT (default benchmarks/results/gpu_<time>).
#
#   bash benchmarks/gpu_check.sh [all|PART[,PART...]] [extra train_step.py args...]
#   PART: tests, msda, train, profile (profile: benchmarks/profile_step.py, r50_4scale bf16 bs2),
#         graphs (inference only, bf16 + TF32 + compile, eager vs one CUDA graph, three presets),
#         regions (r50_4scale bf16 + TF32 + compile: layer vs stack granularity, then
#         reduce-overhead at layer granularity; train bs 2 and 8 + inference; REGION_RUNS="layer stack"
#         picks some)
#
# A device call runs at most 600 s, and the parts together take longer: run them over several
# calls, e.g. "tests,msda", then "train --precision bf16 --tf32 --compile", then
# REGION_RUNS="stack reduce-overhead" ... regions, then "graphs".
#
# Optional wheels (e.g. deformops for the MSDA comparison) are installed from ./.whl when
# present. Each step has its own time limit so one hang cannot eat the whole session.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}; shift || true
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DINO_SCALE_EXT_DIR=${DINO_SCALE_EXT_DIR:-/tmp/dino_scale_ext}
export MAX_JOBS=${MAX_JOBS:-8}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

want() { [[ $part == all || ",$part," == *",$1,"* ]]; }
t0=$(date +%s)
timeout 300 python3 -m dino_scale.ops build 2>&1 | tee "$OUT/build.log" | tail -5
echo "build: $(( $(date +%s) - t0 )) s"

if want tests; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider --maxfail=30 -o addopts="" \
    tests/ops/test_ops_msda_cuda.py tests/models/test_parity.py tests/models/test_matcher.py \
    tests/models/test_cuda_graph.py tests/ops/test_level_shapes.py 2>&1 \
    | tee "$OUT/tests.log" | tail -40
fi
if want msda; then
  timeout 240 python3 benchmarks/msda.py --out "$OUT/msda.json" 2>&1 | tee "$OUT/msda.log" | tail -30
fi
if want train; then
  timeout 400 python3 benchmarks/train_step.py --out "$OUT/train_step.json" "$@" 2>&1 | tee "$OUT/train_step.log" | tail -30
fi
if want graphs; then
  for g in "" --cuda-graphs; do
    timeout 300 python3 benchmarks/train_step.py --batch-sizes "" --precision bf16 --tf32 --compile $g \
      --preset r50_4scale --preset r50_5scale --preset swinl_4scale --out "$OUT/infer${g:+_graphs}.json" 2>&1 \
      | tee "$OUT/infer${g:+_graphs}.log" | tail -8
  done
fi
if want regions; then
  # REGION_RUNS picks the runs (a device call is limited to 600 s: split them over calls)
  for run in ${REGION_RUNS:-layer stack reduce-overhead}; do
    case $run in
      layer) args="--compile-granularity layer" ;;
      stack) args="--compile-granularity stack" ;;
      reduce-overhead) args="--compile-granularity layer --compile-mode reduce-overhead" ;;
      *) echo "unknown REGION_RUNS entry $run (layer | stack | reduce-overhead)"; continue ;;
    esac
    tag=$run
    timeout 400 python3 benchmarks/train_step.py --preset r50_4scale --precision bf16 --tf32 --compile $args \
      --out "$OUT/regions_$tag.json" 2>&1 | tee "$OUT/regions_$tag.log" | tail -8
  done
fi
if want profile; then
  timeout 300 python3 benchmarks/profile_step.py --out "$OUT" 2>&1 | tee "$OUT/profile.log" | head -60
fi
