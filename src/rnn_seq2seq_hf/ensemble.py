"""Ensemble decoding: several Seq2Seq models that share one vocabulary, decoded together with `generate()`.

At every step each member gives a next-token distribution p_i(y_t | y_<t, x); the ensemble's distribution is their
(weighted) average, p(y_t | ...) = sum_i w_i p_i(y_t | ...), computed in log space as
log p = logsumexp_i(log w_i + log p_i), the way OpenNMT-py and fairseq ensemble translation models. The ensemble is
a `PreTrainedModel` with `GenerationMixin` whose forward runs every member and returns those log-probabilities as
its `logits` (softmax of them gives back p), so greedy search, beam search, n-best lists, `compute_transition_scores`
and the pipelines work unchanged.

Two things `generate()` must handle for us:
- Beams. `generate()` copies the *tensor fields* of the encoder output along dim 0 once per beam. The members'
  encoder outputs are therefore stored flat, one batch-first tensor per member and field
  (`member{i}_last_hidden_state`, ...) in one `EnsembleEncoderOutput`, never as a nested list that `generate()`
  would not expand.
- The state. `EnsembleCache` holds the members' `RNNCache`s; beam search's `reorder_cache(beam_idx)` reorders each.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import ModelOutput

from .models import RNNCache, RNNEncoderOutput

# Config values every member must share: the ensemble averages distributions over one vocabulary and starts, pads
# and stops every member with the same tokens.
SHARED_CONFIG_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
ENCODER_FIELDS = ("last_hidden_state", "final_hidden_state", "final_cell_state")


@dataclass
class EnsembleEncoderOutput(ModelOutput):
    """The members' encoder outputs as one flat mapping of batch-first tensors.

    `last_hidden_state` is the first member's `[B, S, H_0]` (what generic code reads); member i's fields are under
    `member{i}_last_hidden_state` `[B, S, H_i]`, `member{i}_final_hidden_state` `[B, L_i, H_i]` and, for an LSTM,
    `member{i}_final_cell_state`. Being flat tensors, all of them are expanded per beam by `generate()`.
    """

    last_hidden_state: torch.Tensor | None = None

    def member(self, index: int) -> RNNEncoderOutput:
        """Member `index`'s encoder output."""
        return RNNEncoderOutput(**{field: self.get(f"member{index}_{field}") for field in ENCODER_FIELDS})


class EnsembleEncoder(nn.Module):
    """Runs every member's encoder on the same source (what `generate()` calls once per batch)."""

    main_input_name = "input_ids"

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self._members = list(members)  # a plain list: the members are registered once, in the ensemble

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> EnsembleEncoderOutput:
        """`input_ids` and `attention_mask` `[B, S]` -> every member's encoder output."""
        output = EnsembleEncoderOutput()
        for index, member in enumerate(self._members):
            encoded = member.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
            if index == 0:
                output["last_hidden_state"] = encoded.last_hidden_state
            for field in ENCODER_FIELDS:
                if encoded.get(field) is not None:
                    output[f"member{index}_{field}"] = encoded[field]
        return output


class EnsembleCache(Cache):
    """The members' recurrent states, side by side; every reorder/repeat/select is applied to each member's cache.

    Args:
        caches: one `RNNCache` per member, in member order.
    """

    def __init__(self, caches: Sequence[RNNCache]):
        # The base class wants the layers (generate() reads whether they are recurrent); they are the members'.
        super().__init__(layers=[layer for cache in caches for layer in cache.layers])
        self.members = list(caches)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for cache in self.members:
            cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.members:
            cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self.members:
            cache.batch_select_indices(indices)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.members[0].get_seq_length()

    @property
    def is_compileable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"EnsembleCache({', '.join(repr(cache) for cache in self.members)})"


def check_compatible(models: Sequence[PreTrainedModel], names: Sequence[str] | None = None) -> None:
    """Raise a `ValueError` naming the member and the value unless every model is an encoder-decoder with the same
    vocabulary size and special token ids as the first."""
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if not models:
        raise ValueError("an ensemble needs at least one model")
    for name, model in zip(names, models):
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{name}: an ensemble takes encoder-decoder (Seq2Seq) models, got {type(model).__name__}")
    first = models[0].config
    for name, model in zip(names[1:], models[1:]):
        for key in SHARED_CONFIG_KEYS:
            mine, theirs = getattr(model.config, key, None), getattr(first, key, None)
            if mine != theirs:
                raise ValueError(
                    f"{name}: {key} is {mine} but {names[0]} has {theirs}; ensemble members must share one "
                    "vocabulary and the same special tokens"
                )


def check_same_tokenizer(tokenizers: Sequence[PreTrainedTokenizerBase], names: Sequence[str]) -> None:
    """Raise a `ValueError` unless every tokenizer has the first one's vocabulary and special tokens."""
    first_vocab = tokenizers[0].get_vocab()
    first_special = tokenizers[0].special_tokens_map
    for name, tokenizer in zip(names[1:], tokenizers[1:]):
        vocab = tokenizer.get_vocab()
        if vocab != first_vocab:
            differ = len(set(vocab.items()) ^ set(first_vocab.items()))
            raise ValueError(
                f"{name}: its tokenizer's vocabulary ({len(vocab)} tokens) differs from {names[0]}'s "
                f"({len(first_vocab)} tokens, {differ} entries differ); ensemble members must share one vocabulary"
            )
        if tokenizer.special_tokens_map != first_special:
            raise ValueError(
                f"{name}: special tokens {tokenizer.special_tokens_map} differ from {names[0]}'s {first_special}"
            )


class Seq2SeqEnsemble(PreTrainedModel, GenerationMixin):
    """Several Seq2Seq models that share a vocabulary, decoded as one: their next-token probabilities are averaged.

    Args:
        models: the members (e.g. `RNNSeq2SeqForConditionalGeneration`s trained with different seeds); they must
            have the same `vocab_size` and special token ids (checked, `ValueError` otherwise).
        weights: one non-negative weight per member (normalised to sum to 1); equal weights by default.

    The first member's configuration and generation config are the ensemble's (beam size, lengths, ...).
    `forward` returns `logits` `[B, T, V]` that are the log of the averaged probabilities, a `loss` (mean negative
    log-likelihood of `labels` under the ensemble) and, with `output_attentions=True`, the members' cross attention
    averaged over the members that have attention.

    Example:

    ```python
    >>> ensemble = Seq2SeqEnsemble([model_a, model_b])
    >>> ensemble.generate(**tokenizer(["ein hund"], return_tensors="pt"), num_beams=5)
    ```
    """

    main_input_name = "input_ids"
    _is_stateful = True  # like the members: the recurrent state cannot be rolled back for assisted decoding

    def __init__(self, models: Sequence[PreTrainedModel], weights: Sequence[float] | None = None):
        check_compatible(models)
        if weights is None:
            weights = [1.0] * len(models)
        if len(weights) != len(models) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights}")
        super().__init__(copy.deepcopy(models[0].config))
        self.members = nn.ModuleList(models)
        self.generation_config = copy.deepcopy(models[0].generation_config)
        total = float(sum(weights))
        self.register_buffer("log_weights", torch.tensor([math.log(w / total) if w else -math.inf for w in weights]))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the members build their own caches on the first forward, as they do alone

    def get_encoder(self, modality: str | None = None) -> EnsembleEncoder:  # transformers 5.24 passes `modality`
        return EnsembleEncoder(self.members)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: EnsembleEncoderOutput | None = None,
        cache: EnsembleCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Run every member on the same inputs and average their next-token probabilities.

        Args:
            input_ids, attention_mask: `[B, S]` source (or `encoder_outputs` from `get_encoder()`).
            decoder_input_ids: `[B, T]`; with a `cache`, only the tokens it has not consumed yet. Without them,
                `labels` shifted right (as in the members).
            cache: an `EnsembleCache` from an earlier call, to continue decoding from.
            labels: `[B, T]` target ids, -100 ignored: `loss` is their mean negative log-likelihood.

        Returns:
            `Seq2SeqLMOutput` with `logits` `[B, T, V]` = log of the averaged probabilities, `loss`, `cache`, and
            `cross_attentions` (one `[B, 1, T, S]` tensor) when asked for.
        """
        if encoder_outputs is None:
            encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        elif not isinstance(encoder_outputs, EnsembleEncoderOutput):
            raise ValueError(
                f"`encoder_outputs` must come from Seq2SeqEnsemble.get_encoder(), got {type(encoder_outputs).__name__}"
            )
        if cache is not None and not (isinstance(cache, EnsembleCache) and len(cache.members) == len(self.members)):
            raise ValueError(f"`cache` must be an EnsembleCache of {len(self.members)} members from this ensemble")
        if decoder_input_ids is None and labels is not None:
            decoder_input_ids = self.members[0].prepare_decoder_input_ids_from_labels(labels)
        use_cache = True if use_cache is None else use_cache

        logprobs, caches, attentions = [], [], []
        for index, member in enumerate(self.members):
            output = member(
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs.member(index),
                cache=cache.members[index] if cache is not None else None,
                use_cache=use_cache,
                output_attentions=output_attentions,
                return_dict=True,
            )
            logprobs.append(output.logits.float().log_softmax(-1))  # [B, T, V]
            caches.append(output.cache)
            if output.cross_attentions is not None:
                attentions.append(output.cross_attentions[0])  # [B, 1, T, S]
        weights = self.log_weights.to(logprobs[0].device)[:, None, None, None]
        logits = torch.logsumexp(torch.stack(logprobs) + weights, dim=0)  # log sum_i w_i p_i, [B, T, V]

        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=EnsembleCache(caches) if use_cache else None,
            cross_attentions=(torch.stack(attentions).mean(0),) if output_attentions and attentions else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
        )


__all__ = [
    "EnsembleCache",
    "EnsembleEncoder",
    "EnsembleEncoderOutput",
    "Seq2SeqEnsemble",
    "check_compatible",
    "check_same_tokenizer",
]
