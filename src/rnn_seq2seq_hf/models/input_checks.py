"""Checks of model inputs, so bad input is a clear `ValueError` and never an IndexError deep inside torch.

An out-of-range token id would otherwise fail inside `nn.Embedding` (on a GPU as an unreadable device-side assert),
and a mask of the wrong shape could broadcast into a silently wrong answer.

Checks of shapes, types and dtypes cost nothing. Checks of *values* (token ids in range, masks of 0 and 1) read the
tensor on the host, which stalls a GPU; they run once per `forward` call on the whole input, never inside the
decoding loop of `generate()` (which feeds only tokens it produced itself), and not while `torch.export` traces the
model (the traced program cannot branch on values).

One forward call checks several inputs (labels, source ids and mask, decoder ids). `read_values_once` reads all of
their values in one go before the call runs, and the checks inside the call then skip their own reads of the same
(unchanged) tensors: one host synchronisation per forward call instead of one per input, the same errors.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import torch


def values_checkable() -> bool:
    """False while `torch.export` / `torch.jit.trace` records the model."""
    return not (torch.compiler.is_exporting() or torch.jit.is_tracing())


def check_token_ids(input_ids: object, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """Return `input_ids` as an int32/int64 tensor; raise unless it is a non-empty `[B, T]` tensor of integer token
    ids in [0, vocab_size). Other integer dtypes (uint8, int16, ...) are converted to int64."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor of shape [batch, length], got {type(input_ids).__name__}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`{name}` must have shape [batch, length], got shape {tuple(input_ids.shape)}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids (int64 or int32), got dtype {input_ids.dtype}.")
    if input_ids.dtype not in (torch.int64, torch.int32):
        input_ids = input_ids.long()
    check_not_empty(input_ids.shape, name)
    if values_checkable() and _already_read(input_ids) is None:
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host read
        _judge_token_ids(input_ids, low, high, vocab_size, name)
    return input_ids


def _judge_token_ids(input_ids: torch.Tensor, low: int, high: int, vocab_size: int, name: str) -> None:
    if low < 0 or high >= vocab_size:
        out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
        bad = input_ids[out_of_range]
        raise ValueError(
            f"`{name}` holds token ids outside [0, vocab_size={vocab_size}): found "
            f"{bad.min().item()}..{bad.max().item()} ({int(out_of_range.sum())} positions). "
            "Was the tokenizer trained with a larger vocabulary?"
        )


def check_inputs_embeds(inputs_embeds: object, embedding_size: int, name: str = "inputs_embeds") -> torch.Tensor:
    """Raise unless `inputs_embeds` is a non-empty floating-point tensor `[B, T, embedding_size]`."""
    if not isinstance(inputs_embeds, torch.Tensor):
        raise ValueError(
            f"`{name}` must be a torch tensor of shape [batch, length, {embedding_size}], "
            f"got {type(inputs_embeds).__name__}."
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != embedding_size:
        raise ValueError(
            f"`{name}` must have shape [batch, length, {embedding_size}], got {tuple(inputs_embeds.shape)}."
        )
    if not inputs_embeds.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {inputs_embeds.dtype}.")
    check_not_empty(inputs_embeds.shape, name)
    return inputs_embeds


def check_not_empty(shape: torch.Size, name: str) -> None:
    """Raise for a batch without rows or positions."""
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"`{name}` is empty (shape {tuple(shape)}): give at least one sequence of at least one token."
        )


class Padding(NamedTuple):
    """A checked padding mask that has padding.

    Attributes:
        mask: `[B, T]` bool, True at real tokens.
        lengths: `[B]` int64 on the CPU, real tokens per row (what packing needs); None while tracing.
    """

    mask: torch.Tensor
    lengths: torch.Tensor | None


def check_padding(
    attention_mask: torch.Tensor | Padding | None,
    batch_size: int,
    length: int,
    name: str = "attention_mask",
    past_length: int = 0,
    allow_empty_rows: bool = True,
) -> Padding | None:
    """Validate a padding mask; return it as a `Padding`, or None when it has no padding (or is None).

    During generation transformers passes the mask of the whole sequence so far (`past_length + length` columns);
    only its last `length` columns describe the new tokens. Values (0 and 1 only), empty rows and the row lengths
    are read from the device in one go. An already checked `Padding` is returned as it is.
    """
    if attention_mask is None or isinstance(attention_mask, Padding):
        return attention_mask
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch tensor, got {type(attention_mask).__name__}.")
    allowed = [(batch_size, length)] + ([(batch_size, past_length + length)] if past_length else [])
    if not any(tuple(attention_mask.shape) == shape for shape in allowed):
        expected = " or ".join(str(shape) for shape in allowed)
        raise ValueError(
            f"`{name}` must have shape {expected} to match the inputs, got {tuple(attention_mask.shape)}."
        )
    if attention_mask.shape[1] != length:
        attention_mask = attention_mask[:, -length:]
    if not values_checkable():
        return Padding(attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool(), None)
    known = _already_read(attention_mask)
    if isinstance(known, list):
        lengths = known
    elif attention_mask.dtype == torch.bool:
        lengths = attention_mask.sum(dim=1).tolist()  # one host read
    else:
        low, high, *lengths = _mask_values(attention_mask).tolist()  # one host read
        _judge_mask_values(low, high, name)
    if not allow_empty_rows and min(lengths) == 0:
        rows = [row for row, count in enumerate(lengths) if count == 0]
        raise ValueError(
            f"`{name}` rows {rows[:10]} contain only padding. Every sequence needs at least one token "
            "(tokenize an empty text with its special tokens, e.g. EOS, or drop it from the batch)."
        )
    if min(lengths) == length:
        return None  # every position is a token
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
    return Padding(mask, torch.tensor(lengths, dtype=torch.long))


def _mask_values(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[low, high, length of row 0, length of row 1, ...]` of a `[B, T]` mask, on its device."""
    values = attention_mask.long() if attention_mask.dtype == torch.bool else attention_mask
    return torch.cat([torch.stack(torch.aminmax(values)).long(), attention_mask.sum(dim=1, dtype=torch.long)])


def _judge_mask_values(low: int, high: int, name: str) -> None:
    if low < 0 or high > 1:
        raise ValueError(f"`{name}` must hold only 0 (padding) and 1 (token), found values in {low}..{high}.")


def check_labels(labels: object, shape: tuple | None, vocab_size: int, name: str = "labels") -> None:
    """Raise unless `labels` is `[B, T]` (exactly `shape` if given, T >= 1) and holds token ids or -100 (ignored)."""
    check_labels_form(labels, shape, name)
    if not values_checkable() or _already_read(labels) is not None:
        return
    low, high = _label_values(labels).tolist()  # one host read
    _judge_labels(labels, low, high, vocab_size, name)


def check_labels_form(labels: object, shape: tuple | None, name: str = "labels") -> None:
    """The checks of `check_labels` that read no values: type, dtype and shape."""
    expected = "[batch, length]" if shape is None else str(tuple(shape))
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor of shape {expected}, got {type(labels).__name__}.")
    if labels.dim() != 2 or (shape is not None and tuple(labels.shape) != tuple(shape)):
        raise ValueError(f"`{name}` must have shape {expected} (one target per position), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer token ids (or -100), got dtype {labels.dtype}.")
    if labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(labels.shape)}): give at least one target token per row.")


def _label_values(labels: torch.Tensor) -> torch.Tensor:
    """`[low, high]` of the labels other than -100 (read as 0), on their device."""
    return torch.stack(torch.aminmax(labels.masked_fill(labels == -100, 0)))


def _judge_labels(labels: torch.Tensor, low: int, high: int, vocab_size: int, name: str) -> None:
    if low < 0 or high >= vocab_size:
        invalid = ((labels < 0) | (labels >= vocab_size)) & (labels != -100)
        raise ValueError(
            f"`{name}` must be token ids in [0, vocab_size={vocab_size}) or -100 (ignored), "
            f"found {labels[invalid][0].item()}."
        )


# --- one read for the inputs of a forward call ----------------------------------------------------------------------

# {id(tensor): (tensor, its version when read, what the read gave: None for token ids and labels, the row lengths of
# a mask)} for the inputs read by the enclosing `read_values_once`
_READ: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rnn_seq2seq_hf_read_inputs", default=None)


def _already_read(tensor: torch.Tensor):
    """What `read_values_once` read for this very tensor, unchanged since (True or the row lengths), else None."""
    read = _READ.get()
    entry = None if read is None else read.get(id(tensor))
    if entry is None or entry[0] is not tensor or entry[1] != tensor._version:
        return None
    return True if entry[2] is None else entry[2]


def leading_shape(tensor: object) -> tuple[int, int] | None:
    """`(B, T)` of a `[B, T, ...]` tensor, else None."""
    return tuple(tensor.shape[:2]) if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 else None


def _token_ids_ready(tensor: object) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dim() == 2
        and tensor.dtype in (torch.int64, torch.int32)
        and tensor.shape[0] > 0
        and tensor.shape[1] > 0
    )


def _labels_ready(tensor: object, shape: tuple | None) -> bool:
    try:
        check_labels_form(tensor, shape)
    except ValueError:
        return False
    return True


def _mask_ready(tensor: object, shape: tuple | None) -> bool:
    return isinstance(tensor, torch.Tensor) and shape is not None and tuple(tensor.shape) == tuple(shape)


def _well_formed(kind: str, tensor: object, shape: tuple | None) -> bool:
    """Whether the input passes its check's type, dtype and shape tests (so its values can be read)."""
    if kind == "ids":
        return _token_ids_ready(tensor)
    if kind == "labels":
        return _labels_ready(tensor, shape)
    return _mask_ready(tensor, shape)


@contextlib.contextmanager
def read_values_once(vocab_size: int, inputs: list[tuple[str, str, object, tuple | None]]) -> Iterator[None]:
    """Check the values of a forward call's inputs with one host read; inside the block, the checks of the same
    tensors (`check_token_ids`, `check_labels`, `check_padding`) skip their reads.

    `inputs`: `(kind, name, tensor, shape)` in the order the call checks them, kind "ids", "labels" or "mask";
    `shape` is the `[B, T]` a mask or labels must have (None: labels of any shape; a mask is not read here).
    None inputs are skipped. Values are read for the inputs up to the first malformed one (wrong type, dtype or
    shape), which the call's own check then reports as before; the errors are the individual checks' own, raised
    in the same order.
    """
    if not values_checkable():
        yield
        return
    ready = []
    for kind, name, tensor, shape in inputs:
        if tensor is None or (isinstance(tensor, torch.Tensor) and _already_read(tensor) is not None):
            continue  # absent, or read by an enclosing call
        if kind == "mask" and (shape is None or isinstance(tensor, Padding)):
            continue  # its shape is the caller's check to make (a mask covering cached positions), or checked
        if not _well_formed(kind, tensor, shape):
            break
        ready.append((kind, name, tensor))
    if not ready:
        yield
        return
    pieces = [
        torch.stack(torch.aminmax(tensor))
        if kind == "ids"
        else _label_values(tensor)
        if kind == "labels"
        else _mask_values(tensor)
        for kind, name, tensor in ready
    ]
    values = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).tolist()  # the one host read
    read, offset = dict(_READ.get() or {}), 0
    for (kind, name, tensor), piece in zip(ready, pieces, strict=True):
        low, high, *lengths = values[offset : offset + piece.numel()]
        offset += piece.numel()
        if kind == "ids":
            _judge_token_ids(tensor, low, high, vocab_size, name)
        elif kind == "labels":
            _judge_labels(tensor, low, high, vocab_size, name)
        else:
            _judge_mask_values(low, high, name)
        read[id(tensor)] = (tensor, tensor._version, lengths if kind == "mask" else None)
    token = _READ.set(read)
    try:
        yield
    finally:
        _READ.reset(token)


# Trainer passes `num_items_in_batch` so the loss stays right under gradient accumulation; any other extra keyword
# is a typo and raises instead of being silently ignored.
LOSS_KWARGS = frozenset({"num_items_in_batch"})


def check_extra_kwargs(kwargs: dict, owner: str) -> None:
    """Raise a TypeError for keyword arguments `forward()` does not know."""
    unknown = sorted(set(kwargs) - LOSS_KWARGS)
    if unknown:
        raise TypeError(f"{owner}.forward() got unexpected keyword arguments {unknown}.")


__all__ = [
    "Padding",
    "check_extra_kwargs",
    "check_inputs_embeds",
    "check_labels",
    "check_labels_form",
    "check_not_empty",
    "check_padding",
    "check_token_ids",
    "leading_shape",
    "read_values_once",
    "values_checkable",
]
