"""Training runs started by test_distributed.py, as `python loop_runner.py MODE OUT [options]` (1 process) or under
`torchrun --standalone --nproc_per_node 2` with ACCELERATE_USE_CPU=1 (2 CPU processes, gloo).

Modes:
  loop     the Accelerate loop on a fixed copy task; rank 0 writes the final weights and log to OUT
  trainer  Seq2SeqTrainer on the same task; rank 0 writes the final weights
  eval     distributed evaluation of an odd-sized set; rank 0 writes which examples were scored
  configs  two DDP steps for many configurations (raises if DDP finds unused parameters)
  resume   a longer loop run with checkpoints every 2 steps, slowed down so the test can kill it (each process
           writes its pid to OUT/pid-RANK); `--crash-in-save N` kills the process with SIGKILL in the middle of
           writing its N-th checkpoint
  tbptt-loop / tbptt-trainer
           a language model trained with truncated BPTT (carried state, random windows, the learning rate scaled
           by the window length) on `--global-batch` streams; rank 0 writes the final weights and losses
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_seq2seq_config  # noqa: E402
from rnn_seq2seq_hf import RNNSeq2SeqForConditionalGeneration  # noqa: E402
from rnn_seq2seq_hf.accelerate_loop import LoopArguments, evaluate, train_with_accelerate  # noqa: E402
from test_trainer import copy_task, pad_batch  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
# The environment tests start this runner in: CPU processes, one thread each.
RUNNER_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
RANK = int(os.environ.get("RANK", "0"))


def tokenized_copy_task(n: int, seed: int):
    import datasets

    examples = copy_task(n, seed)
    return datasets.Dataset.from_dict({k: [e[k] for e in examples] for k in ("input_ids", "labels")})


def build_model(seed: int = 0, **overrides) -> RNNSeq2SeqForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_seq2seq_config(initializer_range=0.1, hidden_size=32, embedding_size=16, **overrides)
    return RNNSeq2SeqForConditionalGeneration(config)


def save_weights(model, path: Path) -> None:
    save_file({name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode", choices=["loop", "trainer", "eval", "configs", "resume", "tbptt-loop", "tbptt-trainer"]
    )
    parser.add_argument("out")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--crash-in-save", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_device = args.global_batch // (WORLD * args.accumulation)

    if args.mode == "loop":
        model = build_model()
        loop_args = LoopArguments(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=args.accumulation,
            learning_rate=0.01,
            warmup_steps=1,
            mixed_precision=args.mixed_precision,
            logging_steps=1,
            seed=0,
        )
        model, state, _ = train_with_accelerate(model, tokenized_copy_task(8, seed=1), pad_batch, loop_args)
        if RANK == 0:
            save_weights(model, out / "weights.safetensors")
            (out / "log.json").write_text(json.dumps(state.log_history))

    elif args.mode == "trainer":
        from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

        model = build_model()
        training_args = Seq2SeqTrainingArguments(
            output_dir=str(out / "trainer"),
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=0.01,
            logging_steps=1,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            seed=0,
            disable_tqdm=True,
        )
        trainer = Seq2SeqTrainer(
            model=model, args=training_args, train_dataset=copy_task(8, seed=1), data_collator=pad_batch
        )
        trainer.train()
        if trainer.is_world_process_zero():
            save_weights(trainer.model, out / "weights.safetensors")
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            (out / "log.json").write_text(json.dumps(losses))

    elif args.mode == "eval":
        from accelerate import Accelerator

        from rnn_seq2seq_hf.metrics import translation_scores
        from rnn_seq2seq_hf.tokenization import train_tokenizer

        tokenizer = train_tokenizer(["a b c d e f g h i j k l m n o p q r s"], kind="word", vocab_size=None)
        model = build_model()
        accelerator = Accelerator()
        data = tokenized_copy_task(7, seed=2)  # 7 examples over 2 processes x batches of 2
        data = data.add_column("example_id", list(range(len(data))))
        from torch.utils.data import DataLoader

        from rnn_seq2seq_hf.accelerate_loop import _with_example_ids

        loader = accelerator.prepare(DataLoader(data, batch_size=2, collate_fn=_with_example_ids(pad_batch)))
        model = accelerator.prepare(model)
        loop_args = LoopArguments(output_dir=str(out), generation_max_new_tokens=5, generation_num_beams=2)
        metrics = evaluate(model, loader, accelerator, tokenizer, loop_args, translation_scores)
        if RANK == 0:
            (out / "eval.json").write_text(json.dumps(metrics))

    elif args.mode == "configs":
        from accelerate import Accelerator

        variants = [
            dict(attention_type=a, cell_type=c, bridge=b, input_feeding=f, tie_word_embeddings=t, share_embeddings=t)
            for a, f in (("none", False), ("bahdanau", True), ("dot", False), ("general", True), ("concat", False))
            for c, b, t in (("lstm", "linear", True), ("gru", "last", False), ("rnn_tanh", "zero", False))
            if not (a == "none" and b == "zero")
        ]
        batch = pad_batch(copy_task(4, seed=3))
        for variant in variants:
            accelerator = Accelerator()
            model = build_model(**variant)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            model, optimizer = accelerator.prepare(model, optimizer)  # DDP, find_unused_parameters=False
            for _ in range(2):
                loss = model(**{k: v[RANK::WORLD] for k, v in batch.items()}).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        if RANK == 0:
            (out / "configs.json").write_text(json.dumps({"variants": len(variants), "world": WORLD}))

    elif args.mode == "resume":
        if args.crash_in_save:
            from rnn_seq2seq_hf import checkpointing

            saves = {"count": 0}
            write_model, write_tensor_file = checkpointing.write_model, checkpointing.write_tensor_file

            def counting_write_model(path, model):
                saves["count"] += 1
                return write_model(path, model)

            def crashing_write_tensor_file(path, tensors):
                if saves["count"] == args.crash_in_save and path.name == checkpointing.OPTIMIZER_TENSORS:
                    os.kill(os.getpid(), signal.SIGKILL)  # the model file is written, the rest is not
                return write_tensor_file(path, tensors)

            checkpointing.write_model = counting_write_model
            checkpointing.write_tensor_file = crashing_write_tensor_file
        if args.slow:
            original_step = torch.optim.AdamW.step

            def slow_step(self, *a, **k):
                result = original_step(self, *a, **k)
                time.sleep(args.slow)
                return result

            torch.optim.AdamW.step = slow_step
        model = build_model(hidden_dropout=0.3, embedding_dropout=0.2, output_dropout=0.2)  # RNG must resume too
        loop_args = LoopArguments(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=4,
            learning_rate=0.01,
            warmup_steps=2,
            logging_steps=args.logging_steps,
            save_steps=2,
            save_total_limit=3,
            seed=0,
        )
        (out / f"pid-{RANK}").write_text(str(os.getpid()))  # for a test that kills every process of the job
        model, state, _ = train_with_accelerate(model, tokenized_copy_task(20, seed=4), pad_batch, loop_args)
        if RANK == 0:
            save_weights(model, out / "weights.safetensors")
            (out / "log.json").write_text(json.dumps(state.log_history))

    elif args.mode.startswith("tbptt"):
        run_tbptt(args.mode.removeprefix("tbptt-"), out, per_device, args.accumulation, args.steps)


def run_tbptt(engine: str, out: Path, per_device: int, accumulation: int, steps: int) -> None:
    from transformers import TrainingArguments

    from rnn_seq2seq_hf.lm_streams import TokenStream
    from rnn_seq2seq_hf.tbptt import TBPTTTrainer
    from test_tbptt import lm, token_stream

    # no dropout: each process draws its own masks, so only a deterministic model can match one process exactly
    model = lm()
    stream = TokenStream(token_stream(803), bptt=6, random_window_lengths=True, seed=1)
    common = dict(
        max_steps=steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.01,
        warmup_steps=1,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    if engine == "loop":
        loop_args = LoopArguments(output_dir=str(out / "run"), **common)
        model, state, _ = train_with_accelerate(model, stream, None, loop_args, scale_lr_by_window_length=True)
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    else:
        training_args = TrainingArguments(
            output_dir=str(out / "trainer"), report_to="none", use_cpu=True, save_strategy="no", **common
        )
        trainer = TBPTTTrainer(model=model, args=training_args, train_stream=stream, scale_lr_by_window_length=True)
        trainer.train()
        model = trainer.model
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if RANK == 0:
        save_weights(model, out / "weights.safetensors")
        (out / "log.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main()
    # Tear the process group down before the interpreter does: a gloo group left to interpreter shutdown aborted a
    # rank once under load ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
