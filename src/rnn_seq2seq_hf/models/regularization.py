"""Dropout layers of the recurrent models.

`Dropout` is `nn.Dropout` that costs nothing when it does nothing: in evaluation mode, or with p = 0, it returns its
input without issuing an operation (every operation is a kernel launch on a GPU, and decoding runs one step at a
time).

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


__all__ = ["Dropout"]
