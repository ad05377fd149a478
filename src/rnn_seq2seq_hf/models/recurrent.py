"""A stack of recurrent layers (Elman RNN, LSTM, GRU) whose results never depend on padding.

The stack wraps one multi-layer `nn.RNN` / `nn.LSTM` / `nn.GRU` (one cuDNN call on a GPU) and adds a padding mask:
a position whose mask is False is *skipped*: it leaves the recurrent state unchanged and its output is zero. So a
sequence gives the same states and outputs whether it is alone, left-padded, right-padded or padded in the middle.

Two ways to the same result, kept side by side:
- one token (T == 1): run the cell and keep the old state where the mask is False (`torch.where`); this is the
  reference, and the decoding path, where it costs no host-device synchronisation;
- T > 1 with padding: move each row's valid positions to its front, run them as a packed sequence, and put the
  outputs back at their own positions. Rows without any valid position keep their state.
Tests check the packed path against a loop of one-token calls.

State layout: a tuple `(h,)`, or `(h, c)` for an LSTM, each `[num_layers * num_directions, B, H]` (torch's layout).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

RNNState = tuple[torch.Tensor, ...]


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


class RecurrentStack(nn.Module):
    """Multi-layer, optionally bidirectional, recurrent stack with padding skipped.

    Args:
        cell_type: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        input_size: size of each input vector.
        hidden_size: units per layer and direction.
        num_layers: stacked layers.
        dropout: dropout between layers (training only).
        bidirectional: run a backward direction too; outputs are `[forward; backward]`.
    """

    def __init__(
        self,
        cell_type: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        dropout: float = 0.0,
        bidirectional: bool = False,
    ):
        super().__init__()
        self.rnn = build_rnn(cell_type, input_size, hidden_size, num_layers, dropout, bidirectional)
        self.is_lstm = cell_type == "lstm"
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.hidden_size = hidden_size

    @property
    def num_states(self) -> int:
        """2 for an LSTM (h and c), else 1."""
        return 2 if self.is_lstm else 1

    def zero_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> RNNState:
        """All-zero initial state, `num_states` tensors of `[num_layers * num_directions, B, H]`."""
        shape = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.num_states))

    def forward(
        self, inputs: torch.Tensor, state: RNNState | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RNNState]:
        """Run the stack over `inputs`, skipping masked positions.

        Args:
            inputs: `[B, T, input_size]`.
            state: initial state (see module docstring) or None for zeros.
            mask: `[B, T]` bool, True for real tokens; None means no padding.

        Returns:
            outputs `[B, T, num_directions * H]` (zero at masked positions) and the final state, which for every row
            is the state after its last real token.
        """
        if state is None:
            state = self.zero_state(inputs.shape[0], inputs.device, self.rnn.weight_ih_l0.dtype)
        if mask is None:
            return self._run(inputs, state)
        if inputs.shape[1] == 1:
            return self._run_one_step(inputs, state, mask)
        if bool(mask.all()):
            return self._run(inputs, state)
        return self._run_packed(inputs, state, mask)

    def _run(self, inputs: torch.Tensor | nn.utils.rnn.PackedSequence, state: RNNState):
        # Mixed-precision policy: the recurrence always runs in its weights' dtype (fp32 unless the model was cast),
        # never in autocast's. Under bf16 autocast PyTorch would run cuDNN LSTM/GRU in fp16 without a gradient
        # scaler, and errors would compound over time steps; the projections around the recurrence still autocast.
        dtype = self.rnn.weight_ih_l0.dtype
        if isinstance(inputs, nn.utils.rnn.PackedSequence):
            inputs = inputs._replace(data=inputs.data.to(dtype))
        else:
            inputs = inputs.to(dtype)
        state = tuple(tensor.to(dtype) for tensor in state)
        if inputs.is_cuda and not weights_share_one_buffer(self.rnn):
            # Something outside the model (a device move by other code, `param.data = ...`) left the weights in
            # separate buffers; cuDNN would then copy them into one on every call (and warn). Re-flatten once.
            self.rnn.flatten_parameters()
        with torch.autocast(device_type=self.rnn.weight_ih_l0.device.type, enabled=False):
            outputs, final = self.rnn(inputs, state if self.is_lstm else state[0])
        return outputs, (tuple(final) if self.is_lstm else (final,))

    def _run_one_step(self, inputs: torch.Tensor, state: RNNState, mask: torch.Tensor):
        outputs, new_state = self._run(inputs, state)
        keep = mask[:, 0]  # [B]
        new_state = tuple(torch.where(keep[None, :, None], new, old) for new, old in zip(new_state, state))
        return outputs * keep[:, None, None].to(outputs.dtype), new_state

    def _run_packed(self, inputs: torch.Tensor, state: RNNState, mask: torch.Tensor):
        batch_size, steps, _ = inputs.shape
        lengths = mask.sum(dim=1)  # [B]
        # A stable sort of "is padding" moves each row's real positions to its front, in their original order.
        order = torch.argsort(~mask, dim=1, stable=True)  # [B, T]
        compact = inputs.gather(1, order[..., None].expand_as(inputs))
        # pack_padded_sequence refuses empty rows: run them on one (ignored) step and restore their state below.
        packed = pack_padded_sequence(compact, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        packed_outputs, new_state = self._run(packed, state)
        compact_outputs, _ = pad_packed_sequence(packed_outputs, batch_first=True, total_length=steps)
        outputs = torch.zeros_like(compact_outputs).scatter(
            1, order[..., None].expand_as(compact_outputs), compact_outputs
        )
        outputs = outputs * mask[..., None].to(outputs.dtype)
        has_tokens = lengths > 0
        if not bool(has_tokens.all()):
            new_state = tuple(torch.where(has_tokens[None, :, None], new, old) for new, old in zip(new_state, state))
        return outputs, new_state


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


__all__ = ["RNNState", "RecurrentStack", "build_rnn", "state_to_batch_first"]
