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
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rnn_seq2seq_hf
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareStacks(nn.Module):
    """The bound: embeddings, a bidirectional LSTM encoder and an LSTM decoder of the model's sizes, and optionally
    the vocabulary projection. No attention, no bridge."""

    def __init__(self, config: RNNSeq2SeqConfig, with_projection: bool):
        super().__init__()
        self.source_embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.target_embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.encoder = nn.LSTM(
            config.embedding_size, config.hidden_size // 2, config.encoder_layers, batch_first=True, bidirectional=True
        )
        self.decoder = nn.LSTM(config.embedding_size, config.hidden_size, config.decoder_layers, batch_first=True)
        self.projection = nn.Linear(config.hidden_size, config.vocab_size) if with_projection else None

    def loss(self, source: torch.Tensor, decoder_input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        encoded, _ = self.encoder(self.source_embedding(source))
        decoded, _ = self.decoder(self.target_embedding(decoder_input_ids))
        if self.projection is None:
            return encoded.sum() + decoded.sum()
        logits = self.projection(decoded)
        return encoded.sum() * 0 + nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def training_step_fn(module: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    return step


@torch.no_grad()
def handwritten_greedy(model, source, mask, steps: int) -> torch.Tensor:
    """Greedy decoding calling the model's forward with its cache, no generate()."""
    encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
    tokens = torch.full((source.shape[0], 1), model.config.decoder_start_token_id, device=source.device)
    cache = None
    for _ in range(steps):
        out = model(
            encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=tokens[:, -1:], cache=cache
        )
        cache = out.cache
        tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def handwritten_beam_search(model, source, mask, steps: int, beams: int) -> torch.Tensor:
    """Fixed-length beam search (no EOS handling) calling the model's forward with its cache, no generate()."""
    batch_size = source.shape[0]
    encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
    for key, value in encoder_outputs.items():
        encoder_outputs[key] = value.repeat_interleave(beams, dim=0)
    mask = mask.repeat_interleave(beams, dim=0)
    tokens = torch.full((batch_size * beams, 1), model.config.decoder_start_token_id, device=source.device)
    scores = torch.zeros(batch_size, beams, device=source.device)
    scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    offsets = (torch.arange(batch_size, device=source.device) * beams)[:, None]
    cache = None
    for _ in range(steps):
        out = model(
            encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=tokens[:, -1:], cache=cache
        )
        cache = out.cache
        logprobs = out.logits[:, -1].float().log_softmax(-1)  # [B*K, V]
        vocab = logprobs.shape[-1]
        total = (scores.view(-1, 1) + logprobs).view(batch_size, beams * vocab)
        scores, index = total.topk(beams, dim=-1)
        rows = (offsets + index // vocab).view(-1)
        cache.reorder_cache(rows)
        tokens = torch.cat([tokens[rows], (index % vocab).view(-1, 1)], dim=1)
    return tokens


def time_rounds(variants: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant over interleaved rounds (after one warm-up call each)."""
    for fn in variants.values():
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


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
    train_seconds = time_rounds(train_variants, args.rounds, device)
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
        decode = time_rounds(decode_variants, max(3, args.rounds // 2), device)

    names = list(train)
    bound_b_rate = train[names[1]]
    results = {
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "tf32": device.type == "cuda" and not args.no_tf32,
            "rnn_seq2seq_hf": rnn_seq2seq_hf.__version__,
            "python": platform.python_version(),
        },
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
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
