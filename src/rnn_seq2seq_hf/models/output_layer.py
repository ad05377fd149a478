"""The vocabulary projection shared by both model families, with optional weight tying."""

from __future__ import annotations

import torch
from torch import nn


class OutputLayer(nn.Module):
    """Features `[..., feature_size]` to vocabulary logits `[..., vocab_size]`.

    With `tie=True` the weight of `linear` (`[vocab_size, embedding_size]`) is tied to an input embedding by the
    model's tied-weights mapping (Press & Wolf, 2017). Tying needs features of the embedding size, so when
    `feature_size != embedding_size` a bias-free linear `projection` to the embedding size comes first.
    """

    def __init__(self, feature_size: int, embedding_size: int, vocab_size: int, tie: bool):
        super().__init__()
        needs_projection = tie and feature_size != embedding_size
        self.projection = nn.Linear(feature_size, embedding_size, bias=False) if needs_projection else None
        self.linear = nn.Linear(embedding_size if tie else feature_size, vocab_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            features = self.projection(features)
        return self.linear(features)


__all__ = ["OutputLayer"]
