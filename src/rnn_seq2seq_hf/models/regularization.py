"""Dropout layers and the regularisers of recurrent language models.

- `Dropout`: `nn.Dropout` that costs nothing when it does nothing: in evaluation mode, or with p = 0, it returns its
  input without issuing an operation (every operation is a kernel launch on a GPU, and decoding runs one step at a
  time).
- `LockedDropout`: variational dropout (Gal & Ghahramani, 2016, "A Theoretically Grounded Application of Dropout in
  Recurrent Neural Networks"): one mask per sequence and feature, the same at every time step.
- `word_dropout`: drops whole words (Gal & Ghahramani, 2016, section 4; `dropoute` of AWD-LSTM, Merity et al., 2018,
  "Regularizing and Optimizing LSTM Language Models"): every occurrence of a dropped word type in the batch gets a
  zero embedding, the others are scaled by 1 / (1 - p).
- `drop_weights`: DropConnect on a weight matrix (Wan et al., 2013; applied to the hidden-to-hidden matrices by
  AWD-LSTM): one mask per forward call, shared by every time step and every sequence of the batch.
- `activation_regularization`: AR and TAR (Merity et al., 2017, "Revisiting Activation Regularization for Language
  RNNs"), the L2 penalties on the top layer's outputs and on their change from one step to the next.

Every random draw goes through `torch`'s global generator, so a run is reproducible from its seed (and a checkpoint
that stores the generator states resumes the same masks).

This file imports only installed packages, so it travels with the weights for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """`nn.Dropout` that returns its input unchanged (no operation at all) when inactive."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return inputs
        return super().forward(inputs)


def locked_dropout_mask(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """A mask `[B, 1, D]` for `inputs` `[B, T, D]`: 0 with probability p, else 1 / (1 - p)."""
    keep = 1.0 - p
    return inputs.new_empty(inputs.shape[0], 1, inputs.shape[2]).bernoulli_(keep).div_(keep)


class LockedDropout(Dropout):
    """Variational ("locked") dropout over `[B, T, D]` inputs: the same mask at every time step of a sequence.

    Gal & Ghahramani (2016) show that dropout on an RNN's inputs and outputs is a variational approximation only if
    the mask is fixed over time; AWD-LSTM uses it on the embeddings, between layers and on the outputs. Inactive in
    evaluation mode or with p = 0 (no operation at all, like `Dropout`).
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return inputs
        return inputs * locked_dropout_mask(inputs, self.p)


def word_dropout(embeddings: torch.Tensor, input_ids: torch.Tensor, p: float, vocab_size: int) -> torch.Tensor:
    """Drop whole word types: `embeddings` `[B, T, E]` of `input_ids` `[B, T]`, with every occurrence of a dropped
    word zeroed and the rest scaled by 1 / (1 - p).

    Equal to looking the ids up in an embedding matrix whose rows were dropped with probability p (AWD-LSTM's
    `embedded_dropout`), without building the dropped `[V, E]` matrix: the row mask `[V]` is gathered at the ids.
    """
    keep = 1.0 - p
    row_mask = embeddings.new_empty(vocab_size).bernoulli_(keep).div_(keep)  # [V]
    return embeddings * row_mask[input_ids].unsqueeze(-1)


def drop_weights(weight: torch.Tensor, p: float) -> torch.Tensor:
    """DropConnect: `weight` with each entry zeroed with probability p and the rest scaled by 1 / (1 - p)."""
    return nn.functional.dropout(weight, p, training=True)


def activation_regularization(
    dropped: torch.Tensor,
    undropped: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    beta: float,
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """AR + TAR (Merity et al., 2017), normalised like the token loss.

    AR = alpha * sum over valid positions t of mean_j(dropped[t, j] ** 2) / N,
    TAR = beta * sum over t with t and t - 1 valid of mean_j((undropped[t, j] - undropped[t - 1, j]) ** 2) / N,

    with N the number of target tokens (`num_items`, the count of the whole accumulated batch when training with
    gradient accumulation or several processes, else the valid positions here). Without padding and with
    N = B * T, AR is AWD-LSTM's `alpha * dropped.pow(2).mean()` and TAR its `beta * (h[1:] - h[:-1]).pow(2).mean()`
    times (T - 1) / T.

    Args:
        dropped: `[B, T, H]` the top layer's outputs after output dropout (AR penalises what the output layer sees).
        undropped: `[B, T, H]` the same outputs before dropout (TAR penalises the change of the state itself).
        valid: `[B, T]` bool, True where the position has a target.
        alpha, beta: the weights of AR and TAR (0 leaves a term out).
        num_items: N, or None to count `valid`.

    Returns:
        a scalar tensor.
    """
    valid = valid.to(torch.float32)
    count = valid.sum() if num_items is None else num_items
    count = torch.as_tensor(count, device=dropped.device).clamp(min=1)  # no target at all: 0, not NaN
    total = dropped.new_zeros((), dtype=torch.float32)
    if alpha:
        total = total + alpha * (dropped.float().pow(2).mean(-1) * valid).sum()
    if beta and undropped.shape[1] > 1:
        change = (undropped[:, 1:] - undropped[:, :-1]).float().pow(2).mean(-1)  # [B, T - 1]
        total = total + beta * (change * valid[:, 1:] * valid[:, :-1]).sum()
    return total / count


__all__ = [
    "Dropout",
    "LockedDropout",
    "activation_regularization",
    "drop_weights",
    "locked_dropout_mask",
    "word_dropout",
]
