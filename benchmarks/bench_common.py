"""Pieces shared by the benchmark scripts: timing, op counting, machine description, the training bounds, the
hand-written loops over the model's forward, and JSON output.

Timing: variants run in interleaved rounds (A, B, C, A, B, C, ...) after one warm-up call each, and the median
round is reported, so a slow drift of the machine (another process waking up) hits every variant alike. On a GPU
every timed call is bracketed by `torch.cuda.synchronize`, so a time is the wall time of the work, not of its launch.

Op counting (`count_ops`): the torch profiler (CPU activity only) records every aten operator call with its parent
range. An op is *top level* when no enclosing range is itself an `aten::` op: it was issued by Python code (ours,
transformers', the optimizer's) or by the autograd engine (one backward function's ops), not by another op's
implementation. `aten::linear` counts as one op, its `aten::addmm` inside does not; a view (`aten::view`,
`aten::transpose`) issued from Python counts as one. On a GPU each top-level op is at least one kernel launch or
one host-side dispatch, so the count is what a launch-bound step costs. `non_view_ops` leaves out the ops that
only make a view (`VIEW_OPS`: no kernel on a GPU); `aten::reshape` and `aten::flatten` are counted as views, which
they are on the contiguous tensors of these models. The count is deterministic: the same call
gives the same number every time. `aten::_local_scalar_dense` events (at any depth) are reads of a tensor value by
the host (`.item()`, `bool(tensor)`, `int(tensor)`): on a GPU each one is a synchronisation. Calls of
`Tensor.tolist`, `Tensor.numpy` and `Tensor.cpu` read values without that op (a device-to-host copy on a GPU), so
they are counted as host reads too, by wrapping those methods while the call runs.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import rnn_seq2seq_hf
from rnn_seq2seq_hf import RNNSeq2SeqConfig

SYNC_OP = "aten::_local_scalar_dense"
COPYING_READS = ("tolist", "numpy", "cpu")  # host reads that do not go through SYNC_OP
# Ops that only make a new view of existing memory (no kernel on a GPU, only host-side dispatch). Reported
# separately, since a launch-bound GPU step pays mostly for the others.
VIEW_OPS = frozenset(
    "aten::" + name
    for name in [
        "alias",
        "as_strided",
        "detach",
        "expand",
        "narrow",
        "permute",
        "reshape",
        "select",
        "slice",
        "squeeze",
        "t",
        "transpose",
        "unflatten",
        "unsqueeze",
        "view",
        "view_as",
        "flatten",
    ]
)


# ---------------------------------------------------------------------------------------------------------------
# Machine and output
# ---------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What a reader needs to compare two result files: device, CPU, threads, versions, load."""
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "rnn_seq2seq_hf": rnn_seq2seq_hf.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def write_json(path: str | Path, results: dict) -> Path:
    """Write `results` to `path` through a temporary sibling and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        results.setdefault("machine", {})["load_average_at_end"] = list(os.getloadavg())
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(json.dumps(results, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    repeats: int = 1,
    order: Callable[[int], list[str]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant in every round: rounds interleave the variants, and each round times
    `repeats` back-to-back calls of a variant and divides by `repeats`. One untimed warm-up call each first.
    `order(round)` gives the variants' order in that round (default: as given), so that no variant always runs
    right after the same other one."""
    for fn in variants.values():
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name in order(round_index) if order else variants:
            fn = variants[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / repeats)
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# Op counting
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class OpCount:
    """Top-level aten ops of one profiled call, and the host reads of tensor values (syncs on a GPU)."""

    ops: int
    syncs: int
    by_name: dict[str, int] = field(default_factory=dict)

    @property
    def non_view_ops(self) -> int:
        return sum(count for name, count in self.by_name.items() if name not in VIEW_OPS)


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Profile one call of `fn` and count its top-level `aten::` ops (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    copies = [0]
    saved = {name: getattr(torch.Tensor, name) for name in COPYING_READS}

    def counting(method):
        def counted(tensor, *args, **kwargs):
            copies[0] += 1
            return method(tensor, *args, **kwargs)

        return counted

    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, counting(method))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
    names: collections.Counter[str] = collections.Counter()
    syncs = copies[0]
    for event in prof.events():
        if event.name == SYNC_OP:
            syncs += 1
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names[event.name] += 1
    return OpCount(ops=sum(names.values()), syncs=syncs, by_name=dict(names.most_common()))


def per_step(long: OpCount, short: OpCount, extra_steps: int) -> dict[str, float]:
    """Ops, non-view ops and syncs of one more step: (long - short) / extra_steps, which removes the fixed setup of
    a call."""
    return {
        "ops_per_step": (long.ops - short.ops) / extra_steps,
        "non_view_ops_per_step": (long.non_view_ops - short.non_view_ops) / extra_steps,
        "syncs_per_step": (long.syncs - short.syncs) / extra_steps,
    }


# ---------------------------------------------------------------------------------------------------------------
# Training: the bounds of bench_seq2seq.py
# ---------------------------------------------------------------------------------------------------------------


class BareStacks(nn.Module):
    """The bound: embeddings, a bidirectional LSTM encoder and an LSTM decoder of the model's sizes, and optionally
    the vocabulary projection (bound B with it, bound A without). No attention, no bridge."""

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
    """One training step (zero_grad, forward, backward, Adam) of `module` with the loss `loss_fn()`."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    step.optimizer = optimizer  # so op counting can profile the optimizer step alone
    return step


def count_training_ops(step: Callable[[], None], loss_fn: Callable[[], torch.Tensor]) -> dict:
    """Top-level ops of one training step, split into forward + backward and the optimizer step.

    `step` must come from `training_step_fn` (it carries its optimizer); the step is run once first so that the
    optimizer's state exists and the counted step is a steady-state one.
    """
    step()
    optimizer = step.optimizer
    optimizer.zero_grad(set_to_none=True)
    forward_backward = count_ops(lambda: loss_fn().backward())
    update = count_ops(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    return {
        "ops_forward_backward": forward_backward.ops,
        "non_view_ops_forward_backward": forward_backward.non_view_ops,
        "ops_optimizer_step": update.ops,
        "ops_total": forward_backward.ops + update.ops,
        "syncs_forward_backward": forward_backward.syncs,
        "top_ops_forward_backward": forward_backward.by_name,
    }


# ---------------------------------------------------------------------------------------------------------------
# Hand-written loops over the model's own forward (and cache): the model's cost without generate()
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def handwritten_greedy(model, source, mask, steps: int) -> torch.Tensor:
    """Greedy decoding calling the Seq2Seq model's forward with its cache, no generate(). Returns `[B, 1 + steps]`."""
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
    """Fixed-length beam search (no EOS handling) calling the Seq2Seq model's forward with its cache, no
    generate(). Returns all beams, `[B * beams, 1 + steps]`, best beam of each sentence first."""
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
