"""The recurrent state as a transformers `Cache`, so that `generate()` carries it and beam search reorders it.

`generate()` keeps whatever the model returns in `outputs.cache` and hands it back on the next step; beam search
calls `cache.reorder_cache(beam_idx)` after every step. The state is kept in torch's layout, `num_states` tensors of
`[num_layers, B, H]` (one `index_select` along dim 1 per tensor reorders all layers at once), and every extra
per-row tensor is batch first. A tensor kept in any other layout would silently give beams the state of another
hypothesis.

Layers derive from `LinearAttentionCacheLayerMixin`, which is how transformers recognises a recurrent (not key/value)
cache (it then never builds 4-D attention masks for it); they are read-only views of the cache's state.

A decoder cache also remembers the encoder memory its state was built for (`bind_memory`), so a cache is never
silently combined with another source sentence, and memoises the attention keys computed from that memory.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from .recurrent import RNNState


class RecurrentLayerCache(LinearAttentionCacheLayerMixin):
    """A view of one recurrent layer's state in its cache: `h`, and `c` for an LSTM, each `[B, H]`."""

    def __init__(self, cache: RNNCache, layer_idx: int, number_of_states: int):
        super().__init__(number_of_states=number_of_states)
        self._cache = cache
        self._layer_idx = layer_idx

    # The mixin stores states in dicts; here they are read from the cache's `[L, B, H]` tensors instead.
    @property
    def recurrent_states(self) -> dict[int, torch.Tensor | None]:
        state = self._cache.state
        return {i: None if state is None else state[i][self._layer_idx] for i in range(self.number_of_states)}

    @recurrent_states.setter
    def recurrent_states(self, value) -> None:  # the mixin's __init__ assigns an empty dict
        if any(tensor is not None for tensor in value.values()):
            raise AttributeError("set the state through RNNCache.set_state")

    @property
    def is_recurrent_states_initialized(self) -> dict[int, bool]:
        return dict.fromkeys(range(self.number_of_states), self._cache.state is not None)

    @is_recurrent_states_initialized.setter
    def is_recurrent_states_initialized(self, value) -> None:
        pass

    @property
    def has_previous_state(self) -> dict[int, bool]:
        return self.is_recurrent_states_initialized

    @has_previous_state.setter
    def has_previous_state(self, value) -> None:
        pass

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        pass

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise NotImplementedError("recurrent layers have no convolution state")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        raise NotImplementedError("set the state through RNNCache.set_state")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("reorder the whole RNNCache")

    @property
    def is_compileable(self) -> bool:
        return False


class RNNCache(Cache):
    """Recurrent state of a decoder or language model, plus any per-row tensors the decoder keeps between steps.

    Args:
        num_layers: number of recurrent layers.
        num_states: 2 for an LSTM (h, c), else 1.

    Attributes:
        state: `num_states` tensors of `[num_layers, B, H]` (torch's layout), or None before the first step.
        extras: named batch-first tensors reordered with the state, e.g. the decoder's previous attentional vector
            (`"input_feed"`, `[B, H]`).
        num_seen_tokens: number of positions (padding included) the state has consumed.
    """

    def __init__(self, num_layers: int, num_states: int):
        super().__init__(layers=[RecurrentLayerCache(self, i, num_states) for i in range(num_layers)])
        self.num_states = num_states
        self.state: RNNState | None = None
        self.extras: dict[str, torch.Tensor] = {}
        self.num_seen_tokens = 0
        # The encoder memory the decoder state belongs to (`[N, S, H]`), and which of its rows each cache row reads
        # (None: row i reads row i); the attention keys computed from a memory, and which memory that was.
        self.memory: torch.Tensor | None = None
        self.memory_rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._keys_source: torch.Tensor | None = None
        # the source attention mask checked with this memory: (mask tensor, its version, the checked result)
        self._source_padding: tuple | None = None

    # --- state ----------------------------------------------------------------------------------------------------

    def get_state(self) -> RNNState | None:
        """The state in torch's layout, `num_states` tensors of `[L, B, H]`, or None before the first step."""
        return self.state

    def set_state(self, state: RNNState) -> None:
        """Store a state given in torch's layout (`[L, B, H]` per tensor)."""
        if len(state) != self.num_states or state[0].shape[0] != len(self.layers):
            raise ValueError(
                f"expected {self.num_states} state tensors of {len(self.layers)} layers, "
                f"got {len(state)} of shape {tuple(state[0].shape)}"
            )
        # Rebind instead of copying in place: the state stays part of the autograd graph, and a later step never
        # overwrites a tensor an earlier step still needs for its backward pass.
        self.state = tuple(state)

    def check_compatible(self, num_layers: int, num_states: int, hidden_size: int, batch_size: int, owner: str):
        """Raise a `ValueError` unless this cache fits a model of these sizes and a batch of `batch_size` rows."""
        if num_states != self.num_states or num_layers != len(self.layers):
            cells = {1: "a GRU or Elman RNN", 2: "an LSTM"}
            raise ValueError(
                f"`cache` holds the state of {cells.get(self.num_states, self.num_states)} with {len(self.layers)} "
                f"layers, but {owner} is {cells.get(num_states, num_states)} with {num_layers} layers: pass a cache "
                "returned by this model."
            )
        if self.state is None:
            return
        if self.state[0].shape[-1] != hidden_size:
            raise ValueError(
                f"`cache` holds states of size {self.state[0].shape[-1]}, but {owner} has hidden_size={hidden_size}: "
                "pass a cache returned by this model."
            )
        if self.state[0].shape[1] != batch_size:
            raise ValueError(
                f"`cache` holds {self.state[0].shape[1]} sequences but the inputs have {batch_size} rows."
            )

    # --- encoder memory (Seq2Seq decoders) ------------------------------------------------------------------------

    def bind_memory(self, memory: torch.Tensor) -> None:
        """Record that the state was built for this encoder memory `[B, S, H]`."""
        self.memory, self.memory_rows = memory, None

    def check_memory(self, memory: torch.Tensor) -> None:
        """Raise unless `memory` `[B, S, H]` is the encoder memory this state belongs to (row for row).

        The same tensor object (every step of one `generate()` call) costs nothing; another object (a continuation
        that re-encoded the source) is compared by value once and then remembered.
        """
        if memory is self.memory or self.memory is None:
            return
        own = self.memory if self.memory_rows is None else self.memory.index_select(0, self.memory_rows)
        if own.shape != memory.shape or not torch.equal(own, memory):
            raise ValueError(
                f"`cache` was built for another source (encoder output of shape {tuple(own.shape)}, now "
                f"{tuple(memory.shape)}): a decoder state belongs to the source it was started from. Start without "
                "a cache, or pass the same `input_ids` / `encoder_outputs` as the call that returned the cache."
            )
        self.bind_memory(memory)

    def attention_keys(self, memory: torch.Tensor, project) -> torch.Tensor:
        """`project(memory)` (the attention keys `[B, S, K]`), computed once per memory tensor."""
        if self._keys_source is not memory:
            self._keys, self._keys_source = project(memory), memory
        return self._keys

    def remember_source_padding(self, attention_mask: torch.Tensor | None, padding) -> None:
        """Record `padding`, the checked form of the source `attention_mask` (see `input_checks.check_padding`)."""
        self._source_padding = (attention_mask, getattr(attention_mask, "_version", None), padding)

    def source_padding(self, attention_mask: torch.Tensor | None, check):
        """The checked form of the source `attention_mask`: remembered if it is the mask (unchanged since) that the
        forward call which built this cache checked, else `check(attention_mask)`. `generate()` passes the same mask
        to its first forward call and to the decoding loop; checking it again would read it on the host again."""
        remembered = self._source_padding
        if (
            remembered is not None
            and remembered[0] is attention_mask
            and remembered[1] == getattr(attention_mask, "_version", None)
        ):
            return remembered[2]
        return check(attention_mask)

    # --- batch operations (generate() and beam search) ------------------------------------------------------------

    def _apply(self, fn, rows_fn) -> None:
        if self.state is not None:
            self.state = tuple(fn(tensor, 1) for tensor in self.state)
        self.extras = {name: fn(tensor, 0) for name, tensor in self.extras.items()}
        if self.memory is not None:
            rows = torch.arange(self.memory.shape[0], device=self.memory.device) if self.memory_rows is None else None
            self.memory_rows = rows_fn(self.memory_rows if rows is None else rows)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep row `beam_idx[i]` as row i (beam search)."""
        self._apply(
            lambda t, dim: t.index_select(dim, beam_idx.to(t.device)),
            lambda rows: rows.index_select(0, beam_idx.to(rows.device)),
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t, dim: t.repeat_interleave(repeats, dim=dim), lambda rows: rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(
            lambda t, dim: t.index_select(dim, torch.as_tensor(indices, device=t.device)), lambda r: r[indices]
        )

    def detach_(self) -> RNNCache:
        """Cut the autograd history (truncated backpropagation through time); returns self."""
        if self.state is not None:
            self.state = tuple(tensor.detach() for tensor in self.state)
        self.extras = {k: v.detach() for k, v in self.extras.items()}
        return self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_seen_tokens

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state[0].shape[1]

    @property
    def is_compileable(self) -> bool:
        # torch.compile does not trace nn.LSTM/nn.GRU by default; never let generate() auto-compile the model.
        return False

    def __repr__(self) -> str:
        return (
            f"RNNCache(num_layers={len(self.layers)}, num_states={self.num_states}, batch_size={self.batch_size}, "
            f"num_seen_tokens={self.num_seen_tokens}, extras={sorted(self.extras)})"
        )


__all__ = ["RNNCache", "RecurrentLayerCache"]
