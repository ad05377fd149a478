"""A token stream read as parallel streams in consecutive windows: the data side of truncated backpropagation through
time (truncated BPTT) with a carried state, as every published RNN language model trains (Zaremba et al., 2014;
Merity et al., 2018).

The training text is one stream of N tokens. With S streams in all (the global batch: per-device batch x gradient
accumulation steps x processes) it is cut into S contiguous parts of N // S tokens (the N % S tokens left over, fewer
than S, are not trained on), laid side by side as the rows of a `[S, N // S]` matrix. An epoch reads that matrix from
left to right in windows: window w of length l holds the inputs `[:, s : s + l]` and the targets `[:, s + 1 : s + l
+ 1]`, so every token but the first of each part is a target exactly once per epoch, and the model's final state
after window w (carried by the trainer) is the right initial state for window w + 1.

How the S streams are shared out: process p reads the streams `p * k * b ... (p + 1) * k * b - 1` (a contiguous
block of the text, k accumulation steps of b streams each) and its micro-batch (slot) j the `b` streams starting at
`(p * k + j) * b`. So micro-batch j of every step continues the streams of micro-batch j of the previous step, each
process reads only its own streams, and the gradient of one step is the gradient of the whole `[S, l]` window: N
processes x k steps x b streams train exactly like one process with S streams.

Window lengths: a fixed `bptt` (the last window of an epoch is shorter), or random lengths as in AWD-LSTM (Merity et
al., 2018, section 4.1): the base length is `bptt` with probability 0.95 and `bptt / 2` otherwise, the length is drawn
from a normal distribution around it with standard deviation 5 (at least 5). Here the draws are rescaled to cover the
part exactly in a fixed number of windows, `ceil((N // S - 1) / bptt)`, so every epoch has the same number of steps
(as `Trainer` and the schedules expect) and every token is still a target once. The draws depend only on (seed,
epoch): every process and a resumed run see the same windows.

Shapes: a micro-batch is a dict with `input_ids`, `labels` (equal to `input_ids`, transformers' convention) and
`shift_labels` (the targets, already shifted: the last one is the token after the window), each `[b, l]`, plus the
position (`epoch`, `window`, `slot`) as Python integers, which the trainer pops before calling the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Keys of a micro-batch that say where it is; they are not model inputs.
POSITION_KEYS = ("epoch", "window", "slot")
RANDOM_LENGTH_SPREAD = 5.0  # standard deviation of a random window length (AWD-LSTM)
RANDOM_LENGTH_MIN = 5
RANDOM_LENGTH_HALF_PROBABILITY = 0.05  # the base length is bptt / 2 this often


@dataclass(frozen=True)
class TokenStream:
    """A training text as one token stream, and how truncated BPTT reads it.

    Args:
        tokens: `[N]` token ids of the whole text.
        bptt: window length (the truncation: gradients flow back at most this many steps).
        random_window_lengths: draw window lengths around `bptt` as AWD-LSTM does (see the module docstring).
        seed: seed of the random window lengths (with the epoch).
    """

    tokens: np.ndarray
    bptt: int
    random_window_lengths: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.bptt, bool) or not isinstance(self.bptt, int) or self.bptt < 1:
            raise ValueError(f"`bptt` (the window length) must be an integer >= 1, got {self.bptt!r}")
        if not isinstance(self.random_window_lengths, bool):
            raise ValueError(f"`random_window_lengths` must be True or False, got {self.random_window_lengths!r}")
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"`tokens` must be a 1-dimensional array of token ids, got {tokens.dtype} {tokens.shape}")
        object.__setattr__(self, "tokens", tokens.astype(np.int64, copy=False))

    def windows(
        self, streams_per_batch: int, micro_batches: int = 1, process_index: int = 0, num_processes: int = 1
    ) -> StreamWindows:
        """The windows one process reads: `streams_per_batch` streams per micro-batch, `micro_batches` micro-batches
        per optimizer step (gradient accumulation), this process of `num_processes`."""
        return StreamWindows(self, streams_per_batch, micro_batches, process_index, num_processes)


class StreamWindows:
    """The micro-batches of one process, epoch by epoch (see the module docstring).

    `len(self)` micro-batches per epoch: `num_windows` windows x `micro_batches` slots, in the order (window 0, slot
    0), (window 0, slot 1), ..., (window 1, slot 0), ...; one optimizer step per window.
    """

    def __init__(self, stream: TokenStream, streams_per_batch: int, micro_batches: int, process_index: int, processes):
        for name, value in (("streams_per_batch", streams_per_batch), ("micro_batches", micro_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not 0 <= process_index < processes:
            raise ValueError(f"`process_index` must be in [0, {processes}), got {process_index}")
        self.stream = stream
        self.streams_per_batch = streams_per_batch
        self.micro_batches = micro_batches
        self.process_index = process_index
        self.num_processes = processes
        self.num_streams = streams_per_batch * micro_batches * processes  # S, the global batch
        tokens = stream.tokens
        self.part_length = len(tokens) // self.num_streams
        if self.part_length < 2:
            raise ValueError(
                f"the training text has {len(tokens):,} tokens: too few for {self.num_streams} streams of at least 2 "
                "tokens (per-device batch x gradient accumulation x processes); use a smaller batch"
            )
        first = process_index * micro_batches * streams_per_batch
        rows = slice(first, first + micro_batches * streams_per_batch)
        parts = torch.from_numpy(tokens[: self.part_length * self.num_streams]).view(self.num_streams, -1)
        self.parts = parts[rows].contiguous()  # [k * b, N // S]: this process's streams
        self.num_windows = math.ceil((self.part_length - 1) / stream.bptt)

    def __len__(self) -> int:
        return self.num_windows * self.micro_batches

    def window_lengths(self, epoch: int) -> list[int]:
        """The window lengths of `epoch`: `num_windows` lengths >= 1 that sum to `part_length - 1`."""
        total, bptt, count = self.part_length - 1, self.stream.bptt, self.num_windows
        if not self.stream.random_window_lengths:
            return [bptt] * (count - 1) + [total - bptt * (count - 1)]
        generator = np.random.default_rng([self.stream.seed, epoch])
        bases = np.where(generator.random(count) < RANDOM_LENGTH_HALF_PROBABILITY, bptt / 2, bptt)
        draws = np.maximum(RANDOM_LENGTH_MIN, generator.normal(bases, RANDOM_LENGTH_SPREAD).astype(int))
        return rescale_to_total(draws, total)

    def window_starts(self, epoch: int) -> tuple[list[int], list[int]]:
        lengths = self.window_lengths(epoch)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        return starts, lengths

    def batch(self, epoch: int, index: int, starts_and_lengths=None) -> dict:
        """Micro-batch `index` (in [0, len(self))) of `epoch`."""
        if not 0 <= index < len(self):
            raise IndexError(f"micro-batch {index} of an epoch of {len(self)}")
        window, slot = divmod(index, self.micro_batches)
        starts, lengths = starts_and_lengths or self.window_starts(epoch)
        start, length = starts[window], lengths[window]
        rows = self.parts[slot * self.streams_per_batch : (slot + 1) * self.streams_per_batch]
        inputs = rows[:, start : start + length]
        return {
            "input_ids": inputs,
            "labels": inputs.clone(),
            "shift_labels": rows[:, start + 1 : start + length + 1].clone(),
            "epoch": epoch,
            "window": window,
            "slot": slot,
        }

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The micro-batches of `epoch` from index `start` on."""
        starts_and_lengths = self.window_starts(epoch)
        for index in range(start, len(self)):
            yield self.batch(epoch, index, starts_and_lengths)


def rescale_to_total(draws: np.ndarray, total: int) -> list[int]:
    """Integers >= 1 proportional to `draws` that sum to `total` (largest remainders get the rounding)."""
    count = len(draws)
    if total < count:
        raise ValueError(f"cannot cut {total} tokens into {count} windows")
    scaled = draws / draws.sum() * (total - count)  # share out what is above the minimum of 1 each
    lengths = np.floor(scaled).astype(int)
    remainder = total - count - int(lengths.sum())
    order = np.argsort(-(scaled - lengths), kind="stable")
    lengths[order[:remainder]] += 1
    return (lengths + 1).tolist()


# --- Trainer side: a DataLoader over one process's windows ---------------------------------------------------------


class _WindowDataset(Dataset):
    """Micro-batch i of the current epoch (set by the sampler's `set_epoch`)."""

    def __init__(self, windows: StreamWindows):
        self.windows = windows
        self.epoch = 0
        self._cached = None  # (epoch, window starts and lengths)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.windows.window_starts(self.epoch))
        return self.windows.batch(self.epoch, index, self._cached[1])


class _InOrderBatches(Sampler):
    """Yields `[0], [1], ...`: each micro-batch is one dataset item, read in order. `set_epoch` reaches the
    dataset (Trainer calls it, also through the batch sampler accelerate wraps around this one on resume)."""

    def __init__(self, dataset: _WindowDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        return iter([index] for index in range(len(self.dataset)))

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch


class StreamDataLoader(DataLoader):
    """A `DataLoader` over one process's windows, in order, with `set_epoch` (what `Trainer` calls each epoch).

    It is not meant for `accelerator.prepare`: each process already reads only its own streams.
    """

    def __init__(self, windows: StreamWindows, pin_memory: bool = False):
        dataset = _WindowDataset(windows)
        super().__init__(dataset, batch_sampler=_InOrderBatches(dataset), collate_fn=_only_item, pin_memory=pin_memory)
        self.windows = windows

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _only_item(items: list[dict]) -> dict:
    return items[0]


__all__ = ["POSITION_KEYS", "StreamDataLoader", "StreamWindows", "TokenStream", "rescale_to_total"]
