#!/usr/bin/env bash
# The language-model GPU recipes in one run on a lent GPU (about 10 minutes of device time in all): a speed probe of
# the PTB model (tokens/s, seconds per epoch: is the recipe going to fit?), then PTB (`ptb_word_gpu`: stateful
# truncated BPTT, validation every epoch, the best epoch kept, then validation and test perplexity), then Tiny
# Shakespeare (`shakespeare_char_gpu`) if the time left allows. Results land in $OUT (default gpu_lm_out/).
#   OUT=gpu_lm_out DATA=../shared/data BUDGET=560 bash examples/run_gpu_lm.sh
# Needs the library installed (pip install -e .); runs examples/train_lm_tbptt.py (no CLI wiring needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_lm_out}
DATA=${DATA:-../shared/data}
BUDGET=${BUDGET:-560}          # seconds for everything; a job is skipped when it would not fit
RUNS=${RUNS:-/tmp/gpu_lm_runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "=== [$SECONDS s] $*"; }
left() { echo $((BUDGET - SECONDS)); }

step environment
nvidia-smi -L
python3 -c "import torch, transformers, rnn_seq2seq_hf as r; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__, torch.cuda.get_device_name())"

step "speed probe: the ptb_word_gpu model, 30 training steps of 64 x 70 tokens"
timeout 60 python3 - <<'EOF' | tee "$OUT/speed_probe.txt"
import time, torch, yaml
from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM
recipe = yaml.safe_load(open("examples/configs/ptb_word_gpu.yaml"))
model = RNNLMForCausalLM(RNNLMConfig(vocab_size=10002, **recipe["model"])).cuda().train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch, bptt = recipe["training"]["per_device_train_batch_size"], recipe["data"]["block_size"]
x = torch.randint(4, 10002, (batch, bptt), device="cuda")
cache = None
for step in range(30):
    if step == 10:
        torch.cuda.synchronize(); start = time.perf_counter()
    out = model(input_ids=x, labels=x, shift_labels=x, cache=cache, use_cache=True)
    out.loss.backward(); optimizer.step(); optimizer.zero_grad(); cache = out.cache.detach_()
torch.cuda.synchronize()
rate = 20 * batch * bptt / (time.perf_counter() - start)
print(f"{rate:,.0f} tokens/s; one PTB epoch (929,589 tokens) in {929589 / rate:.1f} s of model time")
EOF

run() {  # run RECIPE NAME ARGS...: train with a time limit, keep what it wrote
  local recipe=$1 name=$2; shift 2
  step "recipe $recipe (limit $(( $(left) - 15 )) s)"
  timeout $(( $(left) - 15 )) python3 examples/train_lm_tbptt.py --recipe "$recipe" --output-dir "$RUNS/$name" \
    --set training.disable_tqdm=true "$@" 2>&1 | grep -v "^{'loss'" | tail -25 | tee "$OUT/$name.log"
  mkdir -p "$OUT/$name" && cp "$RUNS/$name/metrics.json" "$OUT/$name/" 2>/dev/null \
    || echo "$name: no metrics.json (stopped by the time limit?); checkpoints are in $RUNS/$name/checkpoints"
}

run ptb_word_gpu ptb_gpu --train "$DATA/ptb/ptb.train.txt" --validation "$DATA/ptb/ptb.valid.txt" \
  --test "$DATA/ptb/ptb.test.txt"
if [ "$(left)" -gt 200 ]; then
  run shakespeare_char_gpu shakespeare_gpu --train "$DATA/tinyshakespeare/input.txt" --validation-fraction 0.1
fi
step done
