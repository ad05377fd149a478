"""The recurrent state as a transformers `Cache`, so that `generate()` carries it and beam search reorders it.

`generate()` keeps whatever the model returns in `outputs.cache` and hands it back on the next step; beam search
calls `cache.reorder_cache(beam_idx)` after every step. Everything in here is therefore **batch first**: one row per
(sentence, beam), reordered with `index_select(0, beam_idx)`. A tensor kept in any other layout would silently give
beams the state of another hypothesis.

Layers derive from `LinearAttentionCacheLayerMixin`, which is how transformers recognises a recurrent (not key/value)
cache: `generate()` then never slices the prompt by a "seen length" and never builds 4-D attention masks.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from .recurrent import RNNState


class RecurrentLayerCache(LinearAttentionCacheLayerMixin):
    """State of one recurrent layer: `h`, and `c` for an LSTM, each `[B, H]`."""

    def __init__(self, number_of_states: int):
        super().__init__(number_of_states=number_of_states)

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        if recurrent_states is not None:
            self.device, self.dtype = recurrent_states.device, recurrent_states.dtype

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise NotImplementedError("recurrent layers have no convolution state")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        # Rebind instead of copying in place: the state stays part of the autograd graph, and a later step never
        # overwrites a tensor an earlier step still needs for its backward pass.
        self.lazy_initialization(recurrent_states=recurrent_states)
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def _apply_to_states(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_to_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_to_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_to_states(lambda t: t[indices])

    @property
    def is_compileable(self) -> bool:
        # torch.compile does not trace nn.LSTM/nn.GRU by default; never let generate() auto-compile the model.
        return False

    @property
    def batch_size(self) -> int:
        for i in range(self.number_of_states):
            if self.is_recurrent_states_initialized[i]:
                return self.recurrent_states[i].shape[0]
        return -1


class RNNCache(Cache):
    """Recurrent state of a decoder or language model, plus any per-row tensors the decoder keeps between steps.

    Args:
        num_layers: number of recurrent layers.
        num_states: 2 for an LSTM (h, c), else 1.

    Attributes:
        extras: named batch-first tensors reordered with the state, e.g. the decoder's previous attentional vector
            (`"input_feed"`, `[B, H]`) and the projected encoder outputs (`"memory_keys"`, `[B, S, K]`).
        num_seen_tokens: number of positions (padding included) the state has consumed.
    """

    def __init__(self, num_layers: int, num_states: int):
        super().__init__(layers=[RecurrentLayerCache(num_states) for _ in range(num_layers)])
        self.num_states = num_states
        self.extras: dict[str, torch.Tensor] = {}
        self.num_seen_tokens = 0

    def get_state(self) -> RNNState | None:
        """The state in torch's layout, `num_states` tensors of `[L, B, H]`, or None before the first step."""
        if not self.layers[0].is_recurrent_states_initialized[0]:
            return None
        return tuple(
            torch.stack([layer.recurrent_states[i] for layer in self.layers], dim=0) for i in range(self.num_states)
        )

    def set_state(self, state: RNNState) -> None:
        """Store a state given in torch's layout (`[L, B, H]` per tensor)."""
        if len(state) != self.num_states or state[0].shape[0] != len(self.layers):
            raise ValueError(
                f"expected {self.num_states} state tensors of {len(self.layers)} layers, "
                f"got {len(state)} of shape {tuple(state[0].shape)}"
            )
        for layer_idx, layer in enumerate(self.layers):
            for state_idx in range(self.num_states):
                layer.update_recurrent_state(state[state_idx][layer_idx], state_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.extras = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.extras.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.extras = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.extras.items()}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.extras = {k: v[indices] for k, v in self.extras.items()}

    def detach_(self) -> RNNCache:
        """Cut the autograd history (truncated backpropagation through time); returns self."""
        for layer in self.layers:
            layer._apply_to_states(torch.Tensor.detach)
        self.extras = {k: v.detach() for k, v in self.extras.items()}
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_seen_tokens

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return (
            f"RNNCache(num_layers={len(self.layers)}, num_states={self.num_states}, batch_size={self.batch_size}, "
            f"num_seen_tokens={self.num_seen_tokens}, extras={sorted(self.extras)})"
        )


__all__ = ["RNNCache", "RecurrentLayerCache"]
