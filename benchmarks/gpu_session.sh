#!/usr/bin/env bash
# One lent GPU session (about 14 minutes of device time in two calls): the checks and measurements that need a GPU,
# then the GPU training recipes, all three at once on the one GPU (each is launch-bound and leaves it mostly idle).
#
#   phase 1 (first call, about 5 minutes):  bash benchmarks/gpu_session.sh start
#     the wheels this project pins (transformers 5.24, datasets, evaluate) into /tmp/site; the GPU tests
#     (tests/test_cuda.py: CUDA = CPU for every variant, CUDA-graph decoding = eager = transformers' loops); the
#     per-step overhead benchmark at the anchor size (generate() with CUDA graphs / without / transformers' loops
#     against bare loops; training steps against bound B); the training-speed benchmark at batch 128; then the
#     recipes ptb_word_gpu, multi30k_de_en_gpu and multi30k_en_de_gpu start in the background (setsid), with the
#     training time limited to 6, 5 and 5 minutes.
#   phase 2 (second call, at once):         bash benchmarks/gpu_session.sh collect
#     waits for the recipes (until BUDGET2 seconds), then copies what they wrote into $OUT.
# Results land in $OUT (the device tool's folder); copy what you keep into results/ and benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-.gpudata}  # the data travels with the working tree: copied there, ignored by git
RUNS=/tmp/gpu_runs
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/bin:$PATH
step() { echo "=== [$SECONDS s] $*"; }

if [ "${1:-}" = start ]; then
  step environment
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m rnn_seq2seq_hf.cli "$@"\n' > /tmp/bin/rnn-seq2seq
  chmod +x /tmp/bin/rnn-seq2seq
  nvidia-smi -L
  python3 -c "import torch, transformers, datasets, rnn_seq2seq_hf as r; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/environment.txt"

  step "GPU tests"
  timeout 150 python3 -m pytest -q -m "" tests/test_cuda.py tests/models/test_regularization.py -p no:cacheprovider \
    2>&1 | tee "$OUT/cuda_tests.log" | tail -6

  step "per-step overhead at the anchor size (decoding with CUDA graphs, training steps)"
  timeout 150 python3 benchmarks/bench_overhead.py --device cuda --anchor --rounds 5 --skip-lm \
    --output "$OUT/overhead_anchor_cuda.json" --note "gpu_session.sh" 2>&1 | grep -v USDT | tail -30

  step "recipes in the background"
  for job in multi30k_de_en_gpu multi30k_en_de_gpu; do
    src=${job:9:2}; tgt=${job:12:2}; M=$DATA/multi30k
    setsid nohup timeout 520 rnn-seq2seq train-translation --recipe "$job" --output-dir "$RUNS/$job" \
      --overwrite-output-dir --train "$M/train.$src,$M/train.$tgt" --validation "$M/val.$src,$M/val.$tgt" \
      --test "$M/test_2016_flickr.$src,$M/test_2016_flickr.$tgt" --source-lang "$src" --target-lang "$tgt" \
      --dataset-name "Multi30k test_2016_flickr" --set training.disable_tqdm=true --set time_limit_minutes=5 \
      > "$RUNS/$job.stdout" 2> "$RUNS/$job.stderr" < /dev/null &
  done
  setsid nohup timeout 520 rnn-seq2seq train-lm --recipe ptb_word_gpu --output-dir "$RUNS/ptb_word_gpu" \
    --overwrite-output-dir --train "$DATA/ptb/ptb.train.txt" --validation "$DATA/ptb/ptb.valid.txt" \
    --test "$DATA/ptb/ptb.test.txt" --dataset-name "Penn Treebank (Mikolov)" --set training.disable_tqdm=true \
    --set time_limit_minutes=6 \
    > "$RUNS/ptb_word_gpu.stdout" 2> "$RUNS/ptb_word_gpu.stderr" < /dev/null &
  sleep 20
  tail -n 3 "$RUNS"/*.stderr
  step started
  exit 0
fi

if [ "${1:-}" = collect ]; then
  BUDGET2=${BUDGET2:-450}
  while pgrep -f "rnn_seq2seq_hf.cli train" > /dev/null && [ "$SECONDS" -lt "$BUDGET2" ]; do sleep 10; done
  step "collecting"
  COLLECT=/tmp/gpu_collect && rm -rf "$COLLECT" && mkdir -p "$COLLECT"
  for job in multi30k_de_en_gpu multi30k_en_de_gpu ptb_word_gpu; do
    mkdir -p "$COLLECT/$job"
    cp "$RUNS/$job.stdout" "$RUNS/$job.stderr" "$COLLECT/$job/" 2>/dev/null
    for f in metrics.json recipe.yaml loss.png attention.png samples.txt test_translations.txt train.log \
      model/README.md; do
      [ -f "$RUNS/$job/$f" ] && cp "$RUNS/$job/$f" "$COLLECT/$job/$(echo "$f" | tr / _)"
    done
    echo "--- $job"; tail -n 4 "$RUNS/$job.stderr"; cat "$RUNS/$job.stdout"
  done 2>&1 | tee "$OUT/recipes_summary.txt"
  tar czf "$OUT/runs.tgz" -C "$COLLECT" .  # one file: the tool brings back at most 8
  step done
  exit 0
fi
echo "usage: bash benchmarks/gpu_session.sh start|collect" >&2
exit 2
