#!/usr/bin/env bash
# One GPU session in one device call: build csrc/, run the GPU tests, time the MSDA kernel,
# the train step and inference, within a time budget. A lent machine gives a session 15 min of
# device time in all (its start included) and 600 s per call, so the default plan runs the
# steps in priority order and skips, by name, every step that no longer fits BUDGET_S.
#
#   bash benchmarks/gpu_check.sh [PLAN] [train_step.py args for the "train" step...]
#   PLAN: "session" (default) or a comma list of steps, run in the order given:
#     tests-msda  MSDA kernel GPU tests (dtypes, gradcheck, C++ autograd, compile) + level caches
#     msda        benchmarks/msda.py: issue 3's kernel table (ours, PyTorch, deformops if carried)
#     train       r50_4scale bf16 + TF32 + regional compile: train bs 2 and 8, inference bs 1
#                 (extra args replace these train_step.py arguments)
#     graphs      r50_4scale inference through one CUDA graph (GraphedDetector)
#     graphs-swinl  the same for swinl_4scale
#     tests-models  parity on CUDA (r50_4scale, swinl_4scale), matcher, GraphedDetector tests (the
#                 slow CPU-only parity tests there are CI's: left out here)
#     finite      r50_4scale bf16 + TF32 eager, train bs 2: the NaN/Inf check on the host (two reads:
#                 the loss, the gradient norm), then on the device (--finite-check host / auto; steps
#                 finite-host, finite-auto: both or neither start, a lone row compares with nothing)
#     regions     REGION_RUNS (default "stack reduce-overhead") for r50_4scale; its baseline is the
#                 train step (layer granularity, default mode): run one entry with train per call
#     presets     r50_5scale and swinl_4scale, train bs 2 and 8 + inference (bf16 + TF32 + compile);
#                 each preset is also a step of its own (preset-r50_5scale, preset-swinl_4scale): both
#                 together (~630 s with the build) do not fit one call's budget, so run them as two calls
#     profile     benchmarks/profile_step.py, r50_4scale bf16 bs 2 (phases, op tables, syncs)
#     ("tests" = tests-msda,tests-models; "all" = "session"; "none": the machine description only)
#     An unknown step or REGION_RUNS entry is refused (exit 2) before anything runs.
#   session = tests-msda,msda,train,graphs,tests-models,graphs-swinl,finite,presets,regions,profile
#   Estimates are the H200 times of 2026-12-04 plus a margin (build 28 s cold, tests-msda 27,
#   msda 17, train 222, graphs 34, tests-models 39, preset r50_5scale 84, swinl_4scale 167, both
#   presets at bs 2 only). The presets' bs 2 + 8 estimates (240, 330) are not measured: their bs 2
#   times plus what bs 8 added to r50_4scale's train step (~140 s, mostly compiling the new shape).
#
# Environment: OUT (default benchmarks/results/gpu_<time>; a dry run: none), BUDGET_S (default 540: seconds after
# which no step starts; each step's timeout is cut to what is left), DRY_RUN=1 (print the plan
# with each step's estimate and limit, run nothing), BUILD=0 (skip the extension build, e.g. when
# DINO_SCALE_EXT_DIR already holds it).
#
# What comes back: a device call returns at most 8 files from $OUT, so logs and JSON are written
# to a scratch folder and packed into $OUT/results.tgz after every step (a call killed at its
# limit still returns what finished), beside $OUT/summary.txt (one line per step: exit status,
# seconds, or why it was skipped). Wheels in ./.whl (e.g. deformops) are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
plan=${1:-session}; shift || true
steps=()
for s in ${plan//,/ }; do
  case $s in
    all|session) steps+=(tests-msda msda train graphs tests-models graphs-swinl finite preset-r50_5scale
                         preset-swinl_4scale regions profile) ;;
    tests) steps+=(tests-msda tests-models) ;;
    none) ;;  # the machine description only (GPU, torch), packed like any run
    presets) steps+=(preset-r50_5scale preset-swinl_4scale) ;;
    *) steps+=("$s") ;;
  esac
done
# a mistyped step would be found only at its turn, after the build and the steps before it had
# spent the call: refuse it before anything runs
KNOWN_STEPS=" tests-msda msda train graphs graphs-swinl tests-models regions preset-r50_5scale preset-swinl_4scale"
KNOWN_STEPS+=" finite profile "
for s in "${steps[@]}"; do
  [[ $KNOWN_STEPS == *" $s "* ]] || {
    echo "gpu_check.sh: unknown step '$s' (steps:${KNOWN_STEPS% }; or session, tests, presets, all, none)" >&2
    exit 2
  }
done
if [[ " ${steps[*]} " == *" regions "* ]]; then
  for run in ${REGION_RUNS:-stack reduce-overhead}; do
    [[ $run == layer || $run == stack || $run == reduce-overhead ]] \
      || { echo "gpu_check.sh: unknown REGION_RUNS entry '$run' (layer | stack | reduce-overhead)" >&2; exit 2; }
  done
fi
DRY_RUN=${DRY_RUN:-0}
DRY_OUT=""  # a dry run without OUT writes its summary to a scratch folder, not the checkout
if [[ -z ${OUT:-} && $DRY_RUN == 1 ]]; then DRY_OUT=$(mktemp -d /tmp/gpu_check_plan.XXXXXX); OUT=$DRY_OUT; fi
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
T0=$(date +%s)
# the clock the plan reads: a dry run's stands still, so its plan is the sum of the estimates alone
# (a slow machine's real seconds would otherwise shift the limits it prints)
now() { if [[ $DRY_RUN == 1 ]]; then echo "$T_START"; else date +%s; fi; }
T_START=$T0
export PYTHONUNBUFFERED=1 DINO_SCALE_EXT_DIR=${DINO_SCALE_EXT_DIR:-/tmp/dino_scale_ext}
export MAX_JOBS=${MAX_JOBS:-8}
say() { echo "$*" | tee -a "$SUMMARY"; }
# pack: $WORK -> $OUT/results.tgz. A file back from the device may be 16 MiB at most: past
# PACK_MAX_BYTES the archive is rebuilt without the files over PACK_BIG (find -size; default 1M),
# named in summary.txt.
pack() {
  tar czf "$OUT/results.tgz.part" -C "$WORK" . || return
  if (( $(stat -c %s "$OUT/results.tgz.part") > ${PACK_MAX_BYTES:-15000000} )); then
    (cd "$WORK" && find . -type f -size "+${PACK_BIG:-1M}") > "$WORK/.too_large"
    say "pack: left out of results.tgz (too large): $(tr '\n' ' ' < "$WORK/.too_large")"
    tar czf "$OUT/results.tgz.part" -C "$WORK" -X "$WORK/.too_large" --exclude ./.too_large . || return
  fi
  mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}

# step NAME ESTIMATE_S CAP_S CMD...: run CMD if ESTIMATE_S still fits the budget, with a timeout
# of min(CAP_S, seconds left); its output goes to $WORK/NAME.log (last lines echoed).
step() {
  local name=$1 est=$2 cap=$3; shift 3
  local left=$(( BUDGET_S - ($(now) - T0) ))
  if (( left < est )); then say "$name: skipped (${left} s left of ${BUDGET_S}, needs ~${est} s)"; return 0; fi
  local limit=$(( cap < left ? cap : left ))
  if [[ $DRY_RUN == 1 ]]; then say "$name: would run (~${est} s, limit ${limit} s): $*"; T0=$(( T0 - est )); return 0; fi
  local t=$(date +%s)
  # -k: a process that ignores the TERM (a hung GPU teardown) is killed 15 s later, so the summary
  # line and the packing still happen inside the call
  timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  say "$name: rc=$rc, $(( $(date +%s) - t )) s (limit ${limit} s)$( (( rc == 124 )) && echo ', TIMED OUT')"
  tail -n "${TAIL:-25}" "$WORK/$name.log"
  pack
  return $rc
}

if [[ $DRY_RUN != 1 ]]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee "$WORK/gpu.txt"
fi
say "plan: ${steps[*]} (budget ${BUDGET_S} s)"
if [[ ${BUILD:-1} != 0 ]]; then
  if ! step build 60 240 python3 -m dino_scale.ops build; then
    # every later step would try the JIT build again (minutes each) and then time the PyTorch fallback
    say "build failed: later steps run with DINO_SCALE_MSDA_NO_JIT=1 (their JSON says which kernel ran)"
    export DINO_SCALE_MSDA_NO_JIT=1
  fi
fi

R50=(--preset r50_4scale --precision bf16 --tf32 --compile)
for s in "${steps[@]}"; do
  case $s in
    # -v: each test's result is logged as it ends, so a step cut at its limit still says which
    # passed and which failed (-q prints names only in the final summary)
    tests-msda) step tests-msda 35 200 python3 -m pytest -v -p no:cacheprovider --maxfail=30 -o addopts="" \
                  tests/ops/test_ops_msda_cuda.py tests/ops/test_level_shapes.py ;;
    msda) step msda 25 180 python3 benchmarks/msda.py --out "$WORK/msda.json" ;;
    train) if (( $# )); then args=("$@"); else args=("${R50[@]}"); fi
           step train 240 330 python3 benchmarks/train_step.py --out "$WORK/train.json" "${args[@]}" ;;
    graphs) step graphs 45 200 python3 benchmarks/train_step.py --batch-sizes "" --cuda-graphs "${R50[@]}" \
              --out "$WORK/graphs.json" ;;
    graphs-swinl) step graphs-swinl 60 200 python3 benchmarks/train_step.py --batch-sizes "" --cuda-graphs \
                    --preset swinl_4scale --precision bf16 --tf32 --compile --out "$WORK/graphs_swinl.json" ;;
    tests-models) step tests-models 50 240 python3 -m pytest -v -p no:cacheprovider --maxfail=30 -o addopts="" \
                    -m "not slow" tests/models/test_parity.py tests/models/test_matcher.py \
                    tests/models/test_cuda_graph.py ;;
    finite)  # estimates not measured: an eager bs 2 row and the inference row, ~20 steps each
      left=$(( BUDGET_S - ($(now) - T0) ))
      if (( left < 90 )); then
        for check in host auto; do say "finite-$check: skipped (${left} s left of ${BUDGET_S}, the pair needs ~90 s)"; done
        continue
      fi
      for check in host auto; do  # the host row's limit leaves the device row its ~45 s
        cap=150; [[ $check == host ]] && (( left - 45 < cap )) && cap=$(( left - 45 ))
        step "finite-$check" 45 "$cap" python3 benchmarks/train_step.py --preset r50_4scale --precision bf16 \
          --tf32 --batch-sizes 2 --finite-check "$check" --out "$WORK/finite_$check.json"
      done ;;
    regions)
      for run in ${REGION_RUNS:-stack reduce-overhead}; do
        case $run in
          layer) args=(--compile-granularity layer) ;;
          stack) args=(--compile-granularity stack) ;;
          reduce-overhead) args=(--compile-granularity layer --compile-mode reduce-overhead) ;;
          *) say "regions: unknown REGION_RUNS entry $run (layer | stack | reduce-overhead)"; continue ;;
        esac
        step "regions-$run" 240 330 python3 benchmarks/train_step.py "${R50[@]}" "${args[@]}" --out "$WORK/regions_$run.json"
      done ;;
    preset-r50_5scale|preset-swinl_4scale)
      p=${s#preset-}
      est=240; cap=360; [[ $p == swinl_4scale ]] && { est=330; cap=450; }
      step "$s" "$est" "$cap" python3 benchmarks/train_step.py --preset "$p" --precision bf16 --tf32 --compile \
        --batch-sizes 2,8 --out "$WORK/preset_$p.json" ;;
    profile) step profile 120 240 python3 benchmarks/profile_step.py --tf32 --compile --out "$WORK/profile" ;;
    *) say "unknown step $s" ;;
  esac
done
say "total: $(( $(now) - T0 )) s"
[[ $DRY_RUN == 1 ]] || pack
rm -rf "$WORK" ${DRY_OUT:+"$DRY_OUT"}
