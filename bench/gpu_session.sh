#!/usr/bin/env bash
# One GPU session in one call: build the extension for sm_90(a), record the
# environment, run the CUDA tests under both HSV_CUDA_IMPL values, run
# compute-sanitizer (memcheck, racecheck) on a small fused-kernel script, and
# benchmark dense vs composite vs fused per layer. Every part is time-bounded
# and the whole stays inside HSV_SESSION_BUDGET seconds (default 560), so it
# fits one 10-minute device call; parts that no longer fit are skipped and say so.
#
#   bash bench/gpu_session.sh build info test sanitize   # call 1 (~4 min on an H100)
#   bash bench/gpu_session.sh build bench                # call 2 (~8 min): per layer
#   bash bench/gpu_session.sh build models               # call 3 (~4 min): end to end
#   bash bench/gpu_session.sh build models-measured      # call 4: end to end, dense where measured faster
#   bash bench/gpu_session.sh build sweep                 # channels_last kernels per layer (graphs), both packings
#   bash bench/gpu_session.sh build fused-tests sweep models   # after a kernel change: its tests, then timings
#   bash bench/gpu_session.sh build info wgmma            # the wgmma kernel (sm_90a): its tests, then a sweep
#   bash bench/gpu_session.sh build fold                  # folded tucker2/ht2/cp on the two-stage kernels
#   bash bench/gpu_session.sh build info kcp              # the fused kcp kernel: its tests, then a sweep
#   bash bench/gpu_session.sh build models-latency        # end to end, layers chosen under a measured latency
#                                                         # budget (alone: its 6 files + 2 fill the 8 that return)
#   bash bench/gpu_session.sh build epilogue              # residual add + ReLU in the kernels' stores
#                                                         # (HSV_CUDA_EPILOGUE=on): its tests, then end to end
#   bash bench/gpu_session.sh build per-layer             # ResNet-50 bf16: each conv's time inside the eager
#                                                         # forward (CUDA events) and alone, dense and compressed
#
# (All parts at once do not fit one 10-minute call: the layer benchmark alone
# took >170 s per dtype for 6 of its 8 layers on the H100, 2026-11-22.)
#
# Run from anywhere; it works in the repository root. Logs and results go to
# $OUT (default /tmp/hsv-gpu-session), at most 8 files: session.log (steps,
# timings, environment, the final table of step results), build.log (with
# ptxas' register/shared-memory report of every kernel), tests.log,
# sanitizer.log, bench-<dtype>.{json,md} and models-bf16.{json,md}. Needs no network.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/hsv-gpu-session}
mkdir -p "$OUT"
BUDGET=${HSV_SESSION_BUDGET:-560}
PY=${PYTHON:-python3}
START=$SECONDS
LOG=$OUT/session.log
RESULTS=()

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(build info test sanitize)
want() {
  local p
  for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done
  return 1
}
left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP LOGFILE CMD...: CMD under a timeout of min(CAP, budget left),
# output appended to LOGFILE; the result line goes to session.log.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local t
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then
    RESULTS+=("$name: SKIPPED (session budget spent)")
    echo "SKIPPED $name: session budget spent" | tee -a "$LOG"
    return 124
  fi
  echo "=== $name (limit ${t}s): $*" | tee -a "$LOG" >>"$log"
  local t0=$SECONDS rc
  timeout -k 5 "$t" "$@" >>"$log" 2>&1
  rc=$?
  local what="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${t}s"
  RESULTS+=("$name: $what in $((SECONDS - t0))s (log $(basename "$log"))")
  echo "$name: $what in $((SECONDS - t0))s" | tee -a "$LOG"
  return $rc
}

echo "gpu_session: parts ${parts[*]}, budget ${BUDGET}s, out $OUT, $(date -u +%FT%TZ)" | tee "$LOG"
git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$LOG"

if want build; then
  # sm_90 only (the H100/H200; setup.py builds it as sm_90a, for the wgmma kernel); ptxas -v puts each
  # kernel's registers, spills and shared memory in build.log.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v"
  step build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . ||
    step build-inplace 300 "$OUT/build.log" "$PY" setup.py build_ext --inplace
  unset NVCC_APPEND_FLAGS
fi

if ! "$PY" -c "import sys, hsvkernels; sys.exit(0 if hsvkernels.build_info().get('with_cuda') else 1)" \
  >>"$LOG" 2>&1; then
  echo "gpu_session: hsvkernels has no CUDA kernels (build failed?); see build.log" | tee -a "$LOG"
  exit 1
fi

if want info; then
  {
    echo "--- python -m hsvkernels info"
    "$PY" -m hsvkernels info
    echo "--- nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  } >>"$LOG" 2>&1
fi

if want fused-tests; then
  # only the fused-kernel tests (they set HSV_CUDA_IMPL themselves) and the graph timer of convert_(measure=True):
  # after a change to the kernels or their selection
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step "tests fused kernels" 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
    tests/test_cuda_fused.py tests/test_timing.py
fi

if want test; then
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  # the whole CUDA matrix with the default (composite), plus the fused tests (which set HSV_CUDA_IMPL themselves)
  # plus the linkage and argument-error tests: this machine's toolchain once made every error message a segfault
  step "tests composite" 200 "$OUT/tests.log" env HSV_CUDA_IMPL=composite \
    "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" tests/test_cuda.py tests/test_cuda_fused.py \
    tests/test_cuda_epilogue.py tests/test_linkage.py tests/test_errors.py
  # the foundation CUDA matrix again with the fused kernels selected
  step "tests fused" 120 "$OUT/tests.log" env HSV_CUDA_IMPL=fused \
    "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" tests/test_cuda.py
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    step "memcheck" 90 "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
      "$PY" bench/cuda_fused_smoke.py
    step "racecheck" 120 "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --racecheck-report all \
      --error-exitcode 3 "$PY" bench/cuda_fused_smoke.py
  else
    RESULTS+=("sanitize: SKIPPED (compute-sanitizer not on PATH)")
  fi
fi

if want bench; then
  # dense (cuDNN, cudnn.benchmark=True) vs op (the environment's default) vs
  # composite vs fused, in one process per dtype; the eight layers of
  # docs/performance.md section 3.3 at ratio=4, macs_ratio=4.
  common=(--device cuda --methods svd,tucker2 --tags L1,L2,L3,L4,L5,L6,L7,L8 --batch 1,32,128 --impls composite,fused
    --min-run-time 0.2 --rounds 3 --min-blocks 5)
  step "bench bf16 channels_last" 250 "$OUT/session.log" \
    "$PY" bench/layers.py "${common[@]}" --dtype bfloat16 --channels-last --out "$OUT/bench-bf16"
  # fp32 with TF32 on for cuDNN and cuBLAS alike (the fused fp32 path is TF32)
  step "bench fp32 tf32-on" 160 "$OUT/session.log" \
    "$PY" bench/layers.py "${common[@]}" --batch 32 --dtype float32 --tf32 on --out "$OUT/bench-fp32"
  # batch 1, bf16 channels_last, CUDA-graph replays (no launch overhead); printed only, to stay at 8 files
  step "bench bf16 batch-1 graphed" 80 "$OUT/session.log" \
    "$PY" bench/layers.py "${common[@]}" --batch 1 --graph --dtype bfloat16 --channels-last \
    --out /tmp/hsv-bench-bf16-graph
fi

if want wgmma; then
  # the wgmma kernel (two_stage_wgmma.cu, HSV_CUDA_NHWC=wgmma only): its tests and the nhwc tests it joins,
  # then every forced (warpgroups, cluster split) against dense, composite and the mma kernel
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step "tests wgmma" 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
    tests/test_cuda_fused.py -k wgmma
  step "wgmma sweep" 240 "$OUT/session.log" "$PY" bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 \
    --batch 32,1 --methods hsv --no-wmma --wgmma-sweep
fi

if want fold; then
  # tucker2, ht2, tt_tucker, cp and level-2 hsv on the two-stage kernels through folded factors
  # (HSV_CUDA_FOLD=on, csrc/ops/fold_two_stage.h): their tests, then per layer against dense, composite and
  # the unfolded fused path
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step "tests fold" 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
    tests/test_cuda_fused.py tests/test_fold_two_stage.py -k fold
  step "fold sweep" 240 "$OUT/session.log" "$PY" bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 \
    --batch 32,1 --methods tucker2,ht2 --no-wmma --fold
fi

if want kcp; then
  # the fused kcp kernel (HSV_CUDA_KCP=on, kcp_cuda.cu; first run on a GPU): its tests, the CPU emulator of the
  # same CTA program, then per layer against dense and the composite chain
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step "tests kcp" 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
    tests/test_cuda_kcp.py tests/test_kcp_cta_emulate.py
  step "kcp sweep" 240 "$OUT/session.log" "$PY" bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 \
    --batch 32,1 --methods kcp --no-wmma --kcp
fi

if want sweep; then
  # the channels_last kernels per layer from graph replays: dense, composite, mma (input blocks where they
  # apply) and mma with the per-tap gather (HSV_CUDA_MMA_HALO=0)
  step "nhwc sweep" 200 "$OUT/session.log" "$PY" bench/cuda_nhwc_sweep.py --tags L1,L2,L3,L4,L5,L6,L7,L8 \
    --batch 32,1 --methods hsv --halo-off --no-wmma
fi

# end to end, ResNet-18/50 and VGG-16 converted with hsv at ratio=4, macs_ratio=4, bf16 channels_last, each
# model replayed from a CUDA graph (eager pairs of two identical models were 10-16% apart on the H100), with
# the dense-vs-itself row
models=(bench/models.py --device cuda --dtype bfloat16 --channels-last --models resnet18,resnet50,vgg16 --methods hsv
  --min-run-time 0.5 --graph --aa)
if want models; then
  step "models bf16 channels_last" 300 "$OUT/session.log" \
    "$PY" "${models[@]}" --batch 32,1 --cuda-impl composite,fused,auto --out "$OUT/models-bf16"
fi
if want models-measured; then
  # convert_(measure=True): each layer timed on the GPU (graph replays), kept dense where factorized is slower
  step "models bf16 measured" 300 "$OUT/session.log" \
    "$PY" "${models[@]}" --batch 32 --measure --out "$OUT/models-bf16-measured"
fi
if want models-latency; then
  # ranks.select(latency_ratio=): each layer's options timed on the GPU (graph replays) and chosen under a
  # measured latency budget with params 4x smaller, the layers' configs picked where they run fastest
  # one step per model, each with its own output files: a step that runs out of time loses only its model
  # (6 files; with session.log and build.log that is the device tool's 8: run this part with build alone)
  for m in resnet18 resnet50 vgg16; do
    step "models bf16 latency budget $m" 240 "$OUT/session.log" "$PY" "${models[@]}" --models "$m" --batch 32 \
      --ratio 4 --latency-ratio 1.5 --cuda-impl auto --out "$OUT/models-bf16-latency-$m"
  done
fi

if want epilogue; then
  # conv2d_epilogue's residual add and ReLU in the channels_last kernels' stores and one pass after the other
  # paths (HSV_CUDA_EPILOGUE=on, csrc/ops/cuda/epilogue_pass.h; first run on a GPU): its tests (each kernel,
  # bitwise against the unfused tail), then ResNet-18/50 with BN folded and their adds and ReLUs fused
  # (fuse_epilogues), the tail as ATen ops after the conv (off) against in the kernels (on), head to head
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  step "tests epilogue" 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
    tests/test_cuda_epilogue.py tests/test_epilogue_op.py tests/test_epilogue_fusion.py
  step "models bf16 epilogues" 300 "$OUT/session.log" "$PY" "${models[@]}" --models resnet18,resnet50 \
    --batch 32,1 --fold-bn --fuse-epilogues --cuda-impl auto,auto+HSV_CUDA_EPILOGUE=on \
    --out "$OUT/models-bf16-epilogues"
fi

if want per-layer; then
  # where an eager forward's time goes, conv by conv (hsvkernels.benchmark.layer_times: CUDA events around each
  # conv module, then each conv alone on the input it saw), dense against compressed, bf16 channels_last
  for n in 32 1; do
    step "per-layer resnet50 bf16 batch $n" 150 "$OUT/per-layer-resnet50-bf16-b$n.txt" "$PY" -m hsvkernels bench \
      torchvision:resnet50 --device cuda --dtype bfloat16 --channels-last --fold-bn --fuse-epilogues --method hsv \
      --ratio 4 --option macs_ratio=4 --batch $n --per-layer --runs 20 --min-run-time 0.5
  done
fi

{
  echo
  echo "gpu_session: done in $((SECONDS - START))s of ${BUDGET}s"
  for r in "${RESULTS[@]}"; do echo "  $r"; done
  # registers, spills, shared memory of the fused kernels (ptxas -v in build.log)
  grep -A3 -E "Compiling entry function.*(two_stage|tucker2)_kernel" "$OUT/build.log" 2>/dev/null |
    grep -E "entry function|registers|spill" | sed -E "s/.*(two_stage|tucker2)_kernelI(.*)EEvNS.*/\1 \2:/" | tail -12
  grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|errors?)|ERROR SUMMARY|RACECHECK SUMMARY|^geomean|WRONG OUTPUT" \
    "$OUT"/tests.log "$OUT"/sanitizer.log "$OUT"/session.log 2>/dev/null | grep -v "^gpu_session" | tail -40
} | tee -a "$LOG.tail"
cat "$LOG.tail" >>"$LOG" && rm -f "$LOG.tail"
