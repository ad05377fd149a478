"""Checks of model inputs, so bad input is a clear `ValueError` and never an IndexError deep inside torch.

An out-of-range token id would otherwise fail inside `nn.Embedding` (on a GPU as an unreadable device-side assert),
and a mask of the wrong shape could broadcast into a silently wrong answer.

Checks of shapes, types and dtypes cost nothing. Checks of *values* (token ids in range, masks of 0 and 1) read the
tensor on the host, which stalls a GPU; they run once per `forward` call on the whole input, never inside the
decoding loop of `generate()` (which feeds only tokens it produced itself), and not while `torch.export` traces the
model (the traced program cannot branch on values).
"""

from __future__ import annotations

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
    if values_checkable():
        low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host read
        if low < 0 or high >= vocab_size:
            out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
            bad = input_ids[out_of_range]
            raise ValueError(
                f"`{name}` holds token ids outside [0, vocab_size={vocab_size}): found "
                f"{bad.min().item()}..{bad.max().item()} ({int(out_of_range.sum())} positions). "
                "Was the tokenizer trained with a larger vocabulary?"
            )
    return input_ids


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
    if attention_mask.dtype == torch.bool:
        lengths = attention_mask.sum(dim=1).tolist()
    else:
        low, high, *lengths = torch.cat(
            [torch.stack(torch.aminmax(attention_mask)).long(), attention_mask.sum(dim=1, dtype=torch.long)]
        ).tolist()
        if low < 0 or high > 1:
            raise ValueError(f"`{name}` must hold only 0 (padding) and 1 (token), found values in {low}..{high}.")
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


def check_labels(labels: object, shape: tuple | None, vocab_size: int) -> None:
    """Raise unless `labels` is `[B, T]` (exactly `shape` if given, T >= 1) and holds token ids or -100 (ignored)."""
    expected = "[batch, length]" if shape is None else str(tuple(shape))
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`labels` must be a tensor of shape {expected}, got {type(labels).__name__}.")
    if labels.dim() != 2 or (shape is not None and tuple(labels.shape) != tuple(shape)):
        raise ValueError(f"`labels` must have shape {expected} (one target per position), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must hold integer token ids (or -100), got dtype {labels.dtype}.")
    if labels.shape[0] == 0 or labels.shape[1] == 0:
        raise ValueError(f"`labels` is empty (shape {tuple(labels.shape)}): give at least one target token per row.")
    if not values_checkable():
        return
    low, high = torch.stack(torch.aminmax(labels.masked_fill(labels == -100, 0))).tolist()  # one host read
    if low < 0 or high >= vocab_size:
        invalid = ((labels < 0) | (labels >= vocab_size)) & (labels != -100)
        raise ValueError(
            f"`labels` must be token ids in [0, vocab_size={vocab_size}) or -100 (ignored), "
            f"found {labels[invalid][0].item()}."
        )


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
    "check_not_empty",
    "check_padding",
    "check_token_ids",
    "values_checkable",
]
