"""What `generate()` needs to know about a recurrent state, shared by both families.

A recurrent state has consumed a number of positions (`RNNCache.num_seen_tokens`) and cannot be rolled back. When
`generate()` is given a cache from an earlier call (`cache=` / `past_key_values=`) and the full sequence so far, only
the positions the state has not seen may be fed; transformers slices the prompt itself only for key/value caches, so
`prepare_inputs_for_generation` does it here. A cache that has seen more positions than the input holds is refused.

A cache of B rows continued with beam search or several return sequences (B * k input rows) is expanded to one copy
per beam, as `generate()` expands the inputs.

This file imports only installed packages and sibling files, so it travels with the weights for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import torch

from .cache_rnn import RNNCache


class RecurrentGenerationMixin:
    """Mixed into the LM and Seq2Seq heads before `GenerationMixin`."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: RNNCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        if is_first_iteration and cache is not None:
            if not isinstance(cache, RNNCache):
                raise ValueError(f"`cache` must be an RNNCache returned by this model, got {type(cache).__name__}.")
            encoder_decoder = self.config.is_encoder_decoder
            use_embeds = inputs_embeds is not None and not encoder_decoder
            sequence = inputs_embeds if use_embeds else input_ids
            mask = kwargs.get("decoder_attention_mask") if encoder_decoder else attention_mask
            if next_sequence_length is None and cache.num_seen_tokens > 0:
                next_sequence_length = unseen_length(cache, sequence.shape[1], mask, encoder_decoder)
            rows = sequence.shape[0]
            if cache.batch_size > 0 and cache.batch_size != rows and rows % cache.batch_size == 0:
                cache.batch_repeat_interleave(rows // cache.batch_size)  # one copy of the state per beam
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )


def unseen_length(cache: RNNCache, length: int, mask: torch.Tensor | None, encoder_decoder: bool) -> int | None:
    """How many of the last `length` input positions the cache has not consumed (None: feed them all).

    As in transformers, the input is either the full sequence so far, or only the new positions with an attention
    mask that covers the full sequence (seen + new positions).
    """
    seen = cache.num_seen_tokens
    if mask is not None and mask.shape[1] == seen + length:
        return None  # only the new positions were passed
    if length <= seen:
        name = "decoder_input_ids" if encoder_decoder else "input_ids / inputs_embeds"
        raise ValueError(
            f"the `cache` has already consumed {seen} positions but `{name}` holds {length}: to continue "
            "generation, pass the whole sequence so far (the positions after the first "
            f"{seen} are fed), or only the new positions with an attention mask covering all of them."
        )
    return length - seen


__all__ = ["RecurrentGenerationMixin", "unseen_length"]
