"""The regularisers of RNN language models, each against a hand computation: variational (locked) dropout, word
dropout, weight dropout (DropConnect) on every path of the recurrent stack, AR and TAR; and the defaults leave the
models exactly as they were."""

import json

import pytest
import torch
from torch import nn

from helpers import CELL_TYPES, make_lm, random_tokens, tiny_lm_config
from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM
from rnn_seq2seq_hf.models import recurrent as recurrent_module
from rnn_seq2seq_hf.models.recurrent import RecurrentStack
from rnn_seq2seq_hf.models.regularization import Dropout, LockedDropout, activation_regularization, word_dropout

# --- hand references ---------------------------------------------------------------------------------------------


def hand_cell(cell: str, x, state, w_ih, w_hh, b_ih, b_hh):
    """One step of an Elman / LSTM / GRU cell written out (torch's gate order); `x` `[B, I]`, states `[B, H]`."""
    gates_x = x @ w_ih.T + b_ih
    gates_h = state[0] @ w_hh.T + b_hh
    if cell == "lstm":
        i, f, g, o = (gates_x + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return (torch.sigmoid(o) * torch.tanh(c), c)
    if cell == "gru":
        rx, zx, nx = gates_x.chunk(3, dim=-1)
        rh, zh, nh = gates_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
        n = torch.tanh(nx + r * nh)
        return ((1 - z) * n + z * state[0],)
    activation = torch.tanh if cell == "rnn_tanh" else torch.relu
    return (activation(gates_x + gates_h),)


def hand_stack(stack: RecurrentStack, inputs, weight_hh: list, between: list, mask=None):
    """The stack written out: layer by layer, step by step, with the given hidden-to-hidden matrices (one per layer)
    and between-layer multipliers (`[B, 1, H]` or None); masked positions keep the state and output zero."""
    batch, steps, _ = inputs.shape
    layer_input, finals = inputs, []
    for layer in range(stack.num_layers):
        rnn = stack.rnn
        w_ih, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}") for n in ("weight_ih", "bias_ih", "bias_hh"))
        state = tuple(torch.zeros(batch, stack.hidden_size) for _ in range(stack.num_states))
        outputs = []
        for t in range(steps):
            new = hand_cell(stack.cell_type, layer_input[:, t], state, w_ih, weight_hh[layer], b_ih, b_hh)
            keep = torch.ones(batch, 1, dtype=torch.bool) if mask is None else mask[:, t : t + 1]
            state = tuple(torch.where(keep, n, o) for n, o in zip(new, state))
            outputs.append(new[0] * keep)
        finals.append(state)
        layer_input = torch.stack(outputs, dim=1)
        if layer < stack.num_layers - 1 and between[layer] is not None:
            layer_input = layer_input * between[layer]
    final = tuple(torch.stack([f[i] for f in finals]) for i in range(stack.num_states))
    return layer_input, final


def make_stack(cell, num_layers=3, **options):
    torch.manual_seed(0)
    stack = RecurrentStack(cell, input_size=5, hidden_size=6, num_layers=num_layers, **options)
    for parameter in stack.parameters():
        nn.init.uniform_(parameter, -0.6, 0.6)
    return stack.train()


def padding_mask(batch, steps):
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, -3:] = False
    return mask


# --- locked and word dropout -------------------------------------------------------------------------------------


def test_locked_dropout_uses_one_mask_per_sequence_for_every_time_step():
    inputs = torch.rand(4, 9, 50) + 0.5
    torch.manual_seed(3)
    out = LockedDropout(0.4).train()(inputs)
    torch.manual_seed(3)
    mask = torch.empty(4, 1, 50).bernoulli_(0.6) / 0.6  # the hand-made mask
    torch.testing.assert_close(out, inputs * mask)
    ratio = out / inputs
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # the same at every step
    assert 0.2 < (ratio == 0).float().mean() < 0.6
    assert LockedDropout(0.4).eval()(inputs) is inputs and LockedDropout(0.0).train()(inputs) is inputs


def test_word_dropout_equals_a_lookup_in_an_embedding_matrix_with_dropped_rows():
    """AWD-LSTM's `embedded_dropout`: rows of the embedding matrix dropped, scaled by 1 / (1 - p)."""
    embedding = nn.Embedding(30, 8)
    ids = torch.randint(0, 30, (5, 11))
    ids[0, :3] = 7  # one word three times
    torch.manual_seed(5)
    out = word_dropout(embedding(ids), ids, 0.3, 30)
    torch.manual_seed(5)
    rows = embedding.weight.new_empty(30, 1).bernoulli_(0.7) / 0.7
    torch.testing.assert_close(out, nn.functional.embedding(ids, embedding.weight * rows))
    dropped = (out == 0).all(-1)
    assert torch.equal(dropped, (rows[ids, 0] == 0))  # every occurrence of a dropped word, nothing else
    assert 0 < dropped.float().mean() < 1


def test_word_dropout_in_the_model_drops_words_only_in_training():
    model = make_lm(word_dropout=0.5, embedding_size=12)
    ids = random_tokens(3, 8, seed=1)
    captured = []
    model.model.rnn.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    model.train()
    torch.manual_seed(2)
    model(input_ids=ids)
    torch.manual_seed(2)
    expected = word_dropout(model.model.embed_tokens(ids), ids, 0.5, model.config.vocab_size)
    torch.testing.assert_close(captured[-1], expected)
    model.eval()
    model(input_ids=ids)
    torch.testing.assert_close(captured[-1], model.model.embed_tokens(ids))


# --- weight dropout and locked dropout between layers: every path against the hand-written stack -----------------


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_weight_dropout_runs_the_stack_on_dropped_hidden_to_hidden_matrices(cell, padded):
    stack = make_stack(cell, weight_dropout=0.4)
    inputs = torch.randn(4, 7, 5, requires_grad=True)
    mask = padding_mask(4, 7) if padded else None
    torch.manual_seed(11)
    result = stack(inputs, None, mask)
    torch.manual_seed(11)  # the stack draws one dropped copy of each weight_hh per call, layer by layer
    dropped = [nn.functional.dropout(getattr(stack.rnn, f"weight_hh_l{i}"), 0.4) for i in range(3)]
    assert all(0.2 < (w == 0).float().mean() < 0.6 for w in dropped)
    outputs, final = hand_stack(stack, inputs, dropped, [None, None], mask)
    torch.testing.assert_close(result.outputs, outputs, atol=1e-5, rtol=1e-5)
    for got, expected in zip(result.state, final, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the gradients reach the parameters through the dropped copies
    weight = stack.rnn.weight_hh_l1
    grad = torch.autograd.grad(result.outputs.pow(2).sum(), weight)[0]
    grad_reference = torch.autograd.grad(outputs.pow(2).sum(), weight)[0]
    torch.testing.assert_close(grad, grad_reference, atol=1e-5, rtol=1e-5)
    assert stack._dropped_weights is None  # nothing of the call is kept


def test_weight_dropout_keeps_one_fused_call_for_all_layers(monkeypatch):
    """The fused path calls torch's functional op once, over all layers (one cuDNN call on a GPU)."""
    stack = make_stack("lstm", weight_dropout=0.3)
    calls = []
    real = recurrent_module._VF

    class CountingVF:
        def __getattr__(self, name):
            return getattr(real, name)

        def lstm(self, *args):
            calls.append(args[4] if isinstance(args[1], (list, tuple)) else args[5])  # num_layers
            return real.lstm(*args)

    monkeypatch.setattr(recurrent_module, "_VF", CountingVF())
    stack(torch.randn(2, 5, 5))
    assert calls == [3]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("padded", [False, True])
def test_locked_dropout_between_layers_uses_one_mask_per_sequence(cell, padded):
    stack = make_stack(cell, dropout=0.5, locked_dropout=True)
    inputs = torch.randn(4, 7, 5)
    mask = padding_mask(4, 7) if padded else None
    torch.manual_seed(12)
    result = stack(inputs, None, mask)
    torch.manual_seed(12)
    between = [torch.empty(4, 1, 6).bernoulli_(0.5) / 0.5 for _ in range(2)]
    outputs, final = hand_stack(
        stack, inputs, [getattr(stack.rnn, f"weight_hh_l{i}") for i in range(3)], between, mask
    )
    torch.testing.assert_close(result.outputs, outputs, atol=1e-5, rtol=1e-5)
    for got, expected in zip(result.state, final, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_regularised_paths_agree_with_gradient_checkpointing_and_one_step_calls(cell):
    """Weight dropout + locked dropout between layers: the checkpointed chunks, the layer-by-layer run and the
    fused call draw the same masks and give the same outputs and gradients."""
    stack = make_stack(cell, dropout=0.3, locked_dropout=True, weight_dropout=0.3)
    inputs = torch.randn(3, 16, 5, requires_grad=True)

    def run(checkpointing: bool, output_layers: bool):
        stack.gradient_checkpointing = checkpointing
        torch.manual_seed(4)
        result = stack(inputs, None, None, output_layers=output_layers)
        grads = torch.autograd.grad(result.outputs.pow(2).sum(), [inputs, stack.rnn.weight_hh_l0])
        return result.outputs, grads

    reference = run(False, False)
    for variant in (run(True, False), run(False, True)):
        torch.testing.assert_close(variant[0], reference[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(variant[1], reference[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_regularisers_change_nothing_in_evaluation():
    plain = make_lm(num_hidden_layers=3, hidden_dropout=0.3)
    regularised = RNNLMForCausalLM(
        tiny_lm_config(
            num_hidden_layers=3,
            hidden_dropout=0.3,
            variational_dropout=True,
            word_dropout=0.2,
            weight_dropout=0.5,
            activation_regularization=2.0,
            temporal_activation_regularization=1.0,
        )
    ).eval()
    regularised.load_state_dict(plain.state_dict())
    ids = random_tokens(3, 9, seed=3)
    a, b = plain(input_ids=ids, labels=ids), regularised(input_ids=ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


def test_variational_dropout_in_the_model_masks_embeddings_and_outputs_over_time():
    model = make_lm(variational_dropout=True, embedding_dropout=0.5, output_dropout=0.5, hidden_size=40)
    assert isinstance(model.model.embedding_dropout, LockedDropout) and isinstance(model.output_dropout, LockedDropout)
    seen = {}
    model.lm_head.register_forward_hook(lambda module, args, output: seen.update(dropped=args[0]))
    model.model.register_forward_hook(lambda module, args, output: seen.update(hidden=output.last_hidden_state))
    model.train()
    model(input_ids=random_tokens(3, 8, seed=2))
    zero = seen["dropped"] == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # a dropped unit stays dropped for the whole sequence
    assert 0.2 < zero.float().mean() < 0.8
    torch.testing.assert_close(seen["dropped"][~zero], 2.0 * seen["hidden"][~zero])


# --- AR and TAR --------------------------------------------------------------------------------------------------


def hand_ar_tar(hidden, alpha, beta, positions):
    """AWD-LSTM's terms over the first `positions` steps: alpha * mean(h^2) + beta * mean((h_t - h_{t-1})^2) *
    (positions - 1) / positions (TAR has one pair fewer than positions; both are divided by the positions)."""
    h = hidden[:, :positions]
    return alpha * h.pow(2).mean() + beta * (h[:, 1:] - h[:, :-1]).pow(2).mean() * (positions - 1) / positions


@pytest.mark.parametrize("shifted", [False, True])
def test_ar_and_tar_are_added_to_the_training_loss_as_awd_lstm_computes_them(shifted):
    options = dict(activation_regularization=2.0, temporal_activation_regularization=1.0)
    model = make_lm(**options).train()
    plain = make_lm().train()
    ids = random_tokens(3, 8, seed=4)
    kwargs = {"shift_labels": random_tokens(3, 8, seed=5)} if shifted else {}
    loss = model(input_ids=ids, labels=ids, **kwargs).loss
    cross_entropy = plain(input_ids=ids, labels=ids, **kwargs).loss
    hidden = plain.model(input_ids=ids).last_hidden_state
    # with labels, the last position has no target; with shift_labels every position has one
    expected = cross_entropy + hand_ar_tar(hidden, 2.0, 1.0, 8 if shifted else 7)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert model.eval()(input_ids=ids, labels=ids, **kwargs).loss.item() == pytest.approx(
        plain.eval()(input_ids=ids, labels=ids, **kwargs).loss.item(), abs=1e-6
    )


def test_ar_penalises_the_dropped_outputs_and_tar_the_undropped_ones():
    dropped = torch.tensor([[[1.0, 3.0], [2.0, 0.0], [0.0, 0.0]]])  # [1, 3, 2]
    undropped = torch.tensor([[[1.0, 1.0], [2.0, 3.0], [5.0, 3.0]]])
    valid = torch.tensor([[True, True, False]])
    # AR over positions 0, 1: (1 + 9) / 2 + (4 + 0) / 2 = 7; TAR over the pair (0, 1): (1 + 4) / 2 = 2.5; N = 2
    value = activation_regularization(dropped, undropped, valid, alpha=2.0, beta=1.0)
    assert value.item() == pytest.approx((2.0 * 7 + 2.5) / 2)
    assert activation_regularization(dropped, undropped, valid, 2.0, 1.0, num_items=4).item() == pytest.approx(
        (2.0 * 7 + 2.5) / 4
    )
    none = torch.zeros_like(valid)
    assert activation_regularization(dropped, undropped, none, 2.0, 1.0).item() == 0.0


def test_ar_and_tar_accumulate_like_the_token_loss():
    """Two halves of a batch with num_items_in_batch = the whole batch's targets sum to the whole batch's loss."""
    model = make_lm(activation_regularization=2.0, temporal_activation_regularization=1.0).train()
    ids = random_tokens(4, 8, seed=6)
    whole = model(input_ids=ids, labels=ids).loss
    count = torch.tensor(4 * 7)
    halves = sum(
        model(input_ids=ids[rows], labels=ids[rows], num_items_in_batch=count).loss
        for rows in (slice(0, 2), slice(2, 4))
    )
    torch.testing.assert_close(halves, whole, atol=1e-6, rtol=1e-6)


# --- defaults and configuration ----------------------------------------------------------------------------------


def test_defaults_leave_the_model_as_it_was(monkeypatch):
    config = RNNLMConfig()
    assert (config.variational_dropout, config.word_dropout, config.weight_dropout) == (False, 0.0, 0.0)
    assert (config.activation_regularization, config.temporal_activation_regularization) == (0.0, 0.0)
    model = make_lm(hidden_dropout=0.2, embedding_dropout=0.1, output_dropout=0.1).train()
    assert type(model.model.embedding_dropout) is Dropout and type(model.output_dropout) is Dropout

    def refuse(*args, **kwargs):
        raise AssertionError("the regularised path ran with the defaults")

    monkeypatch.setattr(RecurrentStack, "_forward_regularised", refuse)
    ids = random_tokens(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_checkpoint_without_the_new_keys_loads_with_the_same_outputs(tmp_path):
    model = make_lm()
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    values = json.loads(path.read_text())
    new_keys = ["variational_dropout", "word_dropout", "weight_dropout", "activation_regularization"]
    new_keys.append("temporal_activation_regularization")
    for key in new_keys:
        values.pop(key)
    path.write_text(json.dumps(values))
    loaded = RNNLMForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_tokens(2, 6)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.config.weight_dropout == 0.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("word_dropout", 1.0),
        ("weight_dropout", -0.1),
        ("weight_dropout", "0.5"),
        ("variational_dropout", "yes"),
        ("activation_regularization", -1.0),
        ("temporal_activation_regularization", float("nan")),
        ("activation_regularization", True),
    ],
)
def test_bad_regulariser_values_are_refused(key, value):
    with pytest.raises(ValueError, match=f"`{key}`"):
        RNNLMConfig(**{key: value})
    config = RNNLMConfig()
    setattr(config, key, value)
    with pytest.raises(ValueError, match=f"`{key}`"):
        config.check_values()


def test_shift_labels_are_the_targets_of_each_position_even_as_a_strided_view():
    model = make_lm()
    data = random_tokens(2, 9)
    inputs, targets = data[:, :8], data[:, 1:]  # a view that is not contiguous
    logits = model(input_ids=inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss = model(input_ids=inputs, labels=inputs, shift_labels=targets).loss
    torch.testing.assert_close(loss, expected)


def test_shift_labels_of_the_wrong_shape_are_refused():
    model = make_lm()
    ids = random_tokens(2, 6)
    with pytest.raises(ValueError, match="`shift_labels` must have shape"):
        model(input_ids=ids, labels=ids, shift_labels=ids[:, :5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_dropout_on_the_gpu_equals_the_hand_stack_and_warns_nothing():
    """One fused cuDNN call over the dropped weights; cuDNN's weight-copy warning is expected and silenced."""
    import warnings

    stack = make_stack("lstm", weight_dropout=0.4)
    gpu = make_stack("lstm", weight_dropout=0.4).cuda()
    gpu.rnn.flatten_parameters()
    inputs = torch.randn(4, 7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.cuda.manual_seed(1)
        result = gpu(inputs.cuda())
    torch.cuda.manual_seed(1)
    dropped = [nn.functional.dropout(getattr(gpu.rnn, f"weight_hh_l{i}"), 0.4).cpu() for i in range(3)]
    outputs, _ = hand_stack(stack, inputs, dropped, [None, None])
    torch.testing.assert_close(result.outputs.cpu(), outputs, atol=1e-4, rtol=1e-4)
