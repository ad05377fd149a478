"""The shared training loss against a hand-written reference (label smoothing, shifting, token normalisation)."""

import pytest
import torch

from rnn_seq2seq_hf.losses import count_target_tokens, sequence_loss


def reference_loss(logits, labels, eps, shift, denominator=None):
    """Per token: (1 - eps) * nll + eps * mean over the vocabulary of -log p, written out with loops."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == -100:
                continue
            logp = logits[b, t].double().log_softmax(-1)
            total += (1 - eps) * -logp[labels[b, t]].item() + eps * -logp.mean().item()
            count += 1
    return total / (denominator if denominator is not None else count)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sequence_loss_matches_a_hand_computed_smoothed_loss(shift, eps):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7) * 3
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    loss = sequence_loss(logits, labels, shift=shift, label_smoothing=eps)
    assert loss.item() == pytest.approx(reference_loss(logits, labels, eps, shift), rel=1e-5)


def test_sequence_loss_divides_by_the_accumulated_token_count():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    loss = sequence_loss(logits, labels, shift=False, label_smoothing=0.1, num_items_in_batch=torch.tensor(20))
    assert loss.item() == pytest.approx(reference_loss(logits, labels, 0.1, False, denominator=20), rel=1e-5)
    assert int(count_target_tokens(labels, shift=True)) == 6


def test_sequence_loss_refuses_a_smoothing_outside_0_1():
    with pytest.raises(ValueError, match="label_smoothing"):
        sequence_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), shift=False, label_smoothing=1.0)
