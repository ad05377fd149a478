"""Input checks read the values of a forward call's inputs in one go (`read_values_once`): one host read per call
(one synchronisation on a GPU), with the same errors, in the same order, as the checks of each input alone."""

import sys

import pytest
import torch

from helpers import make_lm, make_seq2seq, random_tokens
from rnn_seq2seq_hf.models import input_checks
from rnn_seq2seq_hf.models.input_checks import (
    check_labels,
    check_padding,
    check_token_ids,
    read_values_once,
)

VOCAB = 23


def padded_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0
    return mask


def reads_of(call):
    """Host reads of tensor values made by the input checks during `call` (the model's other reads are of the row
    lengths, which live on the CPU by design and cost no synchronisation)."""
    checks_file = input_checks.__file__
    reads = []
    original = torch.Tensor.tolist

    def tolist(tensor, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename == checks_file:
            reads.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    torch.Tensor.tolist = tolist
    try:
        call()
    finally:
        torch.Tensor.tolist = original
    return len(reads)


def test_a_training_forward_reads_its_inputs_once():
    seq2seq, lm = make_seq2seq(), make_lm()
    source, labels = random_tokens(3, 7, seed=1), random_tokens(3, 5, seed=2)
    labels[2, -2:] = -100
    mask = padded_mask(3, 7)
    assert reads_of(lambda: seq2seq(input_ids=source, attention_mask=mask, labels=labels)) == 1
    assert reads_of(lambda: seq2seq(input_ids=source, labels=labels, decoder_input_ids=labels.clamp(min=0))) == 1
    assert reads_of(lambda: lm(input_ids=source, attention_mask=mask, labels=source.masked_fill(mask == 0, -100))) == 1
    # each check alone reads once: the four of the Seq2Seq call
    alone = [
        lambda: check_labels(labels, None, VOCAB),
        lambda: check_padding(mask, 3, 7),
        lambda: check_token_ids(source, VOCAB),
        lambda: check_token_ids(labels.clamp(min=0), VOCAB),
    ]
    assert [reads_of(call) for call in alone] == [1, 1, 1, 1]


def test_the_results_are_those_of_the_separate_checks():
    model = make_seq2seq()
    source, labels = random_tokens(3, 7, seed=1), random_tokens(3, 5, seed=2)
    mask = padded_mask(3, 7)
    together = model(input_ids=source, attention_mask=mask, labels=labels)
    with torch.no_grad():  # the same computation without the shared read: the model's own checks, one by one
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
    apart = model(encoder_outputs=encoder_outputs, attention_mask=mask, labels=labels)
    torch.testing.assert_close(together.loss, apart.loss)
    torch.testing.assert_close(together.logits, apart.logits)
    # the padding check inside the block returns what it returns alone, for integer and bool masks
    for padding in (mask, mask.bool()):
        with read_values_once(VOCAB, [("mask", "attention_mask", padding, (3, 7))]):
            inside = check_padding(padding, 3, 7)
        alone = check_padding(padding, 3, 7)
        assert torch.equal(inside.mask, alone.mask) and torch.equal(inside.lengths, alone.lengths)
        assert inside.lengths.tolist() == [7, 5, 7]


BAD_INPUTS = {
    "input_ids": (
        dict(input_ids=torch.tensor([[3, 4, 99]])),
        r"`input_ids` holds token ids outside \[0, vocab_size=23\)",
    ),
    "labels": (dict(labels=torch.tensor([[3, 77]])), r"`labels` must be token ids in \[0, vocab_size=23\).*found 77"),
    "attention_mask": (dict(attention_mask=torch.tensor([[1, 2, 1]])), r"`attention_mask` must hold only 0"),
    "decoder_input_ids": (
        dict(decoder_input_ids=torch.tensor([[1, 50]])),
        r"`decoder_input_ids` holds token ids outside \[0, vocab_size=23\): found 50\.\.50",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_each_bad_value_gets_its_own_error(bad):
    model = make_seq2seq()
    inputs = dict(
        input_ids=torch.tensor([[3, 4, 5]]),
        attention_mask=torch.ones(1, 3, dtype=torch.long),
        labels=torch.tensor([[3, 4]]),
        decoder_input_ids=torch.tensor([[1, 3]]),
    )
    replacement, message = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=message):
        model(**{**inputs, **replacement})


def test_with_two_bad_inputs_the_first_checked_is_reported_as_before():
    model = make_seq2seq()
    bad_ids, bad_labels = torch.tensor([[3, 4, 99]]), torch.tensor([[3, 77]])
    with pytest.raises(ValueError, match="`labels`"):  # the head checks the labels before the model runs
        model(input_ids=bad_ids, labels=bad_labels)
    # a malformed input stops the shared read there: its own check reports it at its usual place
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(1, 3\)"):
        model(input_ids=bad_ids, attention_mask=torch.ones(1, 4, dtype=torch.long), labels=torch.tensor([[3, 4]]))
    lm = make_lm()
    with pytest.raises(ValueError, match=r"`shift_labels` must be token ids"):
        lm(
            input_ids=torch.tensor([[3, 4, 5]]),
            labels=torch.tensor([[3, 4, 5]]),
            shift_labels=torch.tensor([[3, 4, 88]]),
        )


def test_a_tensor_changed_after_the_shared_read_is_read_again():
    ids = torch.tensor([[3, 4, 5]])
    with read_values_once(VOCAB, [("ids", "input_ids", ids, None)]):
        assert reads_of(lambda: check_token_ids(ids, VOCAB)) == 0
        ids[0, 0] = 40  # in place: its version changes
        with pytest.raises(ValueError, match="outside"):
            check_token_ids(ids, VOCAB)
        assert reads_of(lambda: check_token_ids(torch.tensor([[3, 4, 5]]), VOCAB)) == 1  # another tensor
    assert reads_of(lambda: check_token_ids(torch.tensor([[3]]), VOCAB)) == 1  # outside the block
