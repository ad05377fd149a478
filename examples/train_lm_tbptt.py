"""Train an RNN language model with stateful truncated BPTT from a recipe, and report stateful perplexity.

The same recipes as `rnn-seq2seq train-lm` (examples/configs/ptb_*.yaml, shakespeare_*.yaml); the `data` section
says how the windows are read (`block_size`, `random_window_lengths`, `scale_lr_by_window_length`). A flat script
over the library's pieces: tokenizer, token streams, model, `fit_language_model_tbptt`, evaluation.

    python examples/train_lm_tbptt.py --recipe ptb_word_cpu --output-dir runs/ptb \
        --train ../shared/data/ptb/ptb.train.txt --validation ../shared/data/ptb/ptb.valid.txt \
        --test ../shared/data/ptb/ptb.test.txt [--engine accelerate] [--set training.num_train_epochs=1]
    python examples/train_lm_tbptt.py --recipe shakespeare_char_cpu --output-dir runs/shakespeare \
        --train ../shared/data/tinyshakespeare/input.txt --validation-fraction 0.1

Writes OUTPUT_DIR/metrics.json (validation and test perplexity, training time, machine), OUTPUT_DIR/model/ and the
checkpoints; launch with `torchrun` for several processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM
from rnn_seq2seq_hf.data import lm_token_stream, read_lm_text, split_text
from rnn_seq2seq_hf.inference import evaluate_perplexity
from rnn_seq2seq_hf.model_card import hardware_description
from rnn_seq2seq_hf.recipes import load_recipe
from rnn_seq2seq_hf.tbptt import TBPTTSettings, fit_language_model_tbptt
from rnn_seq2seq_hf.tokenization import special_token_ids, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--validation")
    parser.add_argument("--validation-fraction", type=float)
    parser.add_argument("--test")
    parser.add_argument("--engine", choices=["trainer", "accelerate"], default="trainer")
    parser.add_argument("--set", action="append", default=[], help="override a recipe value: section.key=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    recipe = load_recipe(args.recipe, args.set)
    training, data = dict(recipe.get("training", {})), recipe.get("data", {})
    set_seed(training.get("seed", 42))
    train_lines = read_lm_text(args.train)
    if args.validation:
        validation_lines = read_lm_text(args.validation)
    else:
        train_lines, validation_lines = split_text(train_lines, args.validation_fraction)
    test_lines = read_lm_text(args.test) if args.test else None

    # 1. Tokenizer and token streams (word level: every line followed by </s>; characters: the text as it is).
    tokenizer_settings = recipe.get("tokenizer", {})
    per_line = tokenizer_settings.get("kind", "word") != "char"
    texts = train_lines if per_line else ["\n".join(train_lines)]
    tokenizer = train_tokenizer(texts, padding_side="left", add_eos=False, **tokenizer_settings)
    streams = {"train": lm_token_stream(train_lines, tokenizer, per_line)}
    streams["validation"] = lm_token_stream(validation_lines, tokenizer, per_line)
    if test_lines:
        streams["test"] = lm_token_stream(test_lines, tokenizer, per_line)
    logging.info("tokens: %s", {name: len(stream) for name, stream in streams.items()})

    # 2. Model and truncated-BPTT training.
    config = RNNLMConfig(vocab_size=len(tokenizer), **special_token_ids(tokenizer), **recipe.get("model", {}))
    model = RNNLMForCausalLM(config)
    logging.info("parameters: %s", f"{sum(p.numel() for p in model.parameters()):,}")
    evaluation = recipe.get("evaluation", {})
    model, _, log_history = fit_language_model_tbptt(
        model,
        tokenizer,
        streams,
        training,
        args.output_dir,
        TBPTTSettings.from_data_section(data),
        engine=args.engine,
        evaluation_batch_size=evaluation.get("batch_size", 10),
        evaluation_block_size=evaluation.get("block_size"),
    )
    training_seconds = time.perf_counter() - started
    if not PartialState().is_main_process:
        return

    # 3. Stateful perplexity, the standard way (as rnn-seq2seq evaluate-lm reads a text).
    output_dir = Path(args.output_dir)
    metrics = {"training_seconds": round(training_seconds, 1), "hardware": hardware_description()}
    for split in ("validation", "test"):
        if split in streams:
            scores = evaluate_perplexity(
                model, streams[split], evaluation.get("batch_size", 10), evaluation.get("block_size", 70)
            )
            metrics.update({f"{split}_{name}": value for name, value in scores.items()})
    metrics["evaluations"] = [
        {k: entry[k] for k in ("step", "epoch", "eval_loss", "eval_perplexity") if k in entry}
        for entry in log_history
        if "eval_loss" in entry
    ]
    metrics["recipe"] = recipe
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    model.config.use_cache = True
    model.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("recipe", "evaluations")}, indent=2))


if __name__ == "__main__":
    main()
