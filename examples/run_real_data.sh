#!/usr/bin/env bash
# Train and evaluate the CPU presets on the data in ../shared/data, one after the other, and keep what each run
# reports (metrics.json, loss.png, attention.png, samples, test translations, the model card) in results/.
# Time the language models on a quiet machine (nothing else running on the 2 cores): ptb_word_cpu is sized for 60
# minutes and shakespeare_char_cpu for 30 (both train with stateful truncated BPTT, `data.stateful: true`); the
# load average at the start of each job goes into $RUNS/timings.txt with the wall time.
#   bash examples/run_real_data.sh [multi30k_de_en multi30k_en_de ptb shakespeare]
# multi30k_de_en_gpu and multi30k_en_de_gpu run the full-size GPU presets (benchmarks/gpu_checks.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
RESULTS=${RESULTS:-results}
jobs=("$@")
[ ${#jobs[@]} -eq 0 ] && jobs=(multi30k_de_en multi30k_en_de ptb shakespeare)

keep() {  # copy the small outputs of run $1 into $RESULTS/$1
  mkdir -p "$RESULTS/$1"
  for f in metrics.json loss.png attention.png samples.txt test_translations.txt recipe.yaml train.log; do
    [ -f "$RUNS/$1/$f" ] && cp "$RUNS/$1/$f" "$RESULTS/$1/"
  done
  cp "$RUNS/$1/model/README.md" "$RESULTS/$1/model_card.md"
}

mkdir -p "$RUNS"
for job in "${jobs[@]}"; do
  echo "$job: start $(date -Is), load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores" | tee -a "$RUNS/timings.txt"
  start=$(date +%s)
  case $job in
    multi30k_de_en|multi30k_en_de|multi30k_de_en_gpu|multi30k_en_de_gpu)
      src=${job:9:2}; tgt=${job:12:2}; M=$DATA/multi30k
      recipe=$job; [[ $job == *_gpu ]] || recipe=${job}_cpu
      rnn-seq2seq train-translation --recipe "$recipe" --output-dir "$RUNS/$job" \
        --train "$M/train.$src,$M/train.$tgt" --validation "$M/val.$src,$M/val.$tgt" \
        --test "$M/test_2016_flickr.$src,$M/test_2016_flickr.$tgt" --source-lang "$src" --target-lang "$tgt" \
        --dataset-name "Multi30k test_2016_flickr" --set training.disable_tqdm=true \
        --data-description "Multi30k (WMT16 multimodal task 1) training split, 29,000 sentence pairs, raw text." ;;
    ptb)
      rnn-seq2seq train-lm --recipe ptb_word_cpu --output-dir "$RUNS/$job" --train "$DATA/ptb/ptb.train.txt" \
        --validation "$DATA/ptb/ptb.valid.txt" --test "$DATA/ptb/ptb.test.txt" --dataset-name "Penn Treebank" \
        --set training.disable_tqdm=true \
        --data-description "Penn Treebank, Mikolov's preprocessing (ptb.train.txt, 887,521 words, 10k vocabulary)." ;;
    shakespeare)
      rnn-seq2seq train-lm --recipe shakespeare_char_cpu --output-dir "$RUNS/$job" \
        --train "$DATA/tinyshakespeare/input.txt" --validation-fraction 0.1 --dataset-name "Tiny Shakespeare" \
        --set training.disable_tqdm=true \
        --data-description "Tiny Shakespeare (char-rnn), first 90% of the lines; validation is the last 10%." ;;
    *) echo "unknown job $job" >&2; exit 2 ;;
  esac
  echo "$job: $(( $(date +%s) - start )) s wall" | tee -a "$RUNS/timings.txt"
  keep "$job"
done
