#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one run with a time budget per step (a lent GPU machine has a
# few minutes): the GPU tests, the speed benchmark at batch 128 and 512, the mixed-precision benchmark, and the
# full-size Multi30k recipe(s). Results land in $OUT (default gpu_out/); copy what you keep into the repository.
#   OUT=gpu_out DATA=../shared/data bash benchmarks/gpu_checks.sh
# The library and its dependencies must be importable (pip install -e . on a GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data}
BUDGET=${BUDGET:-500}          # seconds: optional steps are skipped when they would not fit
RUNS=${RUNS:-/tmp/gpu_runs}
mkdir -p "$OUT" "$RUNS"
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

translate_recipe() {  # $1 = source language, $2 = target language, $3 = time limit in seconds
  local src=$1 tgt=$2 M=$DATA/multi30k job=multi30k_$1_$2_gpu
  step "recipe $job (limit $3 s)"
  timeout "$3" python3 -m rnn_seq2seq_hf.cli train-translation --recipe "$job" --output-dir "$RUNS/$job" \
    --train "$M/train.$src,$M/train.$tgt" --validation "$M/val.$src,$M/val.$tgt" \
    --test "$M/test_2016_flickr.$src,$M/test_2016_flickr.$tgt" --source-lang "$src" --target-lang "$tgt" \
    --dataset-name "Multi30k test_2016_flickr" --set training.disable_tqdm=true \
    --data-description "Multi30k (WMT16 multimodal task 1) training split, 29,000 sentence pairs, raw text." \
    2>&1 | grep -v "^{'loss'" | tail -30
  mkdir -p "$RUNS/keep/$job"
  for f in metrics.json loss.png attention.png test_translations.txt; do
    [ -f "$RUNS/$job/$f" ] && cp "$RUNS/$job/$f" "$RUNS/keep/$job/"
  done
  [ -f "$RUNS/$job/model/README.md" ] && cp "$RUNS/$job/model/README.md" "$RUNS/keep/$job/model_card.md"
  tar czf "$OUT/recipes.tgz" -C "$RUNS/keep" .
}
translate_recipe de en 260
[ "$(left)" -gt 200 ] && translate_recipe en de $(( $(left) - 20 ))

if [ "$(left)" -gt 100 ]; then
  step "the default test suite on this machine"
  timeout $(( $(left) - 10 )) python3 -m pytest -q -x -n 8 -p no:cacheprovider 2>&1 | tail -25 > "$OUT/full_suite.log"
  tail -5 "$OUT/full_suite.log"
fi
step done
