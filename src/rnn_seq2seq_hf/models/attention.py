"""Attention scores over the encoder outputs: dot, general (bilinear) and additive.

Notation: memory m_s are the encoder outputs `[B, S, H]`, queries q_t are decoder vectors `[B, T, H]`.
- dot (Luong et al., 2015, eq. 8):      score(q, m) = q . m
- general (Luong, eq. 8):               score(q, m) = q . (W_a m)
- additive (Bahdanau et al., 2015, eq. 6; Luong's "concat" is the same form):
                                        score(q, m) = v . tanh(W_q q + W_k m)
The memory-side transform (W_a m, W_k m) does not depend on the query, so `project_memory` computes it once per
source sentence ("keys", already in the layout `score` multiplies with) and decoding reuses it at every step.
Padding positions of the source get no weight.
"""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Base class: masked softmax over scores and the weighted sum of the memory."""

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """Keys from memory `[B, S, H]`, in the layout `score` reads."""
        return memory

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores `[B, T, S]` from queries `[B, T, H]` and `project_memory(memory)`."""
        raise NotImplementedError

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, padding: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend with every query over the memory.

        Args:
            query: `[B, T, H]`.
            memory: `[B, S, H]`, the encoder outputs.
            keys: `project_memory(memory)`.
            padding: `[B, 1, S]` bool, True at source padding (see `padding_mask`), or None.

        Returns:
            context `[B, T, H]` and weights `[B, T, S]` (each row sums to 1 over the real source tokens).
        """
        scores = self.score(query, keys)  # [B, T, S]
        if padding is not None:
            scores = scores.masked_fill(padding, float("-inf"))
        # softmax in fp32 (one op: its dtype argument casts first), weights back in the query's dtype under autocast
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if weights.dtype != query.dtype:
            weights = weights.to(query.dtype)
        return torch.bmm(weights, memory), weights


def padding_mask(memory_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`[B, 1, S]` True at source padding, from a `[B, S]` mask that is True at real tokens (None: no padding).
    Computed once per call, not at every decoding step."""
    return None if memory_mask is None else ~memory_mask[:, None, :]


class DotAttention(Attention):
    """score(q, m) = q . m; the query and memory sizes must match. Keys are stored transposed, `[B, H, S]`."""

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        return memory.transpose(1, 2)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys)


class GeneralAttention(DotAttention):
    """score(q, m) = q . (W_a m), a bilinear form. Keys `[B, H, S]`."""

    def __init__(self, query_size: int, memory_size: int):
        super().__init__()
        self.memory_projection = nn.Linear(memory_size, query_size, bias=False)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        return self.memory_projection(memory).transpose(1, 2)


class AdditiveAttention(Attention):
    """score(q, m) = v . tanh(W_q q + W_k m), Bahdanau's form, also Luong's "concat"."""

    def __init__(self, query_size: int, memory_size: int, attention_size: int):
        super().__init__()
        self.query_projection = nn.Linear(query_size, attention_size, bias=False)
        self.memory_projection = nn.Linear(memory_size, attention_size, bias=True)
        self.energy = nn.Linear(attention_size, 1, bias=False)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        return self.memory_projection(memory)

    def score(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        projected = self.query_projection(query)  # [B, T, A]
        energies = torch.tanh(projected[:, :, None, :] + keys[:, None, :, :])  # [B, T, S, A]
        return self.energy(energies).squeeze(-1)  # [B, T, S]


def build_attention(attention_type: str, hidden_size: int) -> Attention | None:
    """The attention module for a decoder of `hidden_size` over encoder outputs of `hidden_size`."""
    if attention_type == "none":
        return None
    if attention_type == "dot":
        return DotAttention()
    if attention_type == "general":
        return GeneralAttention(hidden_size, hidden_size)
    if attention_type in ("bahdanau", "concat"):
        return AdditiveAttention(hidden_size, hidden_size, hidden_size)
    raise ValueError(
        f"`attention_type` must be one of ['none', 'bahdanau', 'dot', 'general', 'concat'], got {attention_type!r}."
    )


__all__ = ["AdditiveAttention", "Attention", "DotAttention", "GeneralAttention", "build_attention", "padding_mask"]
