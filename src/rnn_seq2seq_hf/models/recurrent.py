"""A stack of recurrent layers (Elman RNN, LSTM, GRU) whose results never depend on padding.

The stack wraps one multi-layer `nn.RNN` / `nn.LSTM` / `nn.GRU` (one cuDNN call on a GPU) and adds a padding mask:
a position whose mask is False is *skipped*: it leaves the recurrent state unchanged and its output is zero. So a
sequence gives the same states and outputs whether it is alone, left-padded, right-padded or padded in the middle.

Ways to the same result, kept side by side (tests check each against the scan):
- the scan (`_run_scan`): every layer, every direction, one time step after another, keeping the old state where the
  mask is False (`torch.where`). The plain reference; also what runs while `torch.export` traces (no data-dependent
  branch, no host synchronisation).
- one token (T == 1): the fused multi-layer call and `torch.where`; the decoding path, with no host-device
  synchronisation.
- T > 1 with padding: move each row's valid positions to its front ("compact" rows), run them as a packed sequence,
  and put the outputs back at their own positions. Rows without any valid position keep their state.
- T > 1 without padding: one fused call.
The fused calls run all layers at once. When the outputs of every layer are asked for (`output_layers=True`), or a
bidirectional stack is trained with gradient checkpointing, the layers run one by one over the same weights.

`step` (one position, no padding, no checks) is what decoding loops and the step-by-step decoder (input feeding,
Bahdanau attention) call. In training on the CPU it runs torch's cell ops (`lstm_cell`, `gru_cell`, ...) layer by
layer instead of the fused op, whose CPU (oneDNN) call carries a fixed cost per call that a single time step does
not amortise: a training step of the input-feeding model is 1.13-1.16x faster at hidden 32 (batch 8, one thread;
`benchmarks/bench_overhead.py`) and about 1.5% faster at hidden 512 (batch 64, two threads). The arithmetic is the
same, so results agree to float rounding. `cell_steps = False` runs the fused op instead (the reference the tests
compare against); inference, and every GPU, always run the fused op.

Gradient checkpointing (`gradient_checkpointing = True`, set by `PreTrainedModel.activation_checkpointing_enable`):
in training, a unidirectional stack runs over chunks of about sqrt(T) time steps, each chunk recomputed in the
backward pass, so the activations kept are those of one chunk plus the states between chunks; a bidirectional stack
(whose backward direction needs the whole sequence) is checkpointed layer by layer.

Regularisers of recurrent language models (all off by default; each adds work only in training mode, when on):
- `weight_dropout` (DropConnect on the hidden-to-hidden matrices, AWD-LSTM): each call in training draws one dropped
  copy of every `weight_hh` (shared by all time steps and sequences) and every path runs on those weights; the fused
  path then calls torch's functional op over the dropped weights, which is still one cuDNN call on a GPU.
- `locked_dropout` (variational dropout between layers, Gal & Ghahramani 2016): the dropout between layers uses one
  mask per sequence and feature for all time steps, drawn once per call; the layers then run one by one (one
  fused call each), since the fused multi-layer call can only apply fresh masks at every step.

State layout: a tuple `(h,)`, or `(h, c)` for an LSTM, each `[num_layers * num_directions, B, H]` (torch's layout).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import NamedTuple

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from .input_checks import Padding
from .regularization import drop_weights, locked_dropout_mask

RNNState = tuple[torch.Tensor, ...]


class RecurrentOutput(NamedTuple):
    """What `RecurrentStack.forward` returns.

    Attributes:
        outputs: `[B, T, num_directions * H]`, zero at masked positions.
        state: the final state; for every row the state after its last real token.
        layer_outputs: with `output_layers=True`, the outputs of every layer (`num_layers` tensors shaped like
            `outputs`, the last one equal to it), else None.
    """

    outputs: torch.Tensor
    state: RNNState
    layer_outputs: tuple[torch.Tensor, ...] | None = None


def build_rnn(
    cell_type: str, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool
) -> nn.RNNBase:
    """The torch module for `cell_type` in {"rnn_tanh", "rnn_relu", "lstm", "gru"}, batch first."""
    common = dict(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        # torch warns when dropout is set on a single layer (it applies only between layers)
        dropout=dropout if num_layers > 1 else 0.0,
        bidirectional=bidirectional,
        batch_first=True,
    )
    if cell_type == "lstm":
        return nn.LSTM(**common)
    if cell_type == "gru":
        return nn.GRU(**common)
    if cell_type in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(nonlinearity=cell_type[4:], **common)
    raise ValueError(f"`cell_type` must be one of ['rnn_tanh', 'rnn_relu', 'lstm', 'gru'], got {cell_type!r}.")


def recurrence_precision(device_type: str):
    """The context the recurrence runs in: autocast off (the mixed-precision policy of `RecurrentStack.forward`),
    entered only when autocast is on, since entering it costs about as much as a small op."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _is_tracing() -> bool:
    """True while `torch.export` / `torch.jit.trace` records the model: no data-dependent branches then."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


class RecurrentStack(nn.Module):
    """Multi-layer, optionally bidirectional, recurrent stack with padding skipped.

    Args:
        cell_type: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        input_size: size of each input vector.
        hidden_size: units per layer and direction.
        num_layers: stacked layers.
        dropout: dropout between layers (training only).
        bidirectional: run a backward direction too; outputs are `[forward; backward]`.
        locked_dropout: the dropout between layers is variational (one mask per sequence, the same at every step).
        weight_dropout: DropConnect probability on the hidden-to-hidden matrices (training only).
    """

    def __init__(
        self,
        cell_type: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float = 0.0,
        bidirectional: bool = False,
        locked_dropout: bool = False,
        weight_dropout: float = 0.0,
    ):
        super().__init__()
        self.rnn = build_rnn(cell_type, input_size, hidden_size, num_layers, dropout, bidirectional)
        self.locked_dropout = locked_dropout
        self.weight_dropout = weight_dropout
        # The dropped hidden-to-hidden weights {name: tensor} and the between-layer masks {layer: [B, 1, D * H]} of
        # the call in progress (training with a regulariser on); None otherwise.
        self._dropped_weights: dict[str, torch.Tensor] | None = None
        self._layer_masks: dict[int, torch.Tensor] | None = None
        self.cell_type = cell_type
        self.is_lstm = cell_type == "lstm"
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.hidden_size = hidden_size
        # set by PreTrainedModel.activation_checkpointing_enable (with the function to checkpoint with)
        self.gradient_checkpointing = False
        # `step` in CPU training runs the cell ops layer by layer (see the module docstring); False: the fused op
        self.cell_steps = True
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    @property
    def num_states(self) -> int:
        """2 for an LSTM (h and c), else 1."""
        return 2 if self.is_lstm else 1

    def zero_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> RNNState:
        """All-zero initial state, `num_states` tensors of `[num_layers * num_directions, B, H]`."""
        shape = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.num_states))

    def forward(
        self,
        inputs: torch.Tensor,
        state: RNNState | None = None,
        mask: torch.Tensor | None = None,
        output_layers: bool = False,
    ) -> RecurrentOutput:
        """Run the stack over `inputs`, skipping masked positions.

        Args:
            inputs: `[B, T, input_size]`.
            state: initial state (see module docstring) or None for zeros.
            mask: `[B, T]` bool, True for real tokens, or a checked `input_checks.Padding` (which carries the row
                lengths, so no host read is needed here); None means no padding.
            output_layers: also return the outputs of every layer (runs the layers one by one).

        Returns:
            a `RecurrentOutput` (outputs, final state, per-layer outputs or None).
        """
        # Mixed-precision policy: the recurrence always runs in its weights' dtype (fp32 unless the model was cast),
        # never in autocast's. Under bf16 autocast PyTorch would run cuDNN LSTM/GRU in fp16 without a gradient
        # scaler, and errors would compound over time steps; the projections around the recurrence still autocast.
        dtype = self.rnn.weight_ih_l0.dtype
        if inputs.dtype != dtype:
            inputs = inputs.to(dtype)
        if state is None:
            state = self.zero_state(inputs.shape[0], inputs.device, dtype)
        elif any(tensor.dtype != dtype for tensor in state):
            state = tuple(tensor.to(dtype) for tensor in state)
        self.reflatten_if_split()
        lengths = None
        if isinstance(mask, Padding):
            mask, lengths = mask
        if self.training and (self.weight_dropout > 0 or (self.locked_dropout and self._between_layers_p() > 0)):
            return self._forward_regularised(inputs, state, mask, lengths, output_layers)
        with recurrence_precision(inputs.device.type):
            if mask is not None and inputs.shape[1] > 1 and _is_tracing():
                return self._run_scan(inputs, state, mask)
            return self._run_by_padding(inputs, state, mask, lengths, output_layers)

    def _run_by_padding(self, inputs, state, mask, lengths, output_layers: bool) -> RecurrentOutput:
        """The path for this batch's padding: one masked step, the compact path (no padding), or the packed one."""
        if mask is not None and inputs.shape[1] == 1:
            return self._run_one_step(inputs, state, mask, output_layers)
        if mask is not None and lengths is None:
            lengths = mask.sum(dim=1).cpu()  # one host read
        if mask is None or bool((lengths == inputs.shape[1]).all()):
            outputs, new_state, layers = self._run_compact(inputs, state, None, output_layers)
            return RecurrentOutput(outputs, new_state, layers)
        return self._run_padded(inputs, state, mask, lengths, output_layers)

    def reflatten_if_split(self) -> None:
        """On a GPU: put the weights back into one buffer if something outside the model (a device move by other
        code, `param.data = ...`) split them; cuDNN would otherwise copy them into one on every call (and warn).
        `forward` does it on every call; callers of `step` do it once before their loop."""
        if self.rnn.weight_ih_l0.is_cuda and not weights_share_one_buffer(self.rnn):
            self.rnn.flatten_parameters()

    def step(self, inputs: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """The decoding path: `inputs` `[B, T, input_size]` without padding from `state`, with none of `forward`'s
        checks (decoding loops feed tensors they made themselves; they call `reflatten_if_split` once first).

        In inference, one fused call of torch's functional op: exactly `forward(inputs, state)[:2]`. In training on
        the CPU with T == 1 (the step-by-step decoder), the cell ops layer by layer (`_cell_step`): the same values
        to float rounding, in less time."""
        dtype = self.rnn.weight_ih_l0.dtype
        if inputs.dtype != dtype:
            inputs = inputs.to(dtype)
        use_cells = (
            self.cell_steps
            and inputs.shape[1] == 1
            and torch.is_grad_enabled()
            and inputs.device.type == "cpu"
            and self.num_directions == 1
        )
        with recurrence_precision(inputs.device.type):
            return self._cell_step(inputs, state) if use_cells else self._fused_step(inputs, state)

    def _fused_step(self, inputs: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        hx = state if self.is_lstm else state[0]
        arguments = (self.rnn._flat_weights, self.rnn.bias, self.num_layers, self.rnn.dropout, self.training)
        outputs, *final = self._vf_function()(inputs, hx, *arguments, self.num_directions == 2, True)
        return outputs, tuple(final)

    def _cell_step(self, inputs: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """One time step (`inputs` `[B, 1, input_size]`) through torch's cell op for each layer, with the fused
        op's dropout between layers (the same `dropout` call on the same values, so the same random masks)."""
        cell = getattr(torch, f"{self.cell_type}_cell")  # lstm_cell, gru_cell, rnn_tanh_cell, rnn_relu_cell
        layer_input = inputs[:, 0]
        finals = []
        for layer in range(self.num_layers):
            hx = tuple(tensor[layer] for tensor in state) if self.is_lstm else state[0][layer]
            new = cell(layer_input, hx, *self.layer_weights(layer))  # w_ih, w_hh[, b_ih, b_hh]
            finals.append(new if self.is_lstm else (new,))
            layer_input = finals[-1][0]
            if layer < self.num_layers - 1 and self.rnn.dropout > 0 and self.training:
                layer_input = nn.functional.dropout(layer_input, self.rnn.dropout, training=True)
        new_state = tuple(torch.stack(tensors) for tensors in zip(*finals))
        return layer_input[:, None], new_state

    def _forward_regularised(self, inputs, state, mask, lengths, output_layers) -> RecurrentOutput:
        """`forward` with this call's dropped weights and between-layer masks drawn first (in this order), then the
        usual paths, which read them through `layer_weights` and `_between_layers`."""
        if self.weight_dropout > 0:
            names = [name for layer in range(self.num_layers) for name in self._weight_names(layer)]
            self._dropped_weights = {
                name: drop_weights(getattr(self.rnn, name), self.weight_dropout)
                for name in names
                if name.startswith("weight_hh")
            }
        if self.locked_dropout and self._between_layers_p() > 0:
            width = self.num_directions * self.hidden_size
            probe = inputs.new_empty(inputs.shape[0], 1, width)
            self._layer_masks = {
                layer: locked_dropout_mask(probe, self._between_layers_p()) for layer in range(self.num_layers - 1)
            }
        # cuDNN copies weights that are not one flat buffer into one, and warns: the dropped weights are fresh
        # tensors every call, and a single layer's weights (layer by layer) are a slice of the stack's buffer. The
        # copy is one pass over the weights, small next to the recurrence.
        quiet = warnings.catch_warnings() if inputs.is_cuda else contextlib.nullcontext()
        try:
            with quiet, recurrence_precision(inputs.device.type):
                if inputs.is_cuda:
                    warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
                return self._run_by_padding(inputs, state, mask, lengths, output_layers)
        finally:
            self._dropped_weights = self._layer_masks = None

    def _in_this_call(self, function):
        """`function` run with this call's dropped weights and between-layer masks, also when gradient
        checkpointing recomputes it in the backward pass, after the call has ended (`function` itself when there
        are none)."""
        dropped, masks = self._dropped_weights, self._layer_masks
        if dropped is None and masks is None:
            return function

        def run(*args):
            outside = self._dropped_weights, self._layer_masks
            self._dropped_weights, self._layer_masks = dropped, masks
            try:
                return function(*args)
            finally:
                self._dropped_weights, self._layer_masks = outside

        return run

    def _between_layers_p(self) -> float:
        return self.rnn.dropout if self.num_layers > 1 else 0.0

    def _between_layers(self, layer: int, outputs: torch.Tensor) -> torch.Tensor:
        """Dropout on layer `layer`'s outputs `[B, T, D * H]` before the next layer (training only)."""
        if self._layer_masks is not None:
            return outputs * self._layer_masks[layer]
        return nn.functional.dropout(outputs, self.rnn.dropout, training=True)

    # --- the paths ------------------------------------------------------------------------------------------------

    def _run_one_step(self, inputs, state, mask, output_layers) -> RecurrentOutput:
        outputs, new_state, layers = self._run_compact(inputs, state, None, output_layers)
        keep = mask[:, 0]  # [B]
        new_state = tuple(torch.where(keep[None, :, None], new, old) for new, old in zip(new_state, state))
        keep = keep[:, None, None].to(outputs.dtype)
        if layers is not None:
            layers = tuple(layer * keep for layer in layers)
        return RecurrentOutput(outputs * keep, new_state, layers)

    def _run_padded(self, inputs, state, mask, lengths, output_layers) -> RecurrentOutput:
        """Padded rows: `lengths` `[B]` on the CPU (real tokens per row)."""
        # A stable sort of "is padding" moves each row's real positions to its front, in their original order.
        order = torch.argsort(~mask, dim=1, stable=True)  # [B, T]
        compact = inputs.gather(1, order[..., None].expand_as(inputs))
        outputs, new_state, layers = self._run_compact(compact, state, lengths, output_layers)

        def back_in_place(values: torch.Tensor) -> torch.Tensor:
            restored = torch.zeros_like(values).scatter(1, order[..., None].expand_as(values), values)
            return restored * mask[..., None].to(values.dtype)

        has_tokens = lengths > 0  # on the CPU: no host read
        if not bool(has_tokens.all()):
            has_tokens = has_tokens.to(inputs.device)
            new_state = tuple(torch.where(has_tokens[None, :, None], new, old) for new, old in zip(new_state, state))
        if layers is not None:
            layers = tuple(back_in_place(layer) for layer in layers)
        return RecurrentOutput(back_in_place(outputs), new_state, layers)

    def _run_compact(self, inputs, state, lengths, output_layers):
        """Run over compact rows (each row's real positions first) of `lengths` (CPU, None: all T positions).

        Positions past a row's length come out as zero or garbage; the caller masks them. Rows of length 0 may
        come out with any state; the caller restores theirs.
        """
        checkpointing = (
            self.gradient_checkpointing and self.training and torch.is_grad_enabled() and inputs.shape[1] > 1
        )
        if output_layers or (checkpointing and self.num_directions == 2) or self._layer_masks is not None:
            return self._run_layer_by_layer(inputs, state, lengths, checkpointing)
        if checkpointing:
            outputs, new_state = self._run_time_chunks(inputs, state, lengths)
        else:
            outputs, new_state = self._run_fused(inputs, state, lengths)
        return outputs, new_state, None

    def _run_fused(self, inputs, state, lengths) -> tuple[torch.Tensor, RNNState]:
        """All layers in one call of the torch module (one cuDNN call on a GPU)."""
        if self._dropped_weights is not None:
            return self._run_fused_over_weights(inputs, state, lengths)
        steps = inputs.shape[1]
        if lengths is not None:
            # pack_padded_sequence refuses empty rows: run them on one (ignored) step; the caller restores them.
            inputs = pack_padded_sequence(inputs, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
        outputs, final = self.rnn(inputs, state if self.is_lstm else state[0])
        if lengths is not None:
            outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=steps)
        return outputs, (tuple(final) if self.is_lstm else (final,))

    def _run_fused_over_weights(self, inputs, state, lengths) -> tuple[torch.Tensor, RNNState]:
        """All layers in one call of torch's functional op (what `nn.LSTM.forward` calls) over `layer_weights`,
        which hold this call's dropped hidden-to-hidden matrices: still one cuDNN call on a GPU."""
        weights = [weight for layer in range(self.num_layers) for weight in self.layer_weights(layer)]
        hx = list(state) if self.is_lstm else state[0]
        common = (self.rnn.bias, self.num_layers, float(self.rnn.dropout), self.training, self.num_directions == 2)
        output, *final = self._run_functional(self._vf_function(), weights, hx, common, inputs, lengths)
        return output, tuple(final)

    def _run_time_chunks(self, inputs, state, lengths) -> tuple[torch.Tensor, RNNState]:
        """Gradient checkpointing over chunks of about sqrt(T) steps (unidirectional stacks only)."""
        steps = inputs.shape[1]
        chunk = max(1, math.ceil(math.sqrt(steps)))
        outputs = []
        for start in range(0, steps, chunk):
            piece = inputs[:, start : start + chunk]
            piece_lengths = None if lengths is None else (lengths - start).clamp(0, piece.shape[1])
            piece_out, *flat_state = self._gradient_checkpointing_func(
                self._in_this_call(self._checkpointed_chunk), piece, piece_lengths, *state
            )
            if piece_lengths is not None and not bool((piece_lengths > 0).all()):
                # rows whose real tokens ended before this chunk keep their state
                alive = (piece_lengths > 0).to(inputs.device)[None, :, None]
                flat_state = [torch.where(alive, new, old) for new, old in zip(flat_state, state)]
            state = tuple(flat_state)
            outputs.append(piece_out)
        # Concatenated time-major and viewed batch first: the memory layout of the fused call's outputs, so dropout
        # applied to them afterwards draws the same mask (random draws follow the memory order).
        return torch.cat([piece.transpose(0, 1) for piece in outputs], dim=0).transpose(0, 1), state

    def _checkpointed_chunk(self, piece, piece_lengths, *state):
        if self.rnn.dropout > 0 and self.num_layers > 1:
            # torch.utils.checkpoint replays torch's RNG for the recomputation, but not the dropout state cuDNN
            # keeps inside a fused call: run the layers one by one, with the dropout between them done here.
            outputs, new_state, _ = self._run_layer_by_layer(piece, tuple(state), piece_lengths, False)
        else:
            outputs, new_state = self._run_fused(piece, tuple(state), piece_lengths)
        return (outputs, *new_state)

    def _run_layer_by_layer(self, inputs, state, lengths, checkpointing: bool):
        """The layers one after another over the module's own weights (same results as the fused call)."""
        directions = self.num_directions
        layer_input, layer_outputs, final = inputs, [], [[] for _ in state]
        for layer in range(self.num_layers):
            rows = slice(layer * directions, (layer + 1) * directions)
            layer_state = tuple(tensor[rows] for tensor in state)
            if checkpointing:
                output, *layer_final = self._gradient_checkpointing_func(
                    self._in_this_call(self._checkpointed_layer), layer, layer_input, lengths, *layer_state
                )
            else:
                output, *layer_final = self._checkpointed_layer(layer, layer_input, lengths, *layer_state)
            for collected, tensor in zip(final, layer_final):
                collected.append(tensor)
            layer_outputs.append(output)
            layer_input = output
            if layer < self.num_layers - 1 and self.rnn.dropout > 0 and self.training:
                layer_input = self._between_layers(layer, output)
        new_state = tuple(torch.cat(tensors, dim=0) for tensors in final)
        return layer_outputs[-1], new_state, tuple(layer_outputs)

    def _checkpointed_layer(self, layer: int, inputs, lengths, *state):
        """One layer (both directions) over `inputs` `[B, T, I]` from `state` (`[D, B, H]` tensors)."""
        weights = self.layer_weights(layer)
        hx = list(state) if self.is_lstm else state[0]
        common = (self.rnn.bias, 1, 0.0, self.training, self.num_directions == 2)
        function = self._vf_function()
        with warnings.catch_warnings():
            # One layer's weights are a slice of the stack's cuDNN buffer: cuDNN copies them into a buffer of their
            # own (one pass over the weights) and warns about it; expected on this path.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            return self._run_functional(function, weights, hx, common, inputs, lengths)

    def _run_functional(self, function, weights, hx, common, inputs, lengths):
        """torch's functional RNN op over `weights` (one layer or the stack, as `common` says), packing the rows of a
        padded batch by their `lengths`; returns `(outputs [B, T, D*H], *final states)`."""
        if lengths is None:
            output, *final = function(inputs, hx, weights, *common, True)
            return (output, *final)
        steps = inputs.shape[1]
        packed = pack_padded_sequence(inputs, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
        hx = (
            [t.index_select(1, packed.sorted_indices) for t in hx]
            if self.is_lstm
            else hx.index_select(1, packed.sorted_indices)
        )
        data, *final = function(packed.data, packed.batch_sizes, hx, weights, *common)
        final = [t.index_select(1, packed.unsorted_indices) for t in final]
        output, _ = pad_packed_sequence(packed._replace(data=data), batch_first=True, total_length=steps)
        return (output, *final)

    def _run_scan(self, inputs, state, mask) -> RecurrentOutput:
        """The reference: each layer and direction one step at a time, the old state kept where the mask is 0."""
        steps = inputs.shape[1]
        keep = mask[..., None]  # [B, T, 1]
        function = self._vf_function()
        layer_input, final = inputs, [[] for _ in state]
        for layer in range(self.num_layers):
            weights = self.layer_weights(layer)
            per_direction = len(weights) // self.num_directions
            direction_outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                current = [tensor[index : index + 1] for tensor in state]  # [1, B, H] each
                times = range(steps) if direction == 0 else range(steps - 1, -1, -1)
                outputs = [None] * steps
                direction_weights = weights[direction * per_direction : (direction + 1) * per_direction]
                for t in times:
                    hx = current if self.is_lstm else current[0]
                    out, *new = function(
                        layer_input[:, t : t + 1], hx, direction_weights, self.rnn.bias, 1, 0.0, False, False, True
                    )
                    current = [torch.where(keep[None, :, t], n, o) for n, o in zip(new, current)]
                    outputs[t] = out * keep[:, t : t + 1].to(out.dtype)
                direction_outputs.append(torch.cat(outputs, dim=1))
                for collected, tensor in zip(final, current):
                    collected.append(tensor)
            layer_input = torch.cat(direction_outputs, dim=-1)
            if layer < self.num_layers - 1 and self.rnn.dropout > 0 and self.training:
                layer_input = self._between_layers(layer, layer_input)
        return RecurrentOutput(layer_input, tuple(torch.cat(tensors, dim=0) for tensors in final), None)

    # --- weights --------------------------------------------------------------------------------------------------

    def layer_weights(self, layer: int) -> list[torch.Tensor]:
        """The weights of one layer in the order torch's functional RNN ops expect (direction by direction:
        weight_ih, weight_hh, and the biases). During a call with weight dropout, the dropped `weight_hh`."""
        names = self._weight_names(layer)
        if self._dropped_weights is not None:
            return [self._dropped_weights.get(name, getattr(self.rnn, name)) for name in names]
        return [getattr(self.rnn, name) for name in names]

    def _weight_names(self, layer: int) -> list[str]:
        suffixes = [""] + (["_reverse"] if self.num_directions == 2 else [])
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.rnn.bias else [])
        return [f"{name}_l{layer}{suffix}" for suffix in suffixes for name in names]

    def _vf_function(self):
        """torch's functional op for the cell type (what `nn.LSTM.forward` itself calls)."""
        return getattr(_VF, self.cell_type)  # the cell types are the names of torch's ops: lstm, gru, rnn_tanh...


def weights_share_one_buffer(rnn: nn.RNNBase) -> bool:
    """Whether all of a cuDNN RNN's weights are views of one buffer, as `flatten_parameters` leaves them."""
    weights = rnn._flat_weights
    first = weights[0].untyped_storage().data_ptr()
    return all(w.untyped_storage().data_ptr() == first for w in weights)


def state_to_batch_first(state: RNNState, num_layers: int) -> tuple[torch.Tensor, ...]:
    """`[L * D, B, H]` tensors to `[B, L, D * H]`, the directions of each layer concatenated `[forward; backward]`.

    Batch-first tensors are what `generate()` expands per beam, so encoder final states travel in this layout.
    """
    converted = []
    for tensor in state:
        layers_directions, batch_size, hidden = tensor.shape
        directions = layers_directions // num_layers
        per_layer = tensor.view(num_layers, directions, batch_size, hidden).permute(2, 0, 1, 3)
        converted.append(per_layer.reshape(batch_size, num_layers, directions * hidden))
    return tuple(converted)


__all__ = ["RNNState", "RecurrentOutput", "RecurrentStack", "build_rnn", "state_to_batch_first"]
