"""The training loss of both engines, label smoothing included: one definition for Trainer and the Accelerate loop.

Label smoothing (Szegedy et al., 2016) mixes the one-hot target with the uniform distribution over the vocabulary:

    loss_t = (1 - eps) * (-log p(y_t)) + eps * mean_v(-log p(v))

which is `torch.nn.functional.cross_entropy(..., label_smoothing=eps)` and what transformers' `LabelSmoother`
computes. The per-token losses are *summed* and divided by `num_items_in_batch`, the target-token count of the whole
accumulated (and, in data-parallel runs, global) batch, so k accumulated micro-batches give the loss and gradient
of one big batch.

Which labels count: position t of a Seq2Seq model's logits predicts `labels[t]` (no shift); a causal LM's position
t predicts `labels[t + 1]` (`shift=True`), as in every causal LM of transformers. Labels of -100 are ignored.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def target_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The labels each logit position predicts: `labels[:, 1:]` for a causal LM, `labels` for a Seq2Seq model."""
    return labels[:, 1:] if shift else labels


def count_target_tokens(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Target tokens of a batch counted the way `sequence_loss` counts them (a 0-d long tensor)."""
    return (target_labels(labels, shift) != -100).sum()


def sequence_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    label_smoothing: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-level cross-entropy, optionally label-smoothed, summed and divided by the token count.

    Args:
        logits: `[B, T, V]`.
        labels: `[B, T]` token ids, -100 ignored.
        shift: True for a causal LM (logits at t predict labels at t + 1), False for a Seq2Seq model.
        label_smoothing: eps in [0, 1).
        num_items_in_batch: target tokens of the whole accumulated batch; None: this batch's count.

    Returns:
        a 0-d float32 tensor.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
    if shift:
        logits = logits[:, :-1]
    targets = target_labels(labels, shift)
    total = functional.cross_entropy(
        logits.float().flatten(0, 1),
        targets.flatten(),
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    if num_items_in_batch is None:
        num_items_in_batch = (targets != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


__all__ = ["count_target_tokens", "sequence_loss", "target_labels"]
