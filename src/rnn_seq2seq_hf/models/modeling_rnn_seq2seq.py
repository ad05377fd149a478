"""Recurrent encoder-decoder (Seq2Seq) with attention, as a transformers model.

Reads top to bottom: the encoder output type, the encoder, the bridge (encoder state -> decoder state), the decoder,
the pre-trained base class, the bare model, then the head with `generate()`.

Decoder equations (t = target position, y_{t-1} the previous target token, m the encoder outputs):
- "bahdanau" (Bahdanau et al., 2015): c_t = attn(s_{t-1}, m); s_t = RNN([E y_{t-1}; c_t], s_{t-1});
  output a_t = tanh(W_o [s_t; c_t; E y_{t-1}]) (the deep output layer, tanh instead of maxout).
- "dot" / "general" / "concat" (Luong et al., 2015): h_t = RNN(E y_{t-1}, h_{t-1}); c_t = attn(h_t, m);
  a_t = tanh(W_c [c_t; h_t]).
- input feeding (Luong, section 3.3): a_{t-1} is concatenated to the RNN input.
- "none": a_t = h_t; the decoder sees the source only through its initial state (the bridge).
logits_t = W a_t + b (see `OutputLayer`).

Without input feeding, Luong attention (and "none") has no step that needs the previous step's attention, so the
decoder runs the recurrent stack over the whole target in one call and attends for all steps with batched matrix
products (`_forward_fused`). `_forward_steps` is the plain step-by-step reference, used for Bahdanau, input feeding
and in the tests that check both paths agree.

This file imports only installed packages and sibling files, so it travels with the weights for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import Seq2SeqLMOutput, Seq2SeqModelOutput
from transformers.utils import ModelOutput

from .attention import build_attention, padding_mask
from .cache_rnn import RNNCache
from .configuration_rnn_seq2seq import RNNSeq2SeqConfig
from .generation_rnn import RecurrentGenerationMixin, signature_computed_once
from .input_checks import (
    Padding,
    check_extra_kwargs,
    check_inputs_embeds,
    check_labels,
    check_labels_form,
    check_padding,
    check_token_ids,
    leading_shape,
    read_values_once,
)
from .output_layer import OutputLayer
from .pipeline_seq2seq import Seq2SeqGenerationPipeline  # noqa: F401  (imported so its file travels with checkpoints)
from .pretrained import RecurrentPreTrainedModel
from .recurrent import RecurrentStack, RNNState, state_to_batch_first
from .regularization import Dropout

LUONG_ATTENTION = ("dot", "general", "concat")


@dataclass
class RNNEncoderOutput(ModelOutput):
    """Encoder results. Every tensor is batch first, so `generate()` expands it per beam along dim 0.

    Args:
        last_hidden_state: `[B, S, hidden_size]` per-token outputs (both directions concatenated), zero at padding.
        final_hidden_state: `[B, encoder_layers, hidden_size]` final `h` of every layer (directions concatenated);
            for the backward direction "final" means after reading the first token.
        final_cell_state: same for an LSTM's `c`, else None.
        hidden_states: when asked for, the embeddings `[B, S, embedding_size]` and the outputs of every encoder
            layer `[B, S, hidden_size]` (`encoder_layers + 1` tensors).
    """

    last_hidden_state: torch.Tensor | None = None
    final_hidden_state: torch.Tensor | None = None
    final_cell_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class RNNEncoder(nn.Module):
    """Embeddings and a (bi)directional recurrent stack over the source; padding is skipped (packed sequences)."""

    main_input_name = "input_ids"

    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.embedding_dropout = Dropout(config.embedding_dropout)
        self.rnn = RecurrentStack(
            config.cell_type,
            config.embedding_size,
            config.encoder_hidden_size,
            config.encoder_layers,
            dropout=config.hidden_dropout,
            bidirectional=config.bidirectional_encoder,
        )

    @signature_computed_once  # generate() inspects it at every call
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RNNEncoderOutput | tuple:
        """Encode `input_ids` `[B, S]` (or `inputs_embeds` `[B, S, E]`) with `attention_mask` `[B, S]` (or the
        `Padding` the model has already checked)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            input_ids = check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        else:
            check_inputs_embeds(inputs_embeds, self.config.embedding_size)
        padding = check_padding(attention_mask, *inputs_embeds.shape[:2], allow_empty_rows=False)

        embeddings = self.embedding_dropout(inputs_embeds)
        outputs, final_state, layer_outputs = self.rnn(
            embeddings, None, padding, output_layers=bool(output_hidden_states)
        )
        final = state_to_batch_first(final_state, self.config.encoder_layers)
        result = RNNEncoderOutput(
            last_hidden_state=outputs,
            final_hidden_state=final[0],
            final_cell_state=final[1] if len(final) > 1 else None,
            hidden_states=(embeddings, *layer_outputs) if output_hidden_states else None,
        )
        return result if return_dict is not False else result.to_tuple()


def as_encoder_output(encoder_outputs: object, config: RNNSeq2SeqConfig) -> RNNEncoderOutput:
    """`encoder_outputs` as an `RNNEncoderOutput`, checked: an `RNNEncoderOutput`, its tuple form, or any mapping /
    `ModelOutput` with the same fields (`last_hidden_state` `[B, S, hidden_size]`, and the final states the bridge
    reads)."""
    if isinstance(encoder_outputs, RNNEncoderOutput):
        result = encoder_outputs
    elif isinstance(encoder_outputs, dict):  # ModelOutput is a dict
        unknown = sorted(set(encoder_outputs) - {f.name for f in fields(RNNEncoderOutput)})
        if unknown:
            raise ValueError(
                f"`encoder_outputs` has unknown fields {unknown}; pass what `model.get_encoder()` returns."
            )
        result = RNNEncoderOutput(**encoder_outputs)
    elif isinstance(encoder_outputs, (tuple, list)) and 1 <= len(encoder_outputs) <= 4:
        result = RNNEncoderOutput(*encoder_outputs)
    else:
        raise ValueError(
            "`encoder_outputs` must be what `model.get_encoder()` returns (an RNNEncoderOutput, or its tuple "
            f"`(last_hidden_state, final_hidden_state, final_cell_state, ...)`), got {type(encoder_outputs).__name__}."
        )
    memory = result.last_hidden_state
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[-1] != config.hidden_size:
        got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(
            f"`encoder_outputs.last_hidden_state` must be a tensor [batch, source length, {config.hidden_size}], "
            f"got {got}."
        )
    needed = (
        []
        if config.bridge == "zero"
        else ["final_hidden_state"] + (["final_cell_state"] if config.cell_type == "lstm" else [])
    )
    expected = (memory.shape[0], config.encoder_layers, config.hidden_size)
    for name in needed:
        value = getattr(result, name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
            raise ValueError(
                f"`encoder_outputs.{name}` must be a tensor of shape {expected} (bridge={config.bridge!r} starts the "
                f"decoder from it), got {got}; pass what `model.get_encoder()` returns."
            )
    return result


class Bridge(nn.Module):
    """The decoder's initial state from the encoder's final state (`config.bridge`)."""

    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__()
        self.kind = config.bridge
        self.num_layers = config.decoder_layers
        self.hidden_size = config.hidden_size
        self.is_lstm = config.cell_type == "lstm"
        if self.kind == "linear":
            size = config.decoder_layers * config.hidden_size
            self.hidden_projection = nn.Linear(config.hidden_size, size)
            self.cell_projection = nn.Linear(config.hidden_size, size) if self.is_lstm else None

    def forward(self, encoder_outputs: RNNEncoderOutput) -> RNNState:
        """Returns `(h,)` or `(h, c)`, each `[decoder_layers, B, hidden_size]`."""
        if self.kind == "zero":
            memory = encoder_outputs.last_hidden_state
            shape = (self.num_layers, memory.shape[0], self.hidden_size)
            return tuple(memory.new_zeros(shape) for _ in range(2 if self.is_lstm else 1))
        final = [encoder_outputs.final_hidden_state]  # [B, encoder_layers, H]
        if self.is_lstm:
            final.append(encoder_outputs.final_cell_state)
        if self.kind == "last":
            return tuple(t.transpose(0, 1).contiguous() for t in final)
        projections = [self.hidden_projection, self.cell_projection][: len(final)]
        batch_size = final[0].shape[0]
        return tuple(
            torch.tanh(proj(t[:, -1])).view(batch_size, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
            for proj, t in zip(projections, final)
        )


class DecoderOutput(NamedTuple):
    """What `RNNDecoder.forward` returns.

    Attributes:
        features: the output features a_t `[B, T, H]` (after output dropout), the input of the vocabulary projection.
        attention_weights: `[B, T, S]`, or None without attention.
        embeddings: the decoder input embeddings `[B, T, E]` (after embedding dropout).
        layer_outputs: with `output_layers=True`, the outputs of every recurrent layer (`[B, T, H]` each).
    """

    features: torch.Tensor
    attention_weights: torch.Tensor | None
    embeddings: torch.Tensor
    layer_outputs: tuple[torch.Tensor, ...] | None = None


class RNNDecoder(nn.Module):
    """Recurrent decoder with attention over the encoder outputs; see the module docstring for the equations.

    Attributes:
        use_fused: take the one-call path where the configuration allows it (True by default). Set it to False to
            run the step-by-step reference instead; both give the same outputs and gradients.
        gradient_checkpointing: set by `activation_checkpointing_enable`; the step-by-step path then recomputes
            chunks of about sqrt(T) steps in the backward pass (the fused path checkpoints inside the stack).
    """

    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__()
        hidden, embedding = config.hidden_size, config.embedding_size
        self.config = config
        self.attention_type = config.attention_type
        self.input_feeding = config.input_feeding
        self.hidden_size = hidden
        self.embed_tokens = nn.Embedding(config.vocab_size, embedding, padding_idx=config.pad_token_id)
        self.embedding_dropout = Dropout(config.embedding_dropout)
        self.output_dropout = Dropout(config.output_dropout)
        rnn_input_size = embedding
        rnn_input_size += hidden if self.attention_type == "bahdanau" else 0  # context c_t
        rnn_input_size += hidden if self.input_feeding else 0  # previous attentional state a_{t-1}
        self.rnn = RecurrentStack(
            config.cell_type, rnn_input_size, hidden, config.decoder_layers, dropout=config.hidden_dropout
        )
        self.attention = build_attention(self.attention_type, hidden)
        if self.attention_type in LUONG_ATTENTION:
            self.attentional_layer = nn.Linear(2 * hidden, hidden, bias=False)  # W_c
        elif self.attention_type == "bahdanau":
            self.deep_output = nn.Linear(2 * hidden + embedding, hidden)  # W_o
        self.bridge = Bridge(config)
        self.use_fused = True
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    @property
    def can_fuse(self) -> bool:
        """True when no step needs the previous step's attention."""
        return self.attention_type != "bahdanau" and not self.input_feeding

    def init_cache(self, encoder_outputs: RNNEncoderOutput) -> RNNCache:
        """A cache holding the initial decoder state, bound to the encoder memory it belongs to."""
        cache = RNNCache(self.rnn.num_layers, self.rnn.num_states)
        cache.set_state(self.bridge(encoder_outputs))
        memory = encoder_outputs.last_hidden_state
        cache.bind_memory(memory)
        if self.input_feeding:
            cache.extras["input_feed"] = memory.new_zeros(memory.shape[0], self.hidden_size)  # a_0 = 0
        return cache

    def attention_keys(self, memory: torch.Tensor, cache: RNNCache) -> torch.Tensor | None:
        """The attention keys `[B, S, K]` of `memory`, computed once per memory tensor (see `RNNCache`)."""
        return None if self.attention is None else cache.attention_keys(memory, self.attention.project_memory)

    @signature_computed_once  # generate() inspects it at every call
    def forward(
        self,
        input_ids: torch.LongTensor | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        cache: RNNCache,
        mask: torch.Tensor | Padding | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_layers: bool = False,
    ) -> DecoderOutput:
        """Decode `input_ids` `[B, T]` (or `inputs_embeds` `[B, T, E]`) from the state in `cache` (updated in place).

        Args:
            memory: encoder outputs `[B, S, H]`; memory_mask: `[B, S]` bool (True at source tokens), or None when
                the source has no padding.
            mask: `[B, T]` bool, False at decoder padding (skipped), or None.
            output_layers: also return the outputs of every recurrent layer.
        """
        embeddings = self.embedding_dropout(self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds)
        keys = self.attention_keys(memory, cache)
        padding = padding_mask(memory_mask) if self.attention is not None else None
        if self.use_fused and self.can_fuse:
            features, weights, layers = self._forward_fused(
                embeddings, memory, keys, padding, cache, mask, output_layers
            )
        else:
            features, weights, layers = self._forward_steps(
                embeddings, memory, keys, padding, cache, mask, output_layers
            )
        return DecoderOutput(features, weights, embeddings, layers)

    def _forward_fused(self, embeddings, memory, keys, padding, cache, mask, output_layers):
        """All target positions at once: one recurrent call (`[B, T, H]`), then batched attention over them."""
        outputs, state, layers = self.rnn(embeddings, cache.get_state(), mask, output_layers=output_layers)
        cache.set_state(state)
        if self.attention is None:
            return self.output_dropout(outputs), None, layers
        context, weights = self.attention(outputs, memory, keys, padding)
        attentional = torch.tanh(self.attentional_layer(torch.cat([context, outputs], dim=-1)))
        return self.output_dropout(attentional), weights, layers

    def _forward_steps(self, embeddings, memory, keys, padding, cache, mask, output_layers):
        """The reference: one `step` per target position, carrying the state (and a_{t-1} with input feeding)."""
        state = cache.get_state()
        input_feed = cache.extras.get("input_feed")
        steps = embeddings.shape[1]
        self.rnn.reflatten_if_split()  # once for all steps (`step` does not check)
        if isinstance(mask, Padding):
            mask = mask.mask
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and steps > 1
        chunk = max(1, math.ceil(math.sqrt(steps))) if checkpointing else steps
        features, weights, layers = [], [], []
        for start in range(0, steps, chunk):
            piece = slice(start, start + chunk)
            piece_mask = mask[:, piece] if mask is not None else None
            arguments = (embeddings[:, piece], memory, keys, padding, piece_mask, input_feed, output_layers)
            if checkpointing:
                result = self._gradient_checkpointing_func(self._steps, *arguments, *state)
            else:
                result = self._steps(*arguments, *state)
            piece_features, piece_weights, input_feed, *rest = result
            state, piece_layers = tuple(rest[: len(state)]), rest[len(state) :]
            features.append(piece_features)
            weights.append(piece_weights)
            layers.append(piece_layers)
        cache.set_state(state)
        if self.input_feeding:
            cache.extras["input_feed"] = input_feed
        weights = torch.cat(weights, dim=1) if self.attention is not None else None
        layers = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*layers)) if output_layers else None
        return torch.cat(features, dim=1), weights, layers

    def _steps(self, embeddings, memory, keys, padding, mask, input_feed, output_layers, *state):
        """`step` over every position of `embeddings` `[B, T, E]`; returns features, weights, input feed, the
        state tensors and, with `output_layers`, the per-layer outputs (flat, so it can be checkpointed)."""
        features, weights, layers = [], [], []
        for t in range(embeddings.shape[1]):
            step_mask = mask[:, t : t + 1] if mask is not None else None
            feature, weight, state, step_layers = self.step(
                embeddings[:, t : t + 1], state, input_feed, memory, keys, padding, step_mask, output_layers
            )
            if self.input_feeding:
                new_feed = feature[:, 0]
                input_feed = new_feed if step_mask is None else torch.where(step_mask, new_feed, input_feed)
            features.append(feature)
            weights.append(weight)
            layers.append(step_layers)
        weights = torch.cat(weights, dim=1) if self.attention is not None else None
        per_layer = tuple(torch.cat(outputs, dim=1) for outputs in zip(*layers)) if output_layers else ()
        return (torch.cat(features, dim=1), weights, input_feed, *state, *per_layer)

    def step(
        self,
        embedding: torch.Tensor,
        state: RNNState,
        input_feed: torch.Tensor | None,
        memory: torch.Tensor,
        keys: torch.Tensor | None,
        padding: torch.Tensor | None,
        step_mask: torch.Tensor | None,
        output_layers: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RNNState, tuple[torch.Tensor, ...] | None]:
        """One decoder step: embedding `[B, 1, E]` and state -> features `[B, 1, H]`, weights `[B, 1, S]`, the new
        state and (with `output_layers`) the outputs of every layer `[B, 1, H]`.

        `keys` are `attention.project_memory(memory)`, `padding` is `[B, 1, S]` True at source padding (or None),
        `step_mask` `[B, 1]` False where this step is decoder padding (or None)."""
        rnn_inputs = [embedding]
        # 1. Bahdanau attends with the previous state s_{t-1} (top layer's h) and feeds the context to the RNN.
        if self.attention_type == "bahdanau":
            context, weights = self.attention(state[0][-1][:, None, :], memory, keys, padding)
            rnn_inputs.append(context)
        # 2. Input feeding: the previous attentional state a_{t-1}.
        if self.input_feeding:
            rnn_inputs.append(input_feed[:, None, :])
        # 3. The recurrent update.
        rnn_input = torch.cat(rnn_inputs, dim=-1) if len(rnn_inputs) > 1 else embedding
        if step_mask is None and not output_layers:
            (output, state), layers = self.rnn.step(rnn_input, state), None  # [B, 1, H]
        else:
            output, state, layers = self.rnn(rnn_input, state, step_mask, output_layers=output_layers)
        # 4. The output features: Luong attends with the new h_t; Bahdanau's deep output; or h_t alone.
        if self.attention_type in LUONG_ATTENTION:
            context, weights = self.attention(output, memory, keys, padding)
            feature = torch.tanh(self.attentional_layer(torch.cat([context, output], dim=-1)))
        elif self.attention_type == "bahdanau":
            feature = torch.tanh(self.deep_output(torch.cat([output, context, embedding], dim=-1)))
        else:
            feature, weights = output, None
        return self.output_dropout(feature), weights, state, layers


class RNNSeq2SeqPreTrainedModel(RecurrentPreTrainedModel):
    config_class = RNNSeq2SeqConfig


class RNNSeq2SeqModel(RNNSeq2SeqPreTrainedModel):
    """Encoder and decoder; returns the decoder's output features `[B, T, hidden_size]`."""

    def __init__(self, config: RNNSeq2SeqConfig):
        config.check_values()
        super().__init__(config)
        self.encoder = RNNEncoder(config)
        self.decoder = RNNDecoder(config)
        # {tied parameter: its source}, read by save_pretrained (to store one copy) and by tie_weights
        self._tied_weights_keys = (
            {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"} if config.share_embeddings else {}
        )
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # transformers ties only when `tie_word_embeddings` is set; sharing the encoder and decoder embeddings is a
        # separate choice here, so the mapping set in __init__ from the config is used as it is.
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embed_tokens = value
        if self.config.share_embeddings:
            self.decoder.embed_tokens = value

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_decoder_embeddings(self, self.decoder, embeddings.weight.shape[0], mean_resizing)
        return embeddings

    def get_encoder(self, modality: str | None = None) -> RNNEncoder:
        return self.encoder

    def get_decoder(self) -> RNNDecoder:
        return self.decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: RNNEncoderOutput | tuple | None = None,
        cache: RNNCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> Seq2SeqModelOutput | tuple:
        r"""
        Args:
            input_ids: `[B, S]` source token ids (or `inputs_embeds` `[B, S, E]`, or precomputed `encoder_outputs`).
            attention_mask: `[B, S]`, 1 for source tokens, 0 for padding (skipped by the encoder, never attended).
            decoder_input_ids: `[B, T]` decoder inputs (the targets shifted right, starting with
                `decoder_start_token_id`), or `decoder_inputs_embeds` `[B, T, E]`. With a `cache`, only the tokens
                the cache has not consumed yet.
            decoder_attention_mask: `[B, T]` (or `[B, P + T]` with a cache that has seen P positions); decoder
                padding is skipped like source padding. Optional: right padding needs no mask.
            encoder_outputs: an `RNNEncoderOutput` (or tuple) from `get_encoder()`, to encode only once.
            cache: an `RNNCache` from an earlier call for the same source, to continue decoding from; updated in
                place. A cache of another source, cell type or size is refused.
            output_attentions: return the attention weights in `cross_attentions` (one `[B, 1, T, S]` tensor).
            output_hidden_states: return the embeddings and the outputs of every recurrent layer, of the encoder
                (`encoder_layers + 1` tensors) and of the decoder (`decoder_layers + 1` tensors; the decoder's
                `last_hidden_state` is the attentional output a_t computed from the last of them).

        Returns:
            `Seq2SeqModelOutput` with `last_hidden_state` `[B, T, hidden_size]`, `cache`,
            `encoder_last_hidden_state`, and the optional attentions and hidden states.
        """
        # in training the state is rarely wanted (truncated BPTT asks for it explicitly); not building it keeps
        # Cache objects out of Trainer and DDP outputs
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if encoder_outputs is None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("Give exactly one of `input_ids` and `inputs_embeds` (or `encoder_outputs`).")
            source = input_ids if input_ids is not None else inputs_embeds
            if not isinstance(source, torch.Tensor):  # the encoder names the problem
                source_padding = attention_mask
            else:  # checked once here, for the encoder and for the attention
                source_padding = check_padding(attention_mask, *source.shape[:2], allow_empty_rows=False)
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=source_padding,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        else:
            encoder_outputs = as_encoder_output(encoder_outputs, self.config)
            source_padding = check_padding(
                attention_mask, *encoder_outputs.last_hidden_state.shape[:2], allow_empty_rows=False
            )
        memory = encoder_outputs.last_hidden_state  # [B, S, H]
        memory_mask = None if source_padding is None else source_padding.mask

        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise ValueError(
                "Give exactly one of `decoder_input_ids` and `decoder_inputs_embeds` (or `labels` to the "
                "ForConditionalGeneration head)."
            )
        if decoder_input_ids is not None:
            decoder_input_ids = check_token_ids(decoder_input_ids, self.config.vocab_size, "decoder_input_ids")
            batch_size, length = decoder_input_ids.shape
        else:
            check_inputs_embeds(decoder_inputs_embeds, self.config.embedding_size, "decoder_inputs_embeds")
            batch_size, length = decoder_inputs_embeds.shape[:2]
        if batch_size != memory.shape[0]:
            raise ValueError(
                f"the decoder inputs have {batch_size} rows but the encoder outputs have {memory.shape[0]}."
            )
        if cache is None:
            cache = self.decoder.init_cache(encoder_outputs)
            cache.remember_source_padding(attention_mask, source_padding)
        elif not isinstance(cache, RNNCache):
            raise ValueError(f"`cache` must be an RNNCache returned by this model, got {type(cache).__name__}.")
        else:
            cache.check_compatible(
                self.config.decoder_layers,
                self.decoder.rnn.num_states,
                self.config.hidden_size,
                batch_size,
                "this model's decoder",
            )
            cache.check_memory(memory)
        decoder_mask = check_padding(
            decoder_attention_mask, batch_size, length, "decoder_attention_mask", past_length=cache.num_seen_tokens
        )

        decoded = self.decoder(
            decoder_input_ids,
            memory,
            memory_mask,
            cache,
            decoder_mask,
            inputs_embeds=decoder_inputs_embeds,
            output_layers=output_hidden_states,
        )
        cache.num_seen_tokens += length
        weights = decoded.attention_weights

        result = Seq2SeqModelOutput(
            last_hidden_state=decoded.features,
            cache=cache if use_cache else None,
            decoder_hidden_states=(decoded.embeddings, *decoded.layer_outputs) if output_hidden_states else None,
            cross_attentions=(weights[:, None],) if output_attentions and weights is not None else None,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )
        return result if return_dict else result.to_tuple()


def resize_decoder_embeddings(model: PreTrainedModel, decoder: RNNDecoder, size: int, mean_resizing: bool) -> None:
    """Give the decoder embedding `size` rows too, unless it is the encoder's (shared embeddings)."""
    if decoder.embed_tokens.weight.shape[0] != size:
        model._get_resized_embeddings(decoder.embed_tokens, size, mean_resizing=mean_resizing)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from targets: `[start, y_1, ..., y_{T-1}]`, with ignored (-100) labels read as padding."""
    previous = labels[:, :-1]
    previous = previous.masked_fill(previous == -100, pad_token_id)
    return torch.cat([labels.new_full((labels.shape[0], 1), decoder_start_token_id), previous], dim=1)


def token_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None):
    """Cross-entropy summed over target tokens (labels of -100 ignored), divided by the token count.

    Labels are NOT shifted: position t of the logits predicts labels[t]. `num_items_in_batch` is the token count of
    the whole accumulated batch (passed by Trainer); dividing by it makes k accumulated micro-batches give the same
    loss and gradient as one big batch.
    """
    logits = logits if logits.dtype == torch.float32 else logits.float()
    if num_items_in_batch is None:  # the mean over this batch's target tokens, in one operation
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    total = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class RNNSeq2SeqForConditionalGeneration(RecurrentGenerationMixin, RNNSeq2SeqPreTrainedModel, GenerationMixin):
    """The Seq2Seq model with its vocabulary projection: p(y_t | y_<t, x). Translate with `generate()`."""

    def __init__(self, config: RNNSeq2SeqConfig):
        super().__init__(config)
        self.model = RNNSeq2SeqModel(config)
        self.lm_head = OutputLayer(
            config.hidden_size, config.embedding_size, config.vocab_size, tie=config.tie_word_embeddings
        )
        # With shared embeddings the decoder's embedding is itself tied to the encoder's: point at the source.
        source = "encoder" if config.share_embeddings else "decoder"
        self._tied_weights_keys = (
            {"lm_head.linear.weight": f"model.{source}.embed_tokens.weight"} if config.tie_word_embeddings else {}
        )
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.linear

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.linear = value

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        # transformers resizes the encoder embedding (get_input_embeddings) and the output layer; an unshared
        # decoder embedding is vocabulary sized too. Ties are restored by resize_token_embeddings afterwards.
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_decoder_embeddings(self, self.model.decoder, embeddings.weight.shape[0], mean_resizing)
        return embeddings

    def get_encoder(self, modality: str | None = None) -> RNNEncoder:
        return self.model.encoder

    def get_decoder(self) -> RNNDecoder:
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Decoder inputs `[B, T]` for `labels` `[B, T]` (read by `DataCollatorForSeq2Seq(model=...)`, so training
        works when `Trainer` takes the labels out of the inputs, as it does for label smoothing)."""
        return shift_tokens_right(labels, self.config.pad_token_id or 0, self.config.decoder_start_token_id)

    def _decoding_function(self, model_kwargs: dict):
        """`generate()`'s one-token step (see generation_rnn.py): `step(tokens [N, 1], state, feed) -> (logits
        [N, 1, vocab] float32, state, feed)`, the decoder computation of `forward` for one new token; `feed` is the
        previous attentional vector `[N, H]` with input feeding, else None. The source (memory, attention keys,
        padding) is read from `model_kwargs` once."""
        decoder = self.model.decoder
        memory = model_kwargs["encoder_outputs"]["last_hidden_state"]  # [N, S, H], expanded per beam by generate()
        source_padding = model_kwargs["cache"].source_padding(
            model_kwargs.get("attention_mask"), lambda mask: check_padding(mask, *memory.shape[:2])
        )
        padding = padding_mask(None if source_padding is None else source_padding.mask)  # None without padding
        keys = decoder.attention_keys(memory, model_kwargs["cache"])
        decoder.rnn.reflatten_if_split()

        def step(tokens: torch.Tensor, state: tuple, feed: torch.Tensor | None):
            embedding = decoder.embedding_dropout(decoder.embed_tokens(tokens))  # [N, 1, E]
            feature, _, state, _ = decoder.step(embedding, state, feed, memory, keys, padding, None)
            logits = self.lm_head(feature)  # [N, 1, V]
            feed = feature[:, 0] if decoder.input_feeding else None
            return (logits if logits.dtype == torch.float32 else logits.float()), state, feed

        return step

    @signature_computed_once  # generate() inspects it at every call
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: RNNEncoderOutput | tuple | None = None,
        cache: RNNCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        decoder_inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput | tuple:
        r"""
        Args:
            labels: `[B, T]` target token ids, -100 ignored. Without `decoder_input_ids` / `decoder_inputs_embeds`,
                the decoder inputs are the labels shifted right behind `decoder_start_token_id`.
            num_items_in_batch: (keyword) target-token count of the whole accumulated batch, passed by `Trainer`.
            Others: as in [`RNNSeq2SeqModel.forward`].

        Returns:
            `Seq2SeqLMOutput` with `loss`, `logits` `[B, T, vocab_size]`, `cache`, `cross_attentions`, ...
        """
        check_extra_kwargs(kwargs, type(self).__name__)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            check_labels_form(labels, None)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        # the values of every input are read in one go, in the order the checks below and in the model run
        source_shape = leading_shape(input_ids if input_ids is not None else inputs_embeds)
        if source_shape is None and isinstance(encoder_outputs, RNNEncoderOutput):
            source_shape = leading_shape(encoder_outputs.last_hidden_state)
        target_shape = leading_shape(decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds)
        values = [
            ("labels", "labels", labels, None),
            ("mask", "attention_mask", attention_mask, source_shape),
            ("ids", "input_ids", input_ids, None),
            ("ids", "decoder_input_ids", decoder_input_ids, None),
            ("mask", "decoder_attention_mask", decoder_attention_mask, None if cache is not None else target_shape),
        ]
        with read_values_once(self.config.vocab_size, values):
            if labels is not None:
                check_labels(labels, None, self.config.vocab_size)  # read above
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs,
                cache=cache,
                inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        logits = self.lm_head(outputs.last_hidden_state)

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(
                    f"`labels` must have shape {tuple(logits.shape[:2])} (one target per decoder position), "
                    f"got {tuple(labels.shape)}."
                )
            loss = token_loss(logits, labels, kwargs.get("num_items_in_batch"))

        result = Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
        )
        return result if return_dict else result.to_tuple()


__all__ = [
    "RNNEncoder",
    "RNNEncoderOutput",
    "RNNDecoder",
    "RNNSeq2SeqForConditionalGeneration",
    "RNNSeq2SeqModel",
    "RNNSeq2SeqPreTrainedModel",
]
