"""Loss parity and speed of the mixed-precision policy against fp32 and TF32, on one device, in one process.

Each precision trains the same model from the same initial weights on the same batches (a learnable synthetic
task: the target is the source reversed), so the loss curves are directly comparable:
- fp32: true fp32 (TF32 off);
- tf32: fp32 weights, TF32 matrix products and cuDNN (PyTorch's usual GPU setting);
- bf16 policy: `torch.autocast(dtype=bfloat16)` with TF32 on; the library keeps the recurrence in fp32 and runs the
  attention, attentional layer and vocabulary projection in bf16;
- fp16 policy: the same with fp16 autocast and a `GradScaler`.
Reports target tokens per second (median of interleaved timing rounds after the loss run), the final loss (median
over the last 10% of steps: Adam at this learning rate gives single-step loss spikes in every precision) and its
relative difference to fp32, and the loss curves. One trajectory per precision: on this task the step at which a
run leaves the initial plateau varies from run to run, so compare curves and final losses, not single steps.
Prints a table and writes JSON.

    python benchmarks/bench_mixed_precision.py --device cuda --output benchmarks/results/mixed_precision_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import rnn_seq2seq_hf
from rnn_seq2seq_hf import RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration

PRECISIONS = ["fp32", "tf32", "bf16 policy", "fp16 policy"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--input-feeding", action="store_true", help="time the step-by-step decoder instead")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the loss-parity run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--timing-steps", type=int, default=10, help="training steps per timing round")
    parser.add_argument("--output", default="benchmarks/results/mixed_precision_gpu.json")
    return parser.parse_args()


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def make_batches(args, device: torch.device, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Reversal task: random source tokens, target = source reversed (needs attention to learn quickly)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        source = torch.randint(3, args.vocab_size, (args.batch_size, args.length), generator=generator)
        batches.append(
            dict(
                input_ids=source.to(device),
                attention_mask=torch.ones_like(source).to(device),
                labels=source.flip(1).to(device),
            )
        )
    return batches


class PrecisionRun:
    """One model + Adam + (for fp16) a GradScaler, stepping under one precision setting."""

    def __init__(self, model, precision: str, device: torch.device):
        self.model = model
        self.precision = precision
        self.device = device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16 policy" else None

    def autocast(self):
        if self.precision == "bf16 policy":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16 policy":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()

    def step(self, batch) -> float:
        set_tf32(self.precision != "fp32")
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model(**batch).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
        return loss.detach()


def final_loss(curve: list[float]) -> float:
    return statistics.median(curve[-max(1, len(curve) // 10) :])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = RNNSeq2SeqConfig(
        vocab_size=args.vocab_size,
        embedding_size=args.hidden_size,
        hidden_size=args.hidden_size,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        cell_type="lstm",
        bidirectional_encoder=True,
        attention_type="general",
        input_feeding=args.input_feeding,
        bridge="last",
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
    )
    initial = RNNSeq2SeqForConditionalGeneration(config).to(device).train()
    runs = {name: PrecisionRun(copy.deepcopy(initial), name, device) for name in PRECISIONS}
    for run in runs.values():
        run.model.flatten_recurrent_weights()
    batches = make_batches(args, device, args.steps)

    # Loss parity: every precision sees the same batches in the same order from the same weights.
    curves: dict[str, list[float]] = {}
    for name, run in runs.items():
        losses = [run.step(batch) for batch in batches]
        curves[name] = [float(loss) for loss in losses]
        print(f"{name:<12} loss {curves[name][0]:.3f} -> {final_loss(curves[name]):.3f}", flush=True)

    # Speed: interleaved rounds, each a few steps, median round per precision.
    samples: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    timing_batches = batches[: args.timing_steps]
    for _ in range(args.rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            for batch in timing_batches:
                run.step(batch)
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.length * args.timing_steps
    speed = {name: tokens / statistics.median(values) for name, values in samples.items()}

    final = {name: final_loss(curve) for name, curve in curves.items()}
    results = {
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "rnn_seq2seq_hf": rnn_seq2seq_hf.__version__,
        },
        "setup": vars(args),
        "target_tokens_per_second": speed,
        "speed_over_tf32": {name: speed[name] / speed["tf32"] for name in PRECISIONS},
        "final_loss": final,
        "final_loss_relative_difference_to_fp32": {name: final[name] / final["fp32"] - 1 for name in PRECISIONS},
        "loss_curves_every_10_steps": {name: curve[::10] for name, curve in curves.items()},
    }
    print(
        f"\n{results['machine']['device_name']}, batch {args.batch_size}, length {args.length}, "
        f"LSTM {args.layers}x{args.hidden_size}, {'input feeding' if args.input_feeding else 'fused decoder'}"
    )
    print(f"{'precision':<12} {'tokens/s':>10} {'vs tf32':>8} {'final loss':>11} {'vs fp32':>8}")
    for name in PRECISIONS:
        print(
            f"{name:<12} {speed[name]:>10.0f} {results['speed_over_tf32'][name]:>8.2f} {final[name]:>11.4f} "
            f"{results['final_loss_relative_difference_to_fp32'][name]:>+8.2%}"
        )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
