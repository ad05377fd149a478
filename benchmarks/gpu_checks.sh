#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one run with a time budget per step (a lent GPU machine has a
# few minutes): the GPU tests, the speed benchmark at batch 128 and 512, the mixed-precision benchmark, the
# per-step overhead and long-sequence memory benchmarks, and the full-size Multi30k recipe(s). Results land in $OUT (default gpu_out/); copy what you keep into the repository.
#   OUT=gpu_out DATA=../shared/data bash benchmarks/gpu_checks.sh
# The library must be installed there (pip install -e .: the recipes run the rnn-seq2seq command).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data}
BUDGET=${BUDGET:-500}          # seconds: optional steps are skipped when they would not fit
RUNS=${RUNS:-/tmp/gpu_runs}
mkdir -p "$OUT" "$RUNS/keep"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "=== [$SECONDS s] $*"; }
left() { echo $((BUDGET - SECONDS)); }

step environment
nvidia-smi -L
python3 -c "import torch, transformers, datasets, rnn_seq2seq_hf as r; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'rnn_seq2seq_hf', r.__version__, torch.cuda.get_device_name())"

step "GPU tests"
timeout 150 python3 -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log" | tail -15

step "speed benchmark, batch 128 and 512"
timeout 90 python3 benchmarks/bench_seq2seq.py --device cuda --batch-size 128 --steps 10 --rounds 7 \
  --output "$OUT/gpu_h200_b128.json"
timeout 90 python3 benchmarks/bench_seq2seq.py --device cuda --batch-size 512 --steps 5 --rounds 5 \
  --output "$OUT/gpu_h200_b512.json"

step "mixed precision"
timeout 100 python3 benchmarks/bench_mixed_precision.py --device cuda --steps 300 \
  --output "$OUT/mixed_precision_gpu.json"

step "per-step overhead (issue 12): anchor size at batch 128, then tiny sizes; memory of long sequences (issue 9)"
timeout 150 python3 benchmarks/bench_overhead.py --device cuda --anchor --output "$OUT/overhead_anchor_cuda.json" \
  --note "gpu_checks.sh" 2>&1 | tail -40
timeout 90 python3 benchmarks/bench_overhead.py --device cuda --output "$OUT/overhead_tiny_cuda.json" \
  --note "gpu_checks.sh" 2>&1 | tail -40
timeout 120 python3 benchmarks/bench_memory.py --device cuda --hidden-size 512 --embedding-size 512 \
  --vocab-size 10000 --batch-size 64 --output "$OUT/memory_cuda.json" 2>&1 | tail -12

for job in multi30k_de_en_gpu multi30k_en_de_gpu; do  # the second only if it fits
  [ "$(left)" -gt 200 ] || break
  step "recipe $job (limit $(( $(left) - 20 )) s)"
  RUNS=$RUNS RESULTS=$RUNS/keep DATA=$DATA timeout $(( $(left) - 20 )) bash examples/run_real_data.sh "$job" 2>&1 \
    | grep -v "^{'loss'" | tail -30
  tar czf "$OUT/recipes.tgz" -C "$RUNS/keep" .
done

if [ "$(left)" -gt 100 ]; then
  step "the default test suite on this machine"
  timeout $(( $(left) - 10 )) python3 -m pytest -q -x -n 8 -p no:cacheprovider 2>&1 | tail -25 > "$OUT/full_suite.log"
  tail -5 "$OUT/full_suite.log"
fi
step done
