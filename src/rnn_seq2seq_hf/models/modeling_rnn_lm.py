"""Recurrent language model (Elman RNN, LSTM, GRU) as a transformers model.

Reads top to bottom: the pre-trained base class, the bare model (embeddings + recurrent stack), then the causal LM
head with `generate()`.

This file imports only installed packages and sibling files, so it travels with the weights for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_rnn import RNNCache
from .configuration_rnn_lm import RNNLMConfig
from .generation_rnn import RecurrentGenerationMixin, signature_computed_once
from .input_checks import (
    Padding,
    check_extra_kwargs,
    check_inputs_embeds,
    check_labels,
    check_padding,
    check_token_ids,
    leading_shape,
    read_values_once,
)
from .output_layer import OutputLayer
from .pretrained import RecurrentPreTrainedModel
from .recurrent import RecurrentStack
from .regularization import Dropout, LockedDropout, activation_regularization, word_dropout


class RNNLMPreTrainedModel(RecurrentPreTrainedModel):
    config_class = RNNLMConfig


class RNNLMModel(RNNLMPreTrainedModel):
    """Embeddings and the recurrent stack; returns the top layer's outputs `[B, T, hidden_size]`."""

    def __init__(self, config: RNNLMConfig):
        config.check_values()
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        dropout_class = LockedDropout if config.variational_dropout else Dropout
        self.embedding_dropout = dropout_class(config.embedding_dropout)
        self.word_dropout = config.word_dropout
        self.rnn = RecurrentStack(
            config.cell_type,
            config.embedding_size,
            config.hidden_size,
            config.num_hidden_layers,
            dropout=config.hidden_dropout,
            locked_dropout=config.variational_dropout,
            weight_dropout=config.weight_dropout,
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: RNNCache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids: `[B, T]` token ids. Give either these or `inputs_embeds` (`[B, T, embedding_size]`).
            attention_mask: `[B, T]` (or `[B, P + T]` when continuing from a cache that has seen P positions),
                1 for tokens and 0 for padding. Padding is skipped: it changes neither the state nor later outputs,
                so left, right or middle padding all give the unpadded results. Outputs at padding are zero (the
                LM head repeats the last real position's logits there). A row of padding only is an empty context:
                its state stays the initial (zero) state.
            cache: an `RNNCache` from an earlier call, to continue from its state. It is updated in place.
            use_cache: return the state as an `RNNCache` (default: `config.use_cache`, but not in training mode).
            output_attentions: accepted for API compatibility; a recurrent LM has no attention.
            output_hidden_states: also return the embeddings `[B, T, embedding_size]` and the outputs of every
                recurrent layer `[B, T, hidden_size]` (`num_hidden_layers + 1` tensors; the layers then run one by
                one, with the same results as the fused call).

        Returns:
            `BaseModelOutputWithPast` with `last_hidden_state` `[B, T, hidden_size]` and `cache`.
        """
        # in training the state is rarely wanted (truncated BPTT asks for it explicitly); not building it keeps
        # Cache objects out of Trainer and DDP outputs
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            input_ids = check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
            if self.word_dropout > 0 and self.training:
                inputs_embeds = word_dropout(inputs_embeds, input_ids, self.word_dropout, self.config.vocab_size)
        else:
            check_inputs_embeds(inputs_embeds, self.config.embedding_size)
        batch_size, length = inputs_embeds.shape[:2]

        state = None
        if cache is not None:
            if not isinstance(cache, RNNCache):
                raise ValueError(f"`cache` must be an RNNCache returned by this model, got {type(cache).__name__}.")
            cache.check_compatible(
                self.config.num_hidden_layers, self.rnn.num_states, self.config.hidden_size, batch_size, "this model"
            )
            state = cache.get_state()
        mask = check_padding(
            attention_mask, batch_size, length, past_length=cache.num_seen_tokens if cache is not None else 0
        )

        embeddings = self.embedding_dropout(inputs_embeds)
        outputs, new_state, layer_outputs = self.rnn(embeddings, state, mask, output_layers=output_hidden_states)

        if use_cache:
            if cache is None:
                cache = RNNCache(self.config.num_hidden_layers, self.rnn.num_states)
            cache.set_state(new_state)
            cache.num_seen_tokens += length
        else:
            cache = None

        result = BaseModelOutputWithPast(
            last_hidden_state=outputs,
            cache=cache,
            hidden_states=(embeddings, *layer_outputs) if output_hidden_states else None,
        )
        return result if return_dict else result.to_tuple()


class RNNLMForCausalLM(RecurrentGenerationMixin, RNNLMPreTrainedModel, GenerationMixin):
    """Recurrent LM with a vocabulary projection: p(x_{t+1} | x_{<=t}).

    The output layer computes o_t = W_ho dropout(h_t) + b_o, plus W_xo x_t when `config.input_to_output`.
    """

    _tied_weights_keys = {"lm_head.linear.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RNNLMConfig):
        super().__init__(config)
        self.model = RNNLMModel(config)
        self.output_dropout = (LockedDropout if config.variational_dropout else Dropout)(config.output_dropout)
        self.lm_head = OutputLayer(
            config.hidden_size, config.embedding_size, config.vocab_size, tie=config.tie_word_embeddings
        )
        self.input_to_output = (
            nn.Linear(config.embedding_size, config.vocab_size, bias=False) if config.input_to_output else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.linear

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.linear = value

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        # transformers resizes the input embedding and the output layer; the input-to-output layer is vocabulary
        # sized too.
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if self.input_to_output is not None:
            self.input_to_output = self._get_resized_lm_head(
                self.input_to_output, embeddings.weight.shape[0], transposed=False, mean_resizing=mean_resizing
            )
        return embeddings

    def _decoding_function(self, model_kwargs: dict):
        """`generate()`'s one-token step (see generation_rnn.py): `step(tokens [N, 1], state, feed) -> (logits
        [N, 1, vocab] float32, state, None)`, the computation of `forward` for one new token that is not padding."""
        model, rnn = self.model, self.model.rnn
        rnn.reflatten_if_split()

        def step(tokens: torch.Tensor, state: tuple, feed: None):
            raw = model.embed_tokens(tokens)  # [N, 1, E]
            outputs, state = rnn.step(model.embedding_dropout(raw), state)
            logits = self.lm_head(self.output_dropout(outputs))
            if self.input_to_output is not None:
                logits = logits + self.input_to_output(model.embedding_dropout(raw))
            return (logits if logits.dtype == torch.float32 else logits.float()), state, None

        return step

    @signature_computed_once  # generate() inspects it at every call
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: RNNCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids, attention_mask, inputs_embeds, cache, use_cache, output_attentions, output_hidden_states:
                as in [`RNNLMModel.forward`].
            labels: `[B, T]` next-token targets aligned with the inputs (shifted inside, as in every causal LM of
                transformers); -100 is ignored.
            logits_to_keep: if > 0, compute logits only for the last `logits_to_keep` positions (generation needs
                only the last one).
            num_items_in_batch: (keyword) number of target tokens in the whole accumulated batch, passed by
                `Trainer`, so the loss is right under gradient accumulation.
            shift_labels: (keyword) `[B, T]` targets already aligned with the outputs (position t predicts
                `shift_labels[:, t]`), used instead of shifting `labels`, as transformers' causal LM loss accepts:
                truncated BPTT windows pass the token after the window's last one, which `labels` cannot hold.

        In training mode with `config.activation_regularization` / `config.temporal_activation_regularization` above
        0, the loss also holds AR / TAR (`regularization.activation_regularization`) over the positions that have a
        target.

        Returns:
            `CausalLMOutputWithPast` with `loss`, `logits` `[B, T, vocab_size]`, `cache`, `hidden_states`.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        check_extra_kwargs(kwargs, type(self).__name__)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        inputs = input_ids if input_ids is not None else inputs_embeds
        # the values of every input are read in one go, in the order of the checks below and in the model
        shape = leading_shape(inputs)
        values = [
            ("mask", "attention_mask", attention_mask, None if isinstance(cache, RNNCache) else shape),
            ("ids", "input_ids", input_ids, None),
            ("labels", "labels", labels if logits_to_keep == 0 else None, shape),
            ("labels", "shift_labels", shift_labels if logits_to_keep == 0 else None, shape),
        ]
        with read_values_once(self.config.vocab_size, values):
            if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and not isinstance(attention_mask, Padding):
                # checked once here, for the recurrent stack and for the positions the head repeats
                past = cache.num_seen_tokens if isinstance(cache, RNNCache) else 0
                attention_mask = check_padding(attention_mask, *inputs.shape[:2], past_length=past)
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                cache=cache,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
            mask = attention_mask.mask if isinstance(attention_mask, Padding) else None  # None: no padding
            hidden = repeat_last_real_position(outputs.last_hidden_state, mask)[:, keep]
            dropped = self.output_dropout(hidden)
            logits = self.lm_head(dropped)
            if self.input_to_output is not None:
                embeddings = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
                embeddings = repeat_last_real_position(embeddings, mask)[:, keep]
                logits = logits + self.input_to_output(self.model.embedding_dropout(embeddings))

            loss = None
            if labels is not None:
                if logits_to_keep > 0:
                    raise ValueError("`labels` need logits for every position: leave `logits_to_keep` at 0 to train.")
                check_labels(labels, hidden.shape[:2], self.config.vocab_size)
                if shift_labels is not None:
                    check_labels(shift_labels, hidden.shape[:2], self.config.vocab_size, "shift_labels")
                    kwargs["shift_labels"] = shift_labels.contiguous()  # transformers' loss views it flat
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
                alpha = self.config.activation_regularization
                beta = self.config.temporal_activation_regularization
                if (alpha or beta) and self.training:
                    if shift_labels is None:  # position t has a target when labels[:, t + 1] is not ignored
                        shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
                    valid = shift_labels != -100
                    loss = loss + activation_regularization(
                        dropped, hidden, valid, alpha, beta, kwargs.get("num_items_in_batch")
                    )

        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return result if return_dict else result.to_tuple()


def repeat_last_real_position(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`values` `[B, T, D]` where every padding position repeats the last real position before it (zeros if none).

    The logits at padding are then those of the last real token, so a right-padded prompt's last position predicts
    the right next token and right-padded batches generate exactly like left-padded ones (the state skips padding).
    """
    if mask is None or values.shape[1] == 1:
        return values
    positions = torch.arange(values.shape[1], device=values.device).expand_as(mask)
    last_real = torch.where(mask, positions, -1).cummax(dim=1).values  # [B, T], -1 before the first real token
    gathered = values.gather(1, last_real.clamp(min=0)[..., None].expand_as(values))
    return gathered * (last_real >= 0)[..., None].to(values.dtype)


__all__ = ["RNNLMForCausalLM", "RNNLMModel", "RNNLMPreTrainedModel"]
