"""Speed of the Seq2Seq model against bounds timed in the same process.

Training (forward + backward + Adam step), in target tokens per second:
- bound A: the bare nn.LSTM encoder and decoder stacks (with embeddings), loss = sum of outputs;
- bound B: bound A plus the vocabulary projection and cross-entropy, i.e. everything the model must do except
  attention;
- fused: RNNSeq2SeqForConditionalGeneration, Luong attention without input feeding (one recurrent call over the
  target, batched attention);
- input feeding: the same model with input feeding (a step-by-step loop).
Decoding 20 steps: `generate()` greedy and with 5 beams against hand-written loops calling the same model's forward
with the same cache.

Variants are timed in interleaved rounds (A, B, fused, ..., A, B, ...) and the median round is reported, so slow
drifts of the machine hit every variant alike. Prints a table and writes JSON.

    python benchmarks/bench_seq2seq.py                       # CPU, batch 64
    python benchmarks/bench_seq2seq.py --device cuda --batch-size 128 --output benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench_common import (
    BareStacks,
    handwritten_beam_search,
    handwritten_greedy,
    machine_info,
    medians,
    time_rounds,
    training_step_fn,
    write_json,
)
from rnn_seq2seq_hf import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=20, help="source and target length")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--attention", default="general", choices=["dot", "general", "concat"])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="on a GPU, true fp32 matrix products (default: TF32, as PyTorch users run)",
    )
    parser.add_argument("--output", default="benchmarks/results/cpu.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    common = dict(
        vocab_size=args.vocab_size,
        embedding_size=args.embedding_size,
        hidden_size=args.hidden_size,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        cell_type="lstm",
        bidirectional_encoder=True,
        attention_type=args.attention,
        bridge="last",
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
    )
    fused_config = RNNSeq2SeqConfig(**common, input_feeding=False)
    feeding_config = RNNSeq2SeqConfig(**common, input_feeding=True)
    fused = RNNSeq2SeqForConditionalGeneration(fused_config).to(device)
    feeding = RNNSeq2SeqForConditionalGeneration(feeding_config).to(device)
    bound_a = BareStacks(fused_config, with_projection=False).to(device)
    bound_b = BareStacks(fused_config, with_projection=True).to(device)

    batch, length = args.batch_size, args.length
    source = torch.randint(3, args.vocab_size, (batch, length), device=device)
    labels = torch.randint(3, args.vocab_size, (batch, length), device=device)
    decoder_input_ids = torch.cat([torch.ones_like(labels[:, :1]), labels[:, :-1]], dim=1)
    mask = torch.ones_like(source)

    def repeat(step: Callable[[], None]) -> Callable[[], None]:
        return lambda: [step() for _ in range(args.steps)]

    train_variants = {
        "bound A: LSTM stacks alone": repeat(
            training_step_fn(bound_a, lambda: bound_a.loss(source, decoder_input_ids, labels))
        ),
        "bound B: stacks + projection + cross-entropy": repeat(
            training_step_fn(bound_b, lambda: bound_b.loss(source, decoder_input_ids, labels))
        ),
        "model, fused (no input feeding)": repeat(
            training_step_fn(fused, lambda: fused(input_ids=source, attention_mask=mask, labels=labels).loss)
        ),
        "model, input feeding (step loop)": repeat(
            training_step_fn(feeding, lambda: feeding(input_ids=source, attention_mask=mask, labels=labels).loss)
        ),
    }
    fused.train()
    feeding.train()
    train_seconds = medians(time_rounds(train_variants, args.rounds, device))
    tokens_per_call = batch * length * args.steps
    train = {name: tokens_per_call / seconds for name, seconds in train_seconds.items()}

    fused.eval()
    generate_kwargs = dict(
        input_ids=source, attention_mask=mask, max_new_tokens=length, min_new_tokens=length, do_sample=False
    )
    decode_variants = {
        "hand-written greedy loop": lambda: handwritten_greedy(fused, source, mask, length),
        "generate() greedy": lambda: fused.generate(**generate_kwargs, num_beams=1),
        f"hand-written beam search, {args.beams} beams": lambda: handwritten_beam_search(
            fused, source, mask, length, args.beams
        ),
        f"generate() beam search, {args.beams} beams": lambda: fused.generate(**generate_kwargs, num_beams=args.beams),
    }
    with torch.no_grad():
        decode = medians(time_rounds(decode_variants, max(3, args.rounds // 2), device))

    names = list(train)
    bound_b_rate = train[names[1]]
    results = {
        "machine": {**machine_info(device), "tf32": device.type == "cuda" and not args.no_tf32},
        "setup": vars(args),
        "train_target_tokens_per_second": train,
        "fused_over_bound_b": train[names[2]] / bound_b_rate,
        "input_feeding_over_bound_b": train[names[3]] / bound_b_rate,
        "decode_seconds": decode,
        "generate_over_handwritten_greedy": decode["generate() greedy"] / decode["hand-written greedy loop"],
        "generate_over_handwritten_beam": decode[f"generate() beam search, {args.beams} beams"]
        / decode[f"hand-written beam search, {args.beams} beams"],
    }

    print(f"device {results['machine']['device_name'] or device}, torch threads {torch.get_num_threads()}")
    print(f"batch {batch}, length {length}, LSTM {args.layers}x{args.hidden_size}, vocab {args.vocab_size}")
    print("\ntraining, target tokens / s")
    for name, rate in train.items():
        print(f"  {name:<48} {rate:>10.0f}  ({rate / bound_b_rate:.2f} of bound B)")
    print(f"\ndecoding {length} steps, seconds")
    for name, seconds in decode.items():
        print(f"  {name:<48} {seconds:>10.3f}")
    print(
        f"\ngenerate() / hand-written: greedy {results['generate_over_handwritten_greedy']:.2f}x, "
        f"beam {results['generate_over_handwritten_beam']:.2f}x"
    )
    print(f"\nwrote {write_json(args.output, results)}")


if __name__ == "__main__":
    main()
