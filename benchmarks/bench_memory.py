"""Peak memory of one training step on long sequences, with and without gradient checkpointing (issue 9 item 8).

Variants (sizes are arguments):
- LM: RNNLMForCausalLM, 2-layer LSTM, 2,000-token sequences;
- Seq2Seq, fused decoder: bi-LSTM encoder / LSTM decoder with general attention, a short source and a 1,000-token
  target;
- Seq2Seq, input feeding: the same with the step-by-step decoder.
Each is run without and with gradient checkpointing (`model.activation_checkpointing_enable()`, which
transformers 5.24 also calls `gradient_checkpointing_enable()`). A step is forward + backward (the optimizer's
state is the same either way and is left out). The loss and the gradient norm of both runs are printed and
compared: checkpointing must not change them.

How peak memory is measured:
- CPU: every run is a fresh Python process (`--worker`), so earlier runs leave nothing behind. It builds the model
  and the batch, runs one short warm-up step, reads its resident set size (RSS, /proc/self/statm), runs the long
  step and reads its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`). Reported: peak - RSS before the step.
  glibc returns large freed blocks to the system at once, so RSS follows the live tensors. Each run is repeated
  (`--repeats`, default 2) and the median (lower middle) run reported, all peaks kept in the JSON: the allocator
  makes single runs vary by about 10%.
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the memory allocated before
  the step (tensors only, without the allocator's cache).

When a model does not support gradient checkpointing yet (`model.supports_gradient_checkpointing` is False), the
checkpointed runs are skipped with a message saying so, and only the plain runs are measured.

    python benchmarks/bench_memory.py                      # CPU -> benchmarks/results/memory_cpu.json
    python benchmarks/bench_memory.py --device cuda        # one GPU -> benchmarks/results/memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_common import machine_info, write_json
from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM, RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration

VARIANTS = ("lm", "seq2seq-fused", "seq2seq-input-feeding")
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lm-length", type=int, default=2000, help="LM sequence length")
    parser.add_argument("--source-length", type=int, default=50)
    parser.add_argument("--target-length", type=int, default=1000, help="Seq2Seq target length")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="fresh runs of each variant (median reported)")
    parser.add_argument("--output", default=None, help="default benchmarks/results/memory_<device>.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    return parser.parse_args(argv)


def build(variant: str, args: argparse.Namespace, device: torch.device):
    """The model (train mode, no dropout) and a loss function of `length` (to warm up on a short input)."""
    torch.manual_seed(0)
    dropouts = dict(embedding_dropout=0.0, hidden_dropout=0.0, output_dropout=0.0)
    batch = args.batch_size
    if variant == "lm":
        config = RNNLMConfig(
            vocab_size=args.vocab_size,
            embedding_size=args.embedding_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            cell_type="lstm",
            **dropouts,
        )
        model = RNNLMForCausalLM(config).to(device).train()
        tokens = torch.randint(3, args.vocab_size, (batch, args.lm_length), device=device)

        def loss(length: int) -> torch.Tensor:
            return model(input_ids=tokens[:, :length], labels=tokens[:, :length]).loss

        return model, loss, args.lm_length
    config = RNNSeq2SeqConfig(
        vocab_size=args.vocab_size,
        embedding_size=args.embedding_size,
        hidden_size=args.hidden_size,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        cell_type="lstm",
        bidirectional_encoder=True,
        attention_type="general",
        input_feeding=variant == "seq2seq-input-feeding",
        **dropouts,
    )
    model = RNNSeq2SeqForConditionalGeneration(config).to(device).train()
    source = torch.randint(3, args.vocab_size, (batch, args.source_length), device=device)
    labels = torch.randint(3, args.vocab_size, (batch, args.target_length), device=device)

    def loss(length: int) -> torch.Tensor:
        return model(input_ids=source, attention_mask=torch.ones_like(source), labels=labels[:, :length]).loss

    return model, loss, args.target_length


def enable_checkpointing(model) -> None:
    """transformers 5.24 names it `activation_checkpointing_enable` (`gradient_checkpointing_enable` is its
    deprecated alias, which the former calls when a model overrides it); older versions have the alias only."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def current_rss() -> int:
    """Resident set size of this process, bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_one(variant: str, checkpointing: bool, args: argparse.Namespace) -> dict:
    """Build, warm up, and measure one training step's peak memory above what was in use before it."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, loss_fn, length = build(variant, args, device)
    if checkpointing:
        enable_checkpointing(model)
    loss_fn(4).backward()  # warm-up on a short input: lazy allocations, kernels chosen
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before, peak_before = current_rss(), peak_rss()
    start = time.perf_counter()
    loss = loss_fn(length)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        exceeded_earlier_peak = True
    else:
        # the kernel updates its high-water mark lazily (at unmaps), so also take the RSS now
        peak = max(peak_rss(), current_rss())
        exceeded_earlier_peak = peak > peak_before
    seconds = time.perf_counter() - start
    grad_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    ).item()
    return {
        "variant": variant,
        "gradient_checkpointing": checkpointing,
        "length": length,
        "peak_above_start_mib": (peak - before) / MIB,
        "in_use_before_mib": before / MIB,
        "step_exceeded_earlier_peak": exceeded_earlier_peak,
        "seconds": seconds,
        "loss": loss.item(),
        "grad_norm": grad_norm,
    }


def supports_checkpointing(variant: str) -> bool:
    cls = RNNLMForCausalLM if variant == "lm" else RNNSeq2SeqForConditionalGeneration
    return bool(getattr(cls, "supports_gradient_checkpointing", False))


def measure(variant: str, checkpointing: bool, args: argparse.Namespace, argv: list[str]) -> dict:
    """On a GPU in this process; on a CPU in a fresh subprocess, so that peak RSS belongs to this run alone."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        return run_one(variant, checkpointing, args)
    spec = json.dumps({"variant": variant, "checkpointing": checkpointing})
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", spec]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {variant} (checkpointing={checkpointing}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_repeated(variant: str, checkpointing: bool, args: argparse.Namespace, argv: list[str]) -> dict:
    """`args.repeats` runs; the row of the run with the median peak, with every run's peak alongside."""
    runs = sorted(
        (measure(variant, checkpointing, args, argv) for _ in range(max(1, args.repeats))),
        key=lambda row: row["peak_above_start_mib"],
    )
    row = dict(runs[(len(runs) - 1) // 2])
    row["peak_above_start_mib_all_runs"] = [run["peak_above_start_mib"] for run in runs]
    return row


def strip_output_args(argv: list[str]) -> list[str]:
    """The command-line arguments a worker needs: all but --output, --variants and --note (and their values)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--output", "--variants", "--note"):
            skip = True
            continue
        if item.startswith(("--output=", "--variants=", "--note=")):
            continue
        kept.append(item)
    return kept


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_one(spec["variant"], spec["checkpointing"], args)))
        return

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    worker_argv = strip_output_args(argv)
    results = {
        "machine": machine_info(device),
        "setup": {k: v for k, v in vars(args).items() if k not in ("worker", "note")},
        "note": args.note,
        "method": "peak RSS of a fresh process minus RSS before the step"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated minus memory_allocated before the step",
        "runs": {},
        "messages": [],
    }
    print(f"device {results['machine']['device_name']}, torch {torch.__version__}; {results['method']}")
    for variant in variants:
        rows = {"plain": measure_repeated(variant, False, args, worker_argv)}
        if supports_checkpointing(variant):
            rows["checkpointed"] = measure_repeated(variant, True, args, worker_argv)
            plain, checkpointed = rows["plain"], rows["checkpointed"]
            rows["memory_saved_fraction"] = (
                1 - checkpointed["peak_above_start_mib"] / plain["peak_above_start_mib"]
                if plain["peak_above_start_mib"] > 0
                else None  # too small to see
            )
            rows["same_loss_and_gradient_norm"] = bool(
                abs(plain["loss"] - checkpointed["loss"]) <= 1e-5 * abs(plain["loss"])
                and abs(plain["grad_norm"] - checkpointed["grad_norm"]) <= 1e-4 * abs(plain["grad_norm"])
            )
        else:
            message = (
                f"{variant}: the model does not support gradient checkpointing yet "
                "(supports_gradient_checkpointing is False); measured without it only"
            )
            results["messages"].append(message)
            print(message)
        results["runs"][variant] = rows
        for name in ("plain", "checkpointed"):
            if name in rows:
                row = rows[name]
                flag = "" if row["step_exceeded_earlier_peak"] else "  (did not exceed the start-up peak: a bound)"
                print(
                    f"  {variant:<22} {name:<13} length {row['length']:>5}: peak +{row['peak_above_start_mib']:8.1f} "
                    f"MiB, {row['seconds']:6.2f} s, loss {row['loss']:.6f}, grad norm {row['grad_norm']:.6f}{flag}"
                )
        if rows.get("memory_saved_fraction") is not None:
            print(
                f"  {variant:<22} saved {rows['memory_saved_fraction']:.0%} of the peak; same loss and gradient "
                f"norm: {rows['same_loss_and_gradient_norm']}"
            )
    output = args.output or f"benchmarks/results/memory_{device.type}.json"
    print(f"\nwrote {write_json(output, results)}")


if __name__ == "__main__":
    main()
