"""The padding-aware recurrent stack: the packed path equals a loop of one-token steps, padding is skipped."""

import pytest
import torch

from helpers import CELL_TYPES
from rnn_seq2seq_hf.models.recurrent import RecurrentStack, state_to_batch_first


def make_stack(cell, bidirectional=False, seed=0):
    torch.manual_seed(seed)
    stack = RecurrentStack(cell, input_size=6, hidden_size=8, num_layers=2, bidirectional=bidirectional)
    for p in stack.parameters():
        torch.nn.init.uniform_(p, -0.6, 0.6)
    return stack


def random_mask(batch, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, steps, generator=generator) > 0.4
    mask[0] = True  # one full row
    mask[1, :3] = False  # left padding
    mask[2, -3:] = False  # right padding
    mask[3, :] = False
    mask[3, 2:4] = True  # padding on both sides
    return mask


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_packed_path_equals_step_loop_with_any_padding(cell):
    stack = make_stack(cell)
    inputs = torch.randn(6, 9, 6, requires_grad=True)
    mask = random_mask(6, 9, seed=1)
    initial = tuple(torch.randn(2, 6, 8) for _ in range(stack.num_states))

    packed_out, packed_state = stack(inputs, initial, mask)

    state, step_outputs = initial, []
    for t in range(inputs.shape[1]):
        out, state = stack(inputs[:, t : t + 1], state, mask[:, t : t + 1])
        step_outputs.append(out)
    step_out = torch.cat(step_outputs, dim=1)

    torch.testing.assert_close(packed_out, step_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(packed_state, state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.all(packed_out[~mask] == 0)

    grad_packed = torch.autograd.grad(packed_out.sum() + sum(s.sum() for s in packed_state), inputs)[0]
    grad_steps = torch.autograd.grad(step_out.sum() + sum(s.sum() for s in state), inputs)[0]
    torch.testing.assert_close(grad_packed, grad_steps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_row_equals_row_alone(cell, bidirectional):
    """Padding anywhere in a row gives the outputs and final state of the unpadded row."""
    stack = make_stack(cell, bidirectional)
    real = torch.randn(1, 4, 6)
    padded = torch.randn(3, 7, 6)  # garbage everywhere but the real positions
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, positions in enumerate([[0, 1, 2, 3], [3, 4, 5, 6], [1, 2, 4, 6]]):
        padded[row, positions] = real[0]
        mask[row, positions] = True

    alone_out, alone_state = stack(real)
    out, state = stack(padded, None, mask)
    for row in range(3):
        torch.testing.assert_close(out[row][mask[row]], alone_out[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(state, alone_state):
            torch.testing.assert_close(a[:, row], b[:, 0], atol=1e-5, rtol=1e-5)


def test_row_without_tokens_keeps_its_state():
    stack = make_stack("lstm")
    initial = tuple(torch.randn(2, 2, 8) for _ in range(2))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out, state = stack(torch.randn(2, 3, 6), initial, mask)
    for new, old in zip(state, initial):
        torch.testing.assert_close(new[:, 1], old[:, 1])
    assert torch.all(out[1] == 0)


def test_state_to_batch_first_concatenates_directions_per_layer():
    layers, batch, hidden = 3, 2, 4
    # value encodes (layer, direction): h[l * 2 + d] = 10 * l + d
    h = torch.stack([torch.full((batch, hidden), 10.0 * layer + d) for layer in range(layers) for d in range(2)])
    (converted,) = state_to_batch_first((h,), layers)
    assert converted.shape == (batch, layers, 2 * hidden)
    for layer in range(layers):
        assert torch.all(converted[:, layer, :hidden] == 10 * layer)
        assert torch.all(converted[:, layer, hidden:] == 10 * layer + 1)
