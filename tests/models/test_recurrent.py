"""The padding-aware recurrent stack: every path (packed, one step, layer by layer, checkpointed chunks) equals the
plain scan reference, outputs, states and gradients; padding is skipped."""

import pytest
import torch

from helpers import CELL_TYPES
from rnn_seq2seq_hf.models.recurrent import RecurrentStack, state_to_batch_first


def make_stack(cell, bidirectional=False, seed=0, num_layers=2):
    torch.manual_seed(seed)
    stack = RecurrentStack(cell, input_size=6, hidden_size=8, num_layers=num_layers, bidirectional=bidirectional)
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


def assert_same(result, reference, inputs):
    """Same outputs, final states and input gradients."""
    torch.testing.assert_close(result.outputs, reference.outputs, atol=1e-5, rtol=1e-5)
    for a, b in zip(result.state, reference.state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    loss = lambda r: r.outputs.pow(2).sum() + sum(s.pow(2).sum() for s in r.state)  # noqa: E731
    grad = torch.autograd.grad(loss(result), inputs, retain_graph=True)[0]
    grad_reference = torch.autograd.grad(loss(reference), inputs, retain_graph=True)[0]
    torch.testing.assert_close(grad, grad_reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_path_equals_the_scan_reference_with_any_padding(cell, bidirectional):
    stack = make_stack(cell, bidirectional)
    inputs = torch.randn(6, 9, 6, requires_grad=True)
    mask = random_mask(6, 9, seed=1)
    initial = tuple(torch.randn(2 * stack.num_directions, 6, 8) for _ in range(stack.num_states))

    packed = stack(inputs, initial, mask)
    reference = stack._run_scan(inputs, initial, mask)
    assert_same(packed, reference, inputs)
    assert torch.all(packed.outputs[~mask] == 0)


@pytest.mark.parametrize("cell", CELL_TYPES)
def test_one_step_calls_equal_the_packed_call(cell):
    stack = make_stack(cell)
    inputs = torch.randn(6, 9, 6, requires_grad=True)
    mask = random_mask(6, 9, seed=2)
    initial = tuple(torch.randn(2, 6, 8) for _ in range(stack.num_states))
    packed = stack(inputs, initial, mask)
    state, outputs = initial, []
    for t in range(inputs.shape[1]):
        out, state, _ = stack(inputs[:, t : t + 1], state, mask[:, t : t + 1])
        outputs.append(out)
    steps = type(packed)(torch.cat(outputs, dim=1), state)
    assert_same(steps, packed, inputs)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_layer_by_layer_equals_the_fused_call_and_returns_every_layer(cell, bidirectional, padded):
    stack = make_stack(cell, bidirectional, num_layers=3)
    inputs = torch.randn(6, 9, 6, requires_grad=True)
    mask = random_mask(6, 9, seed=3) if padded else None
    fused = stack(inputs, None, mask)
    layered = stack(inputs, None, mask, output_layers=True)
    assert fused.layer_outputs is None and len(layered.layer_outputs) == 3
    assert_same(layered, fused, inputs)
    torch.testing.assert_close(layered.layer_outputs[-1], layered.outputs)
    # the first layer's outputs are those of a 1-layer stack with the same weights
    first = RecurrentStack(cell, 6, 8, 1, bidirectional=bidirectional)
    first.rnn.load_state_dict({k: v for k, v in stack.rnn.state_dict().items() if "_l0" in k})
    torch.testing.assert_close(layered.layer_outputs[0], first(inputs, None, mask).outputs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(cell, bidirectional, padded):
    stack = make_stack(cell, bidirectional).train()
    inputs = torch.randn(6, 17, 6, requires_grad=True)  # 17 steps: chunks of 5, 5, 5, 2
    mask = random_mask(6, 17, seed=4) if padded else None
    initial = tuple(torch.randn(2 * stack.num_directions, 6, 8) for _ in range(stack.num_states))
    plain = stack(inputs, initial, mask)
    stack.gradient_checkpointing = True
    checkpointed = stack(inputs, initial, mask)
    assert_same(checkpointed, plain, inputs)
    parameters = list(stack.parameters())
    loss = lambda r: r.outputs.pow(2).sum() + sum(s.pow(2).sum() for s in r.state)  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(checkpointed), parameters), torch.autograd.grad(loss(plain), parameters)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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

    alone_out, alone_state, _ = stack(real)
    out, state, _ = stack(padded, None, mask)
    for row in range(3):
        torch.testing.assert_close(out[row][mask[row]], alone_out[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(state, alone_state):
            torch.testing.assert_close(a[:, row], b[:, 0], atol=1e-5, rtol=1e-5)


def test_row_without_tokens_keeps_its_state():
    stack = make_stack("lstm")
    initial = tuple(torch.randn(2, 2, 8) for _ in range(2))
    mask = torch.tensor([[True, True, False], [False, False, False]])
    for output_layers in (False, True):
        out, state, _ = stack(torch.randn(2, 3, 6), initial, mask, output_layers=output_layers)
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


CELL_STEP_CASES = [
    *[(cell, layers, dropout, True) for cell in CELL_TYPES for layers, dropout in [(1, 0.0), (3, 0.0), (3, 0.4)]],
    ("lstm", 2, 0.0, False),  # no biases
]


@pytest.mark.parametrize("cell, num_layers, dropout, bias", CELL_STEP_CASES)
def test_training_steps_through_cells_equal_the_fused_step(cell, num_layers, dropout, bias):
    """`step` in CPU training runs torch's cell ops layer by layer; the reference is the fused op (`cell_steps =
    False`): the same outputs, states and gradients (inputs, state and every weight), and with dropout between layers
    the same random masks from the same seed."""
    torch.manual_seed(0)
    stack = RecurrentStack(cell, input_size=6, hidden_size=8, num_layers=num_layers, dropout=dropout).train()
    if not bias:
        stack.rnn = torch.nn.LSTM(6, 8, num_layers, bias=False, batch_first=True)
    for p in stack.parameters():
        torch.nn.init.uniform_(p, -0.6, 0.6)
    inputs = torch.randn(5, 1, 6, requires_grad=True)
    state = tuple(torch.randn(num_layers, 5, 8, requires_grad=True) for _ in range(stack.num_states))
    leaves = [inputs, *state, *stack.parameters()]

    def run(cell_steps):
        stack.cell_steps = cell_steps
        torch.manual_seed(7)
        outputs, new_state = stack.step(inputs, state)
        loss = outputs.pow(2).sum() + sum(tensor.pow(3).sum() for tensor in new_state)
        return outputs, new_state, torch.autograd.grad(loss, leaves)

    outputs, new_state, grads = run(True)
    ref_outputs, ref_state, ref_grads = run(False)
    assert outputs.shape == ref_outputs.shape == (5, 1, 8)
    torch.testing.assert_close(outputs, ref_outputs, atol=1e-6, rtol=1e-5)
    for got, expected in zip(new_state, ref_state, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if dropout:  # the masks were really applied
        assert not torch.equal(outputs, stack.eval().step(inputs, state)[0])


def test_inference_steps_run_the_fused_op_exactly():
    """Decoding (no gradients) keeps the fused op: exactly `forward`'s values, which generate()'s token-for-token
    equality with transformers' loops relies on."""
    stack = make_stack("lstm")
    inputs = torch.randn(4, 1, 6)
    state = tuple(torch.randn(2, 4, 8) for _ in range(2))
    with torch.no_grad():
        outputs, new_state = stack.step(inputs, state)
        reference = stack(inputs, state)
    assert torch.equal(outputs, reference.outputs)
    assert all(torch.equal(a, b) for a, b in zip(new_state, reference.state))
