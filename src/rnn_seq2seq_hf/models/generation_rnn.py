"""What `generate()` needs to know about a recurrent state, and lean decoding loops behind it.

Continuing from a cache. A recurrent state has consumed a number of positions (`RNNCache.num_seen_tokens`) and
cannot be rolled back. When `generate()` is given a cache from an earlier call (`cache=` / `past_key_values=`) and the
full sequence so far, only the positions the state has not seen may be fed; transformers slices the prompt itself
only for key/value caches, so `prepare_inputs_for_generation` does it here. A cache that has seen more positions than
the input holds is refused. A cache of B rows continued with beam search or several return sequences (B * k input
rows) is expanded to one copy per beam, as `generate()` expands the inputs.

Lean loops. `generate()` keeps all of transformers' set-up (generation config, special tokens, encoder run, beam
expansion, logits processors, stopping criteria) and its prefill forward; only the per-token loop of greedy search,
sampling and beam search is replaced by `_sample` / `_beam_search` below, which
- call the model's own one-token step (`_decoding_function`: embedding, recurrent cell, attention, projection; no input
  checks, no output dataclasses, no attention-mask growth: the inputs were checked once by the prefill forward);
- keep the bookkeeping of transformers' loops, computing the same values with the same operations in the same
  order, so tokens and scores are identical, but with fewer operations per token: tokens and back-pointers per step
  instead of re-gathering whole beam sequences, the pool of finished hypotheses updated only at steps where one of
  the best beams finishes (at other steps transformers' update cannot change the finished hypotheses that are
  returned), the early-stopping heuristic evaluated once a hypothesis has finished (before that it cannot change).
Everything else (output_attentions / output_hidden_states, streamers, beam sampling, other stopping criteria such as
stop strings or max_time, synced GPUs, assisted decoding) runs transformers' own loops, unchanged. Set
`model.lean_generation = False` to run transformers' loops for everything (the tests compare both).

This file imports only installed packages and sibling files, so it travels with the weights for
`trust_remote_code=True` loading.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import (
    GenerateBeamDecoderOnlyOutput,
    GenerateBeamEncoderDecoderOutput,
    GenerateDecoderOnlyOutput,
    GenerateEncoderDecoderOutput,
)

from .cache_rnn import RNNCache

logger = logging.getLogger(__name__)

# model kwargs the lean loops understand; any other keyword (a custom model input) runs transformers' loops
LEAN_MODEL_KWARGS = frozenset(
    {"attention_mask", "decoder_attention_mask", "encoder_outputs", "cache", "use_cache", "logits_to_keep"}
)


def signature_computed_once(function):
    """Decorator: store `function`'s signature on it, so `inspect.signature` returns it without re-deriving it.

    transformers' `generate()` inspects `forward`, `prepare_inputs_for_generation` and the encoder's and decoder's
    `forward` about ten times per call (which model inputs exist), each time building the signature anew; that is
    about 0.2 ms per call on a CPU, as much as a whole decoding step of a small model. Python documents
    `__signature__` as the value `inspect.signature` returns when it is set, so the answers stay the same.
    """
    function.__signature__ = inspect.signature(function)
    return function


class RecurrentGenerationMixin:
    """Mixed into the LM and Seq2Seq heads before `GenerationMixin`."""

    lean_generation: bool = True
    # On a GPU the lean loops replay each decoding step from a CUDA graph (set False to launch it op by op).
    generation_cuda_graphs: bool = True

    # --- arguments ----------------------------------------------------------------------------------------------

    def generate(self, *args, **kwargs):
        check_generation_arguments(self, kwargs)
        return super().generate(*args, **kwargs)

    @signature_computed_once
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

    # --- lean loops -----------------------------------------------------------------------------------------------

    def _lean_loop_applies(self, generation_config, stopping_criteria, synced_gpus, streamer, model_kwargs) -> bool:
        return (
            self.lean_generation
            and not synced_gpus
            and streamer is None
            and not generation_config.output_attentions
            and not generation_config.output_hidden_states
            and not generation_config.is_assistant
            and generation_config.prefill_chunk_size is None
            and model_kwargs.get("use_cache", True)
            and all(isinstance(c, (MaxLengthCriteria, EosTokenCriteria)) for c in stopping_criteria)
            and stopping_criteria.max_length is not None
            and set(model_kwargs) <= LEAN_MODEL_KWARGS
        )

    def _lean_prefill(self, input_ids, generation_config, model_kwargs, reorders: bool):
        """transformers' prefill forward; returns the float32 logits of the last position, the cache and the
        one-token step that continues it (replayed from a CUDA graph on a GPU, see `GraphedDecodingStep`)."""
        outputs = self._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        cache = outputs.cache
        model_kwargs["cache"] = cache
        return logits, cache, self._decoding_step(self._decoding_function(model_kwargs), cache, reorders)

    def _decoding_step(self, function, cache: RNNCache, reorders: bool):
        """The driver of the one-token step: a CUDA graph on a GPU (unless `generation_cuda_graphs` is False or the
        model is training), else eager."""
        if self.generation_cuda_graphs and cache.state[0].is_cuda and not self.training:
            try:
                return GraphedDecodingStep(function, cache, reorders)
            except RuntimeError as error:  # a GPU stack that cannot capture: decode eagerly, same results
                logger.warning("CUDA graph capture failed (%s); decoding without graphs", str(error).split("\n")[0])
        return DecodingStep(function, cache)

    @signature_computed_once
    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        """Greedy search and sampling: transformers' `_sample`, with the model's one-token step."""
        if not self._lean_loop_applies(generation_config, stopping_criteria, synced_gpus, streamer, model_kwargs):
            return super()._sample(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        return_dict = generation_config.return_dict_in_generate
        scores = () if return_dict and generation_config.output_scores else None
        raw_logits = () if return_dict and generation_config.output_logits else None
        eos = stopping_eos(stopping_criteria, input_ids.device)
        pad = generation_config._pad_token_tensor
        if pad is not None:
            pad = pad.to(input_ids.device)
        max_length = stopping_criteria.max_length
        do_sample = generation_config.do_sample
        processors = LeanProcessors(logits_processor, input_ids, eos)

        logits, cache, step = self._lean_prefill(input_ids, generation_config, model_kwargs, reorders=False)
        logits = logits[:, None]  # [N, 1, V], the step's layout
        rows, length = input_ids.shape
        # Generated tokens are collected and joined once at the end, unless a logits processor reads them.
        generated = []
        unfinished = torch.ones(rows, 1, dtype=torch.bool, device=input_ids.device)
        some_finished = False  # known on the host: until then, the padding of finished rows changes nothing
        while True:
            if processors.only_min_length and scores is None and raw_logits is None:
                # on [N, 1, V] (the mask broadcasts), in place: the step's logits are kept nowhere else
                next_scores = processors(input_ids, logits, length, in_place=True)
            elif processors or scores is not None:
                next_logits = logits[:, 0]
                if processors.need_sequences and generated:
                    input_ids, generated = torch.cat([input_ids, *generated], dim=-1), []
                next_scores = processors(input_ids, next_logits, length)
                if scores is not None:
                    scores += (next_scores,)
                if raw_logits is not None:
                    raw_logits += (next_logits.clone() if processors else next_logits,)
                next_scores = next_scores[:, None]
            else:
                next_scores = logits
                if raw_logits is not None:
                    raw_logits += (logits[:, 0],)
            if do_sample:
                tokens = torch.multinomial(torch.softmax(next_scores[:, 0], dim=-1), num_samples=1)  # [N, 1]
            else:
                tokens = next_scores.argmax(dim=-1)  # [N, 1]
            if some_finished:
                tokens = torch.where(unfinished, tokens, pad)  # finished rows continue with padding
            generated.append(tokens)
            length += 1
            if length >= max_length:
                break
            if eos is not None and not processors.bans(eos, length - 1):
                unfinished &= tokens != eos if eos.numel() == 1 else ~torch.isin(tokens, eos)
                running = int(unfinished.sum())  # the loop's one host synchronisation per token
                if running == 0:
                    break
                some_finished = running < rows
            logits = step(tokens)
        step.finish()
        input_ids = torch.cat([input_ids, *generated], dim=-1) if generated else input_ids

        if not return_dict:
            return input_ids
        if self.config.is_encoder_decoder:
            return GenerateEncoderDecoderOutput(sequences=input_ids, scores=scores, logits=raw_logits, cache=cache)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, cache=cache)

    @signature_computed_once
    def _beam_search(
        self,
        input_ids: torch.LongTensor,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        **model_kwargs,
    ):
        """Beam search: transformers' vectorised `_beam_search`, with the model's one-token step."""
        if (
            generation_config.do_sample
            or generation_config.low_memory
            or not self._lean_loop_applies(generation_config, stopping_criteria, synced_gpus, None, model_kwargs)
        ):
            return super()._beam_search(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                **model_kwargs,
            )
        search = LeanBeamSearch(input_ids, generation_config, stopping_criteria, logits_processor)
        logits, cache, step = self._lean_prefill(input_ids, generation_config, model_kwargs, reorders=True)
        logits = logits[:, None]  # [N, 1, V], the step's layout
        while True:
            step.reorder(search.advance(logits))  # keep the chosen beams' states, [N] rows
            if search.done:
                break
            logits = step(search.last_tokens)
        step.finish()
        if cache.memory is not None:
            # beams only move within their sentence, whose memory rows are equal: row i still reads memory row i
            cache.bind_memory(cache.memory)
        return search.outputs(self.config.is_encoder_decoder, cache)

    def _decoding_function(self, model_kwargs: dict):
        """`step(tokens [N, 1], state, feed) -> (logits [N, 1, vocab] float32, state, feed)`: one model step, a
        function of tensors only (so a CUDA graph can capture it)."""
        raise NotImplementedError


class DecodingStep:
    """Runs the model's one-token step eagerly, continuing `cache` in place; beam reorders select rows of it."""

    def __init__(self, function, cache: RNNCache):
        self.function, self.cache = function, cache

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` `[N, 1]` -> logits `[N, 1, V]`."""
        cache = self.cache
        logits, cache.state, feed = self.function(tokens, cache.state, cache.extras.get("input_feed"))
        if feed is not None:
            cache.extras["input_feed"] = feed
        cache.num_seen_tokens += 1
        return logits

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row i of the state becomes row `beam_idx[i]` (beam search)."""
        cache = self.cache
        cache.state = tuple(tensor.index_select(1, beam_idx) for tensor in cache.state)
        if cache.extras:
            cache.extras = {name: tensor.index_select(0, beam_idx) for name, tensor in cache.extras.items()}

    def finish(self) -> None:
        """Leave the cache as the loop's last step and reorder made it."""


class GraphedDecodingStep:
    """The model's one-token step captured once in a CUDA graph and replayed at every step.

    On a GPU at decoding sizes a step is dozens of tiny kernels whose launches cost more than their work; a graph
    launches them all at once. Graphs need fixed memory: the tokens, the beam order and the state live in static
    buffers that the graph reads and writes in place, `[N, 1]`, `[N]` and the cache's state layout. The graph
    starts by selecting the rows of the previous beam order (identity for greedy search and sampling), so a beam
    search step is one replay. The source (memory, keys, padding) is fixed during one `generate()` call, and its
    tensors are captured as they are. Each call of `generate()` captures its own graph (its sizes are its own).

    Same results as `DecodingStep` (the same kernels on the same values; tested on a GPU). With `capture=False`
    (tests on the CPU) the same buffer logic runs eagerly instead of replaying.
    """

    def __init__(self, function, cache: RNNCache, reorders: bool, capture: bool = True):
        self.function, self.cache, self.reorders, self.capture = function, cache, reorders, capture
        self.state = tuple(tensor.clone() for tensor in cache.state)
        feed = cache.extras.get("input_feed")
        self.feed = None if feed is None else feed.clone()
        rows = self.state[0].shape[1]
        device = self.state[0].device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.beam_idx = torch.arange(rows, device=device)
        self.graph = None
        if capture:
            initial = (
                tuple(tensor.clone() for tensor in self.state),
                None if self.feed is None else self.feed.clone(),
            )
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (cuDNN and cuBLAS pick their kernels) outside the capture
                self._body()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._body()
            self._restore(*initial)

    def _body(self) -> torch.Tensor:
        """The captured work: reorder the state rows, one model step, write the new state in place."""
        state, feed = self.state, self.feed
        if self.reorders:
            state = tuple(tensor.index_select(1, self.beam_idx) for tensor in state)
            feed = None if feed is None else feed.index_select(0, self.beam_idx)
        logits, new_state, new_feed = self.function(self.tokens, state, feed)
        for buffer, tensor in zip(self.state, new_state):
            buffer.copy_(tensor)
        if self.feed is not None:
            self.feed.copy_(new_feed)
        return logits

    def _restore(self, state, feed) -> None:
        for buffer, tensor in zip(self.state, state):
            buffer.copy_(tensor)
        if feed is not None:
            self.feed.copy_(feed)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # the static output is overwritten by the next replay
        else:
            logits = self._body()
        self.cache.num_seen_tokens += 1
        return logits

    def reorder(self, beam_idx: torch.Tensor) -> None:
        # applied by the next step (or by `finish`); beam search reorders before every step
        self.beam_idx.copy_(beam_idx)

    def finish(self) -> None:
        """Give the cache the final state: the static buffers, with the last beam order applied."""
        state, feed = self.state, self.feed
        if self.reorders:
            state = tuple(tensor.index_select(1, self.beam_idx) for tensor in state)
            feed = None if feed is None else feed.index_select(0, self.beam_idx)
        self.cache.state = tuple(tensor.clone() for tensor in state)
        if feed is not None:
            self.cache.extras["input_feed"] = feed.clone()


class LeanProcessors:
    """transformers' logits processors, with the minimum-length ones (which `min_new_tokens` / `min_length` add)
    replaced by one operation that sets the EOS columns to minus infinity while a minimum is not reached, and none
    after: the same scores (transformers' versions build a vocabulary-sized EOS mask and rewrite every score at every
    step). Every other processor runs as it is, on the sequences so far.

    Call: `processors(input_ids [N, L], scores [N, V], length, in_place=False)`, `length` the current sequence length
    (`in_place`: the EOS columns may be set in `scores` itself, which the caller keeps nowhere else; `input_ids`
    may lag behind it when no processor reads the tokens, see `need_sequences`). With the minimum-length ban only
    (`only_min_length`), scores may also be `[N, 1, V]`.
    """

    def __init__(self, logits_processor, input_ids: torch.Tensor, eos: torch.Tensor | None):
        self.others = []
        self.min_length = 0  # ban EOS while the sequence is shorter than this
        self.eos_ids = None
        for processor in logits_processor:
            if type(processor) is MinLengthLogitsProcessor:
                self.min_length = max(self.min_length, processor.min_length)
                self.eos_ids = processor.eos_token_id
            elif type(processor) is MinNewTokensLengthLogitsProcessor:
                threshold = processor.prompt_length_to_skip + processor.min_new_tokens
                self.min_length = max(self.min_length, threshold)
                self.eos_ids = processor.eos_token_id
            else:
                self.others.append(processor)
        self._bans = {}  # id of a stopping EOS tensor -> whether the minimum length bans all its ids
        self.need_sequences = bool(self.others)
        self.only_min_length = self.min_length > 0 and not self.others
        if self.min_length:
            self._eos_ids = torch.as_tensor(self.eos_ids, device=input_ids.device).flatten().long()

    def __bool__(self) -> bool:
        return bool(self.others) or self.min_length > 0

    def bans(self, eos: torch.Tensor, length: int) -> bool:
        """Whether the minimum-length ban made every id of `eos` impossible at a sequence length of `length` (the
        EOS bookkeeping of that step is then a no-op and is skipped; the other processors cannot raise a score
        from minus infinity)."""
        if length >= self.min_length:
            return False
        if id(eos) not in self._bans:  # read the ids once per call: on a GPU every read is a synchronisation
            banned = set(self._eos_ids.tolist())
            self._bans[id(eos)] = set(eos.tolist()) <= banned and 0 not in banned  # (an all -inf row's argmax is 0)
        return self._bans[id(eos)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, length: int, in_place: bool = False):
        if length < self.min_length:
            # the EOS columns only (N values each), in place when allowed: no copy of the [N, V] scores
            fill = scores.index_fill_ if in_place else scores.index_fill
            scores = fill(-1, self._eos_ids, -math.inf)
        for processor in self.others:
            scores = processor(input_ids, scores)
        return scores


class LeanBeamSearch:
    """The state of one beam search, advanced one step at a time; mirrors transformers' `_beam_search`.

    Shapes: B sentences, W = num_beams, K = max(2, 1 + number of EOS tokens) * W candidates per sentence and step,
    V vocabulary, N = B * W rows. A candidate is coded as `parent * V + token` (its index among a sentence's W * V
    continuations, as `topk` returns it). The running beams are kept as scores `[B, W, 1]` and the codes of all
    their steps `[N, t]` (reordered with the beams); the finished hypotheses as a pool of W per sentence (scores,
    whether filled, and their codes).
    """

    def __init__(self, input_ids, generation_config, stopping_criteria, logits_processor):
        config = generation_config
        device = input_ids.device
        self.num_beams = config.num_beams
        self.num_return_sequences = config.num_return_sequences
        self.length_penalty = config.length_penalty
        self.early_stopping = config.early_stopping
        self.max_length = stopping_criteria.max_length
        self.output_scores = config.return_dict_in_generate and config.output_scores
        self.output_logits = config.return_dict_in_generate and config.output_logits
        self.return_dict = config.return_dict_in_generate
        self.eos = stopping_eos(stopping_criteria, device)
        self.processors = LeanProcessors(logits_processor, input_ids, self.eos)
        eos_token_id, pad_token_id = config._eos_token_tensor, config._pad_token_tensor
        # transformers' fill value of unused positions, expression for expression (`pad or eos[0]`)
        self.fill = (pad_token_id or eos_token_id[0]) if eos_token_id is not None else -1
        n_eos = eos_token_id.shape[0] if eos_token_id is not None else 0
        self.num_candidates = max(2, 1 + n_eos) * self.num_beams

        rows, self.prompt_length = input_ids.shape
        self.batch_size = rows // self.num_beams
        self.prompt = input_ids
        self.cur_len = self.prompt_length
        shape = (self.batch_size, self.num_beams)
        self.running_scores = torch.zeros(*shape, 1, dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9  # only the first beam is live at the start
        self.batch_offset = torch.arange(self.batch_size, device=device)[:, None] * self.num_beams  # [B, 1]
        self.history = input_ids.new_empty(rows, 0)  # codes of the running beams, [N, t]
        # the pool of finished hypotheses: transformers' `sequences` / `beam_scores` / `is_sent_finished`
        self.pool_scores = torch.full(shape, -1e9, dtype=torch.float, device=device)
        self.pool_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.pool_codes = input_ids.new_full((*shape, 0), -1)  # [B, W, t], -1 after a hypothesis' end
        self.pool_is_full = False  # every slot of every sentence holds a finished hypothesis (known on the host)
        self.any_finished = False  # some slot holds a finished hypothesis (known on the host)
        self.improvable = torch.ones(self.batch_size, 1, dtype=torch.bool, device=device)
        self.all_scores = () if self.output_scores else None
        self.raw_logits = () if self.output_logits else None
        self.flat_running = input_ids  # the running sequences, kept only for processors that read them
        self.last_tokens = None
        self.done = False

    def advance(self, logits: torch.Tensor) -> torch.Tensor:
        """One step from the running beams' next-token logits `[N, 1, V]`; returns the rows of the beams kept."""
        B, W, K = self.batch_size, self.num_beams, self.num_candidates
        log_probs = torch.log_softmax(logits, dim=-1)
        if self.processors or self.raw_logits is not None or self.all_scores is not None:
            logits, log_probs = logits[:, 0], log_probs[:, 0]  # [N, V], as processors and outputs have them
            if self.processors:
                log_probs = self.processors(self.flat_running, log_probs, self.cur_len, in_place=True)
            if self.raw_logits is not None:
                self.raw_logits += (logits.clone(),)
            if self.all_scores is not None:
                self.all_scores += (log_probs.clone(),)
        vocab = self._vocab_size = log_probs.shape[-1]
        if self.processors.others:  # transformers' processors made these scores: leave them as they are
            accumulated = (log_probs.view(B, W, vocab) + self.running_scores).view(B, W * vocab)
        else:  # this step's own log-probabilities (a copy is kept if asked): the same sums in place, no new [N, V]
            accumulated = log_probs.view(B, W, vocab).add_(self.running_scores).view(B, W * vocab)

        # top-K continuations over all beams of a sentence; which of them stop (EOS, or the maximum length)
        top_scores, top_codes = torch.topk(accumulated, k=K)  # codes: parent * V + token
        last_step = self.cur_len + 1 >= self.max_length
        if last_step:
            hits = torch.ones_like(top_codes, dtype=torch.bool)
        elif self.eos is not None and not self.processors.bans(self.eos, self.cur_len):
            tokens = top_codes % vocab
            hits = tokens == self.eos if self.eos.numel() == 1 else torch.isin(tokens, self.eos)
        else:
            hits = None

        # the running beams of the next step: the best W candidates that did not stop
        masked = top_scores if hits is None else top_scores + hits * -1.0e9
        chosen = torch.topk(masked, k=W)[1]  # [B, W], positions among the K
        self.running_scores = masked.gather(1, chosen)[..., None]
        codes = top_codes.gather(1, chosen)  # [B, W]
        beam_idx = (codes // vocab + self.batch_offset).view(-1)
        self.last_tokens = (codes % vocab).view(B * W, 1)
        previous_history = self.history
        self.history = torch.cat([previous_history.index_select(0, beam_idx), codes.view(B * W, 1)], dim=1)
        if self.processors.need_sequences:
            self.flat_running = torch.cat([self.flat_running.index_select(0, beam_idx), self.last_tokens], dim=-1)

        # finished hypotheses among the best W candidates enter the pool (one host synchronisation per step)
        if hits is not None:
            finished_now = hits[:, :W]  # topk is sorted: the best W candidates come first
            if last_step or bool(finished_now.any()):
                self._update_pool(top_scores, top_codes, hits, previous_history, vocab)
        self.cur_len += 1
        if self.any_finished:
            self._update_improvable()
        self.done = last_step or not self._can_continue()
        return beam_idx

    def _update_pool(self, top_scores, top_codes, hits, previous_history, vocab) -> None:
        """transformers' `_update_finished_beams`: the same scores, penalties and top-W merge."""
        B, W, K = self.batch_size, self.num_beams, self.num_candidates
        finished_now = hits.clone()
        finished_now[:, W:] = False  # only the best W candidates can be returned
        scores = top_scores / ((self.cur_len + 1 - self.prompt_length) ** self.length_penalty)
        if self.early_stopping is True:
            scores += self.pool_finished.all(dim=-1, keepdim=True).to(torch.float32) * -1.0e9
        scores += (~self.improvable).to(torch.float32) * -1.0e9
        scores += (~finished_now) * -1.0e9
        merged = torch.cat((self.pool_scores, scores), dim=1)
        keep = torch.topk(merged, k=W)[1]
        self.pool_scores = merged.gather(1, keep)
        # the candidates' codes: their parent's history, then their own code
        steps = previous_history.shape[1]
        parents = top_codes // vocab + self.batch_offset  # [B, K], flat rows of the previous step
        candidates = torch.cat(
            [previous_history.index_select(0, parents.view(-1)).view(B, K, steps), top_codes[..., None]], dim=2
        )
        pool = torch.nn.functional.pad(self.pool_codes, (0, steps + 1 - self.pool_codes.shape[2]), value=-1)
        merged_codes = torch.cat((pool, candidates), dim=1)
        self.pool_codes = merged_codes.gather(1, keep[..., None].expand(-1, -1, steps + 1))
        self.pool_finished = torch.cat((self.pool_finished, finished_now), dim=1).gather(1, keep)
        self.pool_is_full = bool(self.pool_finished.all())
        self.any_finished = True

    def _update_improvable(self) -> None:
        """transformers' `_check_early_stop_heuristic`; a sentence's value can only change once all its pool slots
        hold finished hypotheses, so nothing is computed before the first one finishes."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = self.cur_len - self.prompt_length
        best_running = self.running_scores[:, :1, 0] / (best_length**self.length_penalty)
        worst_finished = torch.where(self.pool_finished, torch.min(self.pool_scores, dim=1, keepdim=True)[0], -1.0e9)
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    def _can_continue(self) -> bool:
        """transformers' `_beam_search_has_unfinished_sequences` (without the max-length term, handled above)."""
        if not self.pool_is_full:
            return True  # an open slot keeps every sentence improvable, and early stopping needs a full pool
        if self.early_stopping is True:
            return False
        return bool(self.improvable.any())

    def outputs(self, encoder_decoder: bool, cache):
        """The best `num_return_sequences` finished hypotheses per sentence, as transformers returns them."""
        B, W, R = self.batch_size, self.num_beams, self.num_return_sequences
        device = self.pool_codes.device
        codes = self.pool_codes[:, :R].reshape(B * R, -1)  # [B * R, t], -1 after the end (or an empty slot)
        valid = codes >= 0
        generated = int(valid.sum(dim=1).max()) if codes.shape[1] else 0
        codes, valid = codes[:, :generated], valid[:, :generated]
        vocab = self._vocab_size
        tokens = torch.where(valid, codes % vocab, torch.as_tensor(self.fill, device=device))
        prompt = self.prompt.view(B, W, -1)[:, 0].repeat_interleave(R, dim=0)
        sequences = torch.cat([prompt, tokens], dim=1)
        if not self.return_dict:
            return sequences
        sentence = torch.arange(B, device=device).repeat_interleave(R)[:, None]
        beam_indices = torch.where(valid, codes // vocab + sentence * W, -1).to(torch.int32)
        output_class = GenerateBeamEncoderDecoderOutput if encoder_decoder else GenerateBeamDecoderOnlyOutput
        return output_class(
            sequences=sequences,
            sequences_scores=self.pool_scores[:, :R].reshape(-1) if self.output_scores else None,
            scores=self.all_scores,
            logits=self.raw_logits,
            beam_indices=beam_indices,
            cache=cache,
        )


def stopping_eos(stopping_criteria, device) -> torch.Tensor | None:
    """The EOS ids of the stopping criteria (a 1-D tensor on `device`), or None."""
    for criterion in stopping_criteria:
        if isinstance(criterion, EosTokenCriteria):
            return criterion.eos_token_id.to(device)
    return None


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


def check_generation_arguments(model, kwargs: dict) -> None:
    """Refuse, before any work, generation values transformers would crash on or silently misuse."""
    config = kwargs.get("generation_config") or model.generation_config

    def value(name):
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    for name in ("num_beams", "num_return_sequences"):
        number = value(name)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {number!r}.")
    top_p = value("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be a number in (0, 1], got {top_p!r}.")
    vocab_size = model.config.vocab_size
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
        ids = value(name)
        if ids is None or (name == "decoder_start_token_id" and not model.config.is_encoder_decoder):
            continue
        for token_id in ids.tolist() if isinstance(ids, torch.Tensor) else ids if isinstance(ids, list) else [ids]:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(f"`{name}` must be a token id in [0, vocab_size={vocab_size}), got {ids!r}.")


__all__ = [
    "LeanBeamSearch",
    "LeanProcessors",
    "RecurrentGenerationMixin",
    "check_generation_arguments",
    "signature_computed_once",
    "unseen_length",
]
