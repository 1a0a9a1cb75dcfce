#!/usr/bin/env bash
# The GPU checks of the attention kernels and the train step, in one run (~9 minutes on one H100
# or H200), each part under its own timeout, everything written to one results directory:
#
#   1 numerics  tests/kernels/test_flash.py on the GPU: the compiled Triton kernel (small and
#               tuned blocks; fwd + grads; dense, packed and padded rows; GQA), cuDNN (bf16)
#               and, on Hopper, the Mosaic GPU kernel (bf16; packed, dense, all-padding rows)
#               against the reference
#   2 attention benchmarks/attention.py: pallas vs cuDNN vs XLA (and mosaic_gpu on Hopper, with
#               its ratio to pallas), fwd and fwd+bwd, dense and packed rows, L = 4096 and
#               16384 (B4, 16 heads, D128, bf16)
#   3 tune      benchmarks/attention.py --tune: candidate blocks per length and row kind, into
#               RESULTS/tuning.json (the package's table merged with this device's entries),
#               which the train-step parts then use; copy it to omnijax/kernels/tuning.json
#   4 train-1b  benchmarks/gpu_train_step.py --preset 1b, 4 x 4096 tokens in rows of 8
#               segments: pallas, cudnn, xla beside the PyTorch twin, MFU, a profile
#   5 train-7b  the same for omni7b widths with 4 layers, pallas and cudnn (train-1b has xla)
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR] [PART ...]   # default: gpu_results, all parts
#
# Every part runs even when an earlier one failed; the exit status is the number of failed
# parts. Each part's output is RESULTS/<n>_<part>.txt; RESULTS/summary.txt lists their status.
set -u
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu_results}
shift $(( $# > 0 ? 1 : 0 ))
PARTS=${*:-numerics attention tune train-1b train-7b}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cuda
PYTHON=${PYTHON:-python}
failed=0

run() {  # run NAME SECONDS COMMAND...: one part, its output in RESULTS, its status in summary
  local name=$1 seconds=$2 n
  shift 2
  n=$(( $(ls "$RESULTS" | grep -c '_.*\.txt$' || true) + 1 ))
  local log="$RESULTS/${n}_${name}.txt"
  echo "== $name: $* (timeout ${seconds}s)" | tee "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >>"$log" 2>&1
  local status=$?
  local verdict=ok
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then verdict="timed out"
  elif [ $status -ne 0 ]; then verdict="failed ($status)"; fi
  [ "$verdict" = ok ] || failed=$((failed + 1))
  echo "$name: $verdict in $((SECONDS - start)) s" | tee -a "$RESULTS/summary.txt"
  tail -n 25 "$log"
}

for part in $PARTS; do
  case $part in
    numerics)  # the interpret-mode kernels run in CI already
      run numerics 130 $PYTHON -m pytest -q -p no:cacheprovider tests/kernels/test_flash.py \
        -k "compiled or cudnn or mosaic" ;;
    attention) run attention 135 $PYTHON benchmarks/attention.py --repeats 10 ;;
    tune)
      cp omnijax/kernels/tuning.json "$RESULTS/tuning.json"
      run tune 105 $PYTHON benchmarks/attention.py --tune --repeats 5 --table "$RESULTS/tuning.json"
      # The train steps (and `auto`) of this run use what was just measured.
      cp "$RESULTS/tuning.json" omnijax/kernels/tuning.json ;;
    train-1b)
      run train-1b 120 $PYTHON benchmarks/gpu_train_step.py --preset 1b --batch 4 --seq-len 4096 \
        --steps 5 --attention pallas,cudnn,xla --profile "$RESULTS/profile-1b" ;;
    train-7b)
      run train-7b 100 $PYTHON benchmarks/gpu_train_step.py --preset omni7b --batch 4 \
        --seq-len 4096 --steps 5 --attention pallas,cudnn model.num_layers=4 ;;
    *) echo "unknown part $part (numerics attention tune train-1b train-7b)"; failed=$((failed + 1)) ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$RESULTS/device.txt" 2>&1
$PYTHON -c "import jax; print(jax.__version__, jax.devices())" >>"$RESULTS/device.txt" 2>&1
exit $failed
