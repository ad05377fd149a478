"""Per-step framework overhead: our decoding and training steps against bare loops of raw torch ops (issue 12).

At tiny sizes (hidden 32, vocabulary 100, batch 8, one thread) the arithmetic is negligible and a step costs what
the framework does around it: the regime of a launch-bound GPU, reproduced on any CPU. The script reports, for the
same weights and inputs, the median time of each variant over interleaved rounds, its ratio to the bare loop, and
the number of top-level aten ops (torch profiler; see `bench_common.py` for the exact definition) per call, per
generated token (ops of the whole call / steps) and per step (marginal: (ops of 20 steps - ops of 10 steps) / 10,
which removes the setup of a call), plus the host reads of tensor values per step (syncs on a GPU).

Seq2Seq model: bi-LSTM encoder (2 layers), LSTM decoder (2 layers), Luong "general" attention, bridge "last",
no dropout, no input feeding (the training table also has the input-feeding model).
- bare greedy / bare beam 5 / bare sampling: loops written here from torch ops over the model's OWN modules: the
  encoder's embedding and `nn.LSTM`, the decoder's embedding and `nn.LSTM`, the general attention's
  `memory_projection` with two `bmm` and a softmax, the attentional layer, the output projection; then `argmax`,
  or `log_softmax` + `topk` + `index_select` for beams, or `softmax` + `multinomial` for sampling. No checks, no
  cache object: the eager floor.
- forward loop greedy / beam 5: hand-written loops calling the model's forward with its cache (the model's own cost
  without generate()).
- generate() greedy / beam 5 / sampling: `model.generate(...)`.
- forward step: one cached decoder step of `model(...)` alone (ops only).
Training (forward + backward + Adam), in target tokens per second against bound B (bare LSTM stacks + vocabulary
projection + cross-entropy, as in `bench_seq2seq.py`): the fused decoder and the input-feeding decoder, and "bare
fused", the fused model's loss written from raw ops over its own modules (`bare_seq2seq_loss`): bound B plus the
attention and bridge arithmetic, the eager floor of the fused row ("of bare" is each row's time against it); and
"input feeding, fused-op steps", the input-feeding model with `RecurrentStack.cell_steps = False` (its recurrent
steps through the fused op, the reference of the cell ops that CPU training uses).
LM (RNNLMForCausalLM, 2-layer LSTM): bare greedy / beam / sampling over its embedding, `nn.LSTM` and projection,
a forward loop, and generate() greedy / beam / sampling, continuing a prompt of the same length.

Every decode is 20 forced steps: `min_new_tokens = max_new_tokens = 20`. The decoding models are initialised
with `initializer_range=0.5` and their output projection scaled to logits of standard deviation 4, so that
next-token distributions are peaked as in a trained model (near-uniform ones make beam hypotheses tie to the last
bit). So that the bare loops (which have no EOS handling) and generate() (which bans EOS until the minimum length)
pick the same tokens, the output bias of the EOS token is set to -1e4: no path ever picks EOS, and the banned
logit underflows to the same zero probability either way. The script asserts that each bare loop and generate()
give identical tokens (sampling: from the same seed) before timing anything; `tests/test_benchmarks.py` checks the
same.

    python benchmarks/bench_overhead.py                     # tiny sizes, CPU, 1 thread -> results/overhead_cpu.json
    python benchmarks/bench_overhead.py --anchor --device cuda  # anchor sizes on a GPU
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bench_common import (
    BareStacks,
    OpCount,
    count_ops,
    count_training_ops,
    handwritten_beam_search,
    handwritten_greedy,
    machine_info,
    medians,
    per_step,
    synchronize,
    time_rounds,
    training_step_fn,
    write_json,
)
from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM, RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration
from rnn_seq2seq_hf.models.recurrent import RecurrentStack

EOS_BIAS = -1e4


@dataclass(frozen=True)
class Size:
    hidden: int
    embedding: int
    vocab: int
    batch: int
    length: int  # source length, prompt length and number of decode steps
    layers: int
    beams: int


TINY = Size(hidden=32, embedding=32, vocab=100, batch=8, length=20, layers=2, beams=5)
ANCHOR = Size(hidden=512, embedding=512, vocab=10_000, batch=128, length=20, layers=2, beams=5)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def seq2seq_config(size: Size, input_feeding: bool = False) -> RNNSeq2SeqConfig:
    """The benchmark's Seq2Seq model: bi-LSTM encoder, LSTM decoder, general attention, bridge "last"."""
    return RNNSeq2SeqConfig(
        vocab_size=size.vocab,
        embedding_size=size.embedding,
        hidden_size=size.hidden,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        cell_type="lstm",
        bidirectional_encoder=True,
        attention_type="general",
        bridge="last",
        input_feeding=input_feeding,
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
    )


def lm_config(size: Size) -> RNNLMConfig:
    return RNNLMConfig(
        vocab_size=size.vocab,
        embedding_size=size.embedding,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        cell_type="lstm",
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
    )


@torch.no_grad()
def prepare_for_decoding(model, logit_std: float = 4.0):
    """Make a freshly initialised model decode like a trained one, and forced-length decoding exact.

    1. Sharpen: scale the output projection until logits have standard deviation `logit_std`. A default-initialised
       model is so close to uniform that beam hypotheses tie to the last bit, and the winner then depends on the
       order of float additions rather than on the search: bare and generate() beams would disagree for no reason.
    2. Make EOS unreachable (output bias -1e4): forced 20-step decoding then needs no EOS handling to be exact.
    """
    model.eval()
    device = model.device
    generator = torch.Generator().manual_seed(123)
    probe = torch.randint(3, model.config.vocab_size, (4, 6), generator=generator).to(device)
    inputs = {"input_ids": probe}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = probe
    for _ in range(5):
        logits = model(**inputs).logits
        std = (logits - logits.mean(-1, keepdim=True)).std().item()
        model.lm_head.linear.weight.mul_(logit_std / std)
    model.lm_head.linear.bias[model.config.eos_token_id] = EOS_BIAS
    return model


def build_seq2seq(size: Size, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    config = seq2seq_config(size)
    config.initializer_range = 0.5
    return prepare_for_decoding(RNNSeq2SeqForConditionalGeneration(config).to(device))


def build_lm(size: Size, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    config = lm_config(size)
    config.initializer_range = 0.5
    return prepare_for_decoding(RNNLMForCausalLM(config).to(device))


def generate_kwargs(steps: int) -> dict:
    return dict(max_new_tokens=steps, min_new_tokens=steps)


# ---------------------------------------------------------------------------------------------------------------
# Bare loops, Seq2Seq: raw torch ops over the model's own modules
# ---------------------------------------------------------------------------------------------------------------


def _seq2seq_modules(model):
    config = model.config
    if not (
        config.cell_type == "lstm"
        and config.attention_type == "general"
        and config.bridge == "last"
        and config.bidirectional_encoder
        and not config.input_feeding
        and config.encoder_layers == config.decoder_layers
        and not config.tie_word_embeddings
    ):
        raise ValueError("the bare Seq2Seq loops cover the benchmark's architecture only (see seq2seq_config)")
    encoder, decoder = model.model.encoder, model.model.decoder
    return encoder, decoder


def bare_seq2seq_encode(model, source: torch.Tensor, expand: int = 1):
    """Encoder and bridge from raw ops (no padding: every source token is real).

    Returns memory `[N, S, H]`, the attention keys transposed `[N, H, S]` and the decoder state `(h, c)`, each
    `[L, N, H]`, with N = B * expand rows (each sentence repeated `expand` times, as generate() expands for beams:
    it encodes B rows and repeats the results, and the model projects the repeated memory).
    """
    encoder, decoder = _seq2seq_modules(model)
    batch_size, layers = source.shape[0], model.config.encoder_layers
    memory, final = encoder.rnn.rnn(encoder.embed_tokens(source))  # [B, S, H], 2 x [L * 2, B, H / 2]
    # bridge "last": each layer's [forward; backward] final state
    state = tuple(t.view(layers, 2, batch_size, -1).permute(0, 2, 1, 3).reshape(layers, batch_size, -1) for t in final)
    if expand > 1:
        memory = memory.repeat_interleave(expand, dim=0)
        state = tuple(t.repeat_interleave(expand, dim=1) for t in state)
    keys_t = decoder.attention.memory_projection(memory).transpose(1, 2)  # [N, H, S]: W_a m, once per sentence
    return memory, keys_t, state


def bare_seq2seq_loss(model, source: torch.Tensor, decoder_input_ids: torch.Tensor, labels: torch.Tensor):
    """The fused model's training loss from raw ops over its own modules (no padding, no dropout): encoder, bridge
    "last", one decoder `nn.LSTM` call over all target positions, batched general attention, attentional layer,
    projection, mean cross-entropy. The floor of the "fused" training row: bound B plus the attention and bridge
    arithmetic that bound B leaves out."""
    decoder, lm_head = model.model.decoder, model.lm_head.linear
    memory, keys_t, state = bare_seq2seq_encode(model, source)
    outputs, _ = decoder.rnn.rnn(decoder.embed_tokens(decoder_input_ids), state)  # [B, T, H]
    weights = torch.softmax(torch.bmm(outputs, keys_t), dim=-1)  # [B, T, S]
    attentional = torch.tanh(decoder.attentional_layer(torch.cat([torch.bmm(weights, memory), outputs], dim=-1)))
    logits = lm_head(attentional)
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _bare_seq2seq_step(decoder, lm_head, tokens, state, memory, keys_t):
    """One decoder step: tokens `[N, 1]` -> logits `[N, 1, V]` and the new state."""
    output, state = decoder.rnn.rnn(decoder.embed_tokens(tokens), state)  # [N, 1, H]
    weights = torch.softmax(torch.bmm(output, keys_t), dim=-1)  # [N, 1, S]
    context = torch.bmm(weights, memory)  # [N, 1, H]
    attentional = torch.tanh(decoder.attentional_layer(torch.cat([context, output], dim=-1)))
    return lm_head(attentional), state


@torch.no_grad()
def bare_seq2seq_greedy(model, source: torch.Tensor, steps: int, return_logits: bool = False):
    """Greedy decoding, `[B, 1 + steps]` (start token first), and the logits `[B, steps, V]` if asked."""
    decoder, lm_head = model.model.decoder, model.lm_head.linear
    memory, keys_t, state = bare_seq2seq_encode(model, source)
    tokens = torch.full((source.shape[0], 1), model.config.decoder_start_token_id, device=source.device)
    outputs, logits_per_step = [tokens], []
    for _ in range(steps):
        logits, state = _bare_seq2seq_step(decoder, lm_head, tokens, state, memory, keys_t)
        tokens = logits.argmax(-1)  # [B, 1]
        outputs.append(tokens)
        logits_per_step.append(logits)
    tokens = torch.cat(outputs, dim=1)
    return (tokens, torch.cat(logits_per_step, dim=1)) if return_logits else tokens


@torch.no_grad()
def bare_seq2seq_sample(model, source: torch.Tensor, steps: int):
    """Pure sampling (softmax + multinomial), `[B, 1 + steps]`; same tokens as generate(do_sample=True) when both
    start from the same seed."""
    decoder, lm_head = model.model.decoder, model.lm_head.linear
    memory, keys_t, state = bare_seq2seq_encode(model, source)
    batch_size = source.shape[0]
    tokens = torch.full((batch_size, 1), model.config.decoder_start_token_id, device=source.device)
    outputs = [tokens]
    for _ in range(steps):
        logits, state = _bare_seq2seq_step(decoder, lm_head, tokens, state, memory, keys_t)
        tokens = torch.multinomial(torch.softmax(logits.view(batch_size, -1), dim=-1), 1)  # [B, 1]
        outputs.append(tokens)
    return torch.cat(outputs, dim=1)


def _beam_step(logprobs, scores, offsets, beams: int):
    """Pick the `beams` best continuations of each sentence among beams x vocabulary.

    logprobs `[B * K, V]`, scores `[B * K, 1]` (running sums). Returns the new scores `[B * K, 1]`, the source
    row of each new hypothesis `[B * K]` and its token `[B * K, 1]`.
    """
    vocab = logprobs.shape[-1]
    total = (scores + logprobs).view(-1, beams * vocab)  # [B, K * V]
    top, index = total.topk(beams, dim=-1)  # [B, K], best first
    rows = (offsets + index // vocab).view(-1)
    return top.view(-1, 1), rows, (index % vocab).view(-1, 1)


def _initial_beam_scores(batch_size: int, beams: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.zeros(batch_size, beams, device=device)
    scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    offsets = (torch.arange(batch_size, device=device) * beams)[:, None]  # [B, 1]
    return scores.view(-1, 1), offsets


@torch.no_grad()
def bare_seq2seq_beam_search(model, source: torch.Tensor, steps: int, beams: int) -> torch.Tensor:
    """Fixed-length beam search; returns the best hypothesis of each sentence, `[B, 1 + steps]`."""
    decoder, lm_head = model.model.decoder, model.lm_head.linear
    batch_size = source.shape[0]
    memory, keys_t, state = bare_seq2seq_encode(model, source, expand=beams)
    scores, offsets = _initial_beam_scores(batch_size, beams, source.device)
    history = torch.full((batch_size * beams, 1), model.config.decoder_start_token_id, device=source.device)
    for _ in range(steps):
        logits, state = _bare_seq2seq_step(decoder, lm_head, history[:, -1:], state, memory, keys_t)
        logprobs = torch.log_softmax(logits.view(batch_size * beams, -1), dim=-1)  # [B * K, V]
        scores, rows, tokens = _beam_step(logprobs, scores, offsets, beams)
        state = tuple(t.index_select(1, rows) for t in state)
        history = torch.cat([history.index_select(0, rows), tokens], dim=1)
    return history.view(batch_size, beams, -1)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# Bare loops, LM
# ---------------------------------------------------------------------------------------------------------------


def _lm_modules(model):
    config = model.config
    if config.cell_type != "lstm" or config.input_to_output or config.tie_word_embeddings:
        raise ValueError("the bare LM loops cover the benchmark's architecture only (see lm_config)")
    return model.model.embed_tokens, model.model.rnn.rnn, model.lm_head.linear


@torch.no_grad()
def bare_lm_greedy(model, prompt: torch.Tensor, steps: int, return_logits: bool = False):
    """Continue `prompt` `[B, P]` greedily: `[B, P + steps]`, and the logits `[B, steps, V]` if asked."""
    embed, lstm, lm_head = _lm_modules(model)
    output, state = lstm(embed(prompt))
    logits = lm_head(output[:, -1:])  # [B, 1, V]
    outputs, logits_per_step = [prompt], [logits]
    for step in range(steps):
        tokens = logits.argmax(-1)  # [B, 1]
        outputs.append(tokens)
        if step + 1 < steps:
            output, state = lstm(embed(tokens), state)
            logits = lm_head(output)
            logits_per_step.append(logits)
    tokens = torch.cat(outputs, dim=1)
    return (tokens, torch.cat(logits_per_step, dim=1)) if return_logits else tokens


@torch.no_grad()
def bare_lm_sample(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    embed, lstm, lm_head = _lm_modules(model)
    batch_size = prompt.shape[0]
    output, state = lstm(embed(prompt))
    logits = lm_head(output[:, -1:])
    outputs = [prompt]
    for step in range(steps):
        tokens = torch.multinomial(torch.softmax(logits.view(batch_size, -1), dim=-1), 1)
        outputs.append(tokens)
        if step + 1 < steps:
            output, state = lstm(embed(tokens), state)
            logits = lm_head(output)
    return torch.cat(outputs, dim=1)


@torch.no_grad()
def bare_lm_beam_search(model, prompt: torch.Tensor, steps: int, beams: int) -> torch.Tensor:
    """Fixed-length beam search continuing `prompt`; the best hypothesis per row, `[B, P + steps]`."""
    embed, lstm, lm_head = _lm_modules(model)
    batch_size = prompt.shape[0]
    history = prompt.repeat_interleave(beams, dim=0)  # generate() expands the prompt before the first forward
    output, state = lstm(embed(history))
    logits = lm_head(output[:, -1:])
    scores, offsets = _initial_beam_scores(batch_size, beams, prompt.device)
    for step in range(steps):
        logprobs = torch.log_softmax(logits.view(batch_size * beams, -1), dim=-1)
        scores, rows, tokens = _beam_step(logprobs, scores, offsets, beams)
        history = torch.cat([history.index_select(0, rows), tokens], dim=1)
        if step + 1 < steps:
            state = tuple(t.index_select(1, rows) for t in state)
            output, state = lstm(embed(tokens), state)
            logits = lm_head(output)
    return history.view(batch_size, beams, -1)[:, 0]


@torch.no_grad()
def lm_forward_loop_greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding calling the LM's forward with its cache and a growing mask, as generate() feeds it."""
    mask = torch.ones_like(prompt)
    out = model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
    tokens = [prompt]
    for step in range(steps):
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_tokens)
        if step + 1 < steps:
            mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
            out = model(input_ids=next_tokens, attention_mask=mask, cache=out.cache, use_cache=True, logits_to_keep=1)
    return torch.cat(tokens, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


TOKEN_CHECKS: dict[str, float] = {}  # name -> fraction of rows that differ from the bare loop's (0.0 = identical)


def check_same_tokens(name: str, expected: torch.Tensor, got: torch.Tensor) -> None:
    """Assert that a variant decodes exactly the bare loop's tokens.

    On a GPU, kernels chosen per call shape may round differently from the bare loop's, and one flipped near-tie
    changes a whole row; there the mismatch is recorded (`token_checks` in the JSON) and warned about instead of
    ending a run on a borrowed machine. On a CPU any difference is an error.
    """
    if expected.shape != got.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} differs from the bare loop's {tuple(expected.shape)}")
    differing = (expected.cpu() != got.cpu()).any(dim=-1).float().mean().item()
    TOKEN_CHECKS[name] = differing
    if differing == 0.0:
        return
    message = f"{name}: {differing:.1%} of the rows differ from the bare loop's tokens"
    if expected.device.type == "cpu":
        raise AssertionError(f"{message}; the bare loop is not a faithful floor")
    print(f"WARNING: {message} (GPU rounding; recorded in token_checks)")


def reference_loops(generate, beams: int, device: torch.device) -> dict:
    """generate() with transformers' own decoding loops (`lean_generation = False`: the library before its lean
    loops) and, on a GPU, the lean loops without CUDA graphs: the baselines of the speed-ups."""
    loops = {
        "generate() greedy [transformers loop]": lambda n: generate(n, lean=False, do_sample=False, num_beams=1),
        f"generate() beam {beams} [transformers loop]": lambda n: generate(
            n, lean=False, do_sample=False, num_beams=beams
        ),
    }
    if device.type == "cuda":
        loops["generate() greedy [no CUDA graphs]"] = lambda n: generate(n, graphs=False, do_sample=False, num_beams=1)
        loops[f"generate() beam {beams} [no CUDA graphs]"] = lambda n: generate(
            n, graphs=False, do_sample=False, num_beams=beams
        )
    return loops


def check_reference_loops(variants: dict, beams: int, steps: int) -> None:
    """The lean loops (with or without graphs) give transformers' tokens."""
    for kind in ("greedy", f"beam {beams}"):
        reference = variants[f"generate() {kind} [transformers loop]"](steps)
        for name in (f"generate() {kind}", f"generate() {kind} [no CUDA graphs]"):
            if name in variants:
                check_same_tokens(name, reference, variants[name](steps))


def add_speedups(table: dict, beams: int) -> None:
    """Time of transformers' loop / time of each lean variant (issue 12: beam 5 at least 3x on a GPU)."""
    for kind in ("greedy", f"beam {beams}"):
        reference = table[f"generate() {kind} [transformers loop]"]["seconds"]
        for name in (f"generate() {kind}", f"generate() {kind} [no CUDA graphs]"):
            if name in table:
                table[name]["speedup_over_transformers_loop"] = reference / table[name]["seconds"]


def seeded(fn: Callable[[], torch.Tensor], seed: int = 1234) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        torch.manual_seed(seed)
        return fn()

    return call


def decode_table(
    variants: dict[str, Callable[[int], object]],
    baselines: dict[str, str],
    steps: int,
    rounds: int,
    repeats: int,
    device: torch.device,
) -> dict:
    """Time every variant (interleaved rounds) and count its ops at `steps` and `steps // 2` decode steps.

    `variants` maps a name to a function of the number of steps; `baselines` maps a name to its bare loop's name.
    """
    samples = time_rounds({name: (lambda fn=fn: fn(steps)) for name, fn in variants.items()}, rounds, device, repeats)
    seconds = medians(samples)
    table = {}
    for name, fn in variants.items():
        full: OpCount = count_ops(lambda fn=fn: fn(steps))
        half: OpCount = count_ops(lambda fn=fn: fn(steps // 2))
        baseline = baselines.get(name)
        table[name] = {
            "seconds": seconds[name],
            "seconds_samples": samples[name],
            "time_over_bare": seconds[name] / seconds[baseline] if baseline else None,
            "ops_per_call": full.ops,
            "ops_per_token": full.ops / steps,
            "non_view_ops_per_token": full.non_view_ops / steps,
            **per_step(full, half, steps - steps // 2),
            "syncs_per_call": full.syncs,
            "top_ops_per_call": full.by_name,
        }
    for name, row in table.items():
        baseline = baselines.get(name)
        row["ops_per_token_over_bare"] = row["ops_per_token"] / table[baseline]["ops_per_token"] if baseline else None
    return table


def seq2seq_decoding(size: Size, device: torch.device, rounds: int, repeats: int) -> tuple[dict, dict]:
    model = build_seq2seq(size, device)
    source = torch.randint(3, size.vocab, (size.batch, size.length), device=device)
    mask = torch.ones_like(source)
    steps, beams = size.length, size.beams

    def generate(n: int, lean: bool = True, graphs: bool = True, **kwargs):
        model.lean_generation, model.generation_cuda_graphs = lean, graphs
        return model.generate(input_ids=source, attention_mask=mask, **generate_kwargs(n), **kwargs)

    variants = {
        "bare greedy": lambda n: bare_seq2seq_greedy(model, source, n),
        "forward loop greedy": lambda n: handwritten_greedy(model, source, mask, n),
        "generate() greedy": lambda n: generate(n, do_sample=False, num_beams=1),
        f"bare beam {beams}": lambda n: bare_seq2seq_beam_search(model, source, n, beams),
        f"forward loop beam {beams}": lambda n: handwritten_beam_search(model, source, mask, n, beams),
        f"generate() beam {beams}": lambda n: generate(n, do_sample=False, num_beams=beams),
        "bare sampling": lambda n: bare_seq2seq_sample(model, source, n),
        "generate() sampling": lambda n: generate(n, do_sample=True, num_beams=1, top_k=0),
        **reference_loops(generate, beams, device),
    }
    # The floor must be faithful: identical tokens before anything is timed.
    greedy = variants["bare greedy"](steps)
    check_same_tokens("forward loop greedy", greedy, variants["forward loop greedy"](steps))
    check_same_tokens("generate() greedy", greedy, variants["generate() greedy"](steps))
    beam = variants[f"bare beam {beams}"](steps)
    loop_beams = variants[f"forward loop beam {beams}"](steps).view(size.batch, beams, -1)[:, 0]
    check_same_tokens(f"forward loop beam {beams}", beam, loop_beams)
    check_same_tokens(f"generate() beam {beams}", beam, variants[f"generate() beam {beams}"](steps))
    sample = seeded(lambda: variants["bare sampling"](steps))()
    check_same_tokens("generate() sampling", sample, seeded(lambda: variants["generate() sampling"](steps))())

    check_reference_loops(variants, beams, steps)
    baselines = {
        "forward loop greedy": "bare greedy",
        "generate() greedy": "bare greedy",
        f"forward loop beam {beams}": f"bare beam {beams}",
        f"generate() beam {beams}": f"bare beam {beams}",
        "generate() sampling": "bare sampling",
        **{name: ("bare greedy" if "greedy" in name else f"bare beam {beams}") for name in variants if "[" in name},
    }
    table = decode_table(variants, baselines, steps, rounds, repeats, device)
    add_speedups(table, beams)

    # One cached decoder step of the model alone (the second step, so the cache exists).
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=mask)
        start = torch.full((size.batch, 1), model.config.decoder_start_token_id, device=device)
        cache = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=start).cache
        step = count_ops(
            lambda: model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=start, cache=cache)
        )
    forward_step = {"ops": step.ops, "non_view_ops": step.non_view_ops, "syncs": step.syncs, "top_ops": step.by_name}
    return table, forward_step


def lm_decoding(size: Size, device: torch.device, rounds: int, repeats: int) -> tuple[dict, dict]:
    model = build_lm(size, device)
    prompt = torch.randint(3, size.vocab, (size.batch, size.length), device=device)
    mask = torch.ones_like(prompt)
    steps, beams = size.length, size.beams

    def generate(n: int, lean: bool = True, graphs: bool = True, **kwargs):
        model.lean_generation, model.generation_cuda_graphs = lean, graphs
        return model.generate(input_ids=prompt, attention_mask=mask, **generate_kwargs(n), **kwargs)

    variants = {
        "bare greedy": lambda n: bare_lm_greedy(model, prompt, n),
        "forward loop greedy": lambda n: lm_forward_loop_greedy(model, prompt, n),
        "generate() greedy": lambda n: generate(n, do_sample=False, num_beams=1),
        f"bare beam {beams}": lambda n: bare_lm_beam_search(model, prompt, n, beams),
        f"generate() beam {beams}": lambda n: generate(n, do_sample=False, num_beams=beams),
        "bare sampling": lambda n: bare_lm_sample(model, prompt, n),
        "generate() sampling": lambda n: generate(n, do_sample=True, num_beams=1, top_k=0),
        **reference_loops(generate, beams, device),
    }
    greedy = variants["bare greedy"](steps)
    check_same_tokens("LM forward loop greedy", greedy, variants["forward loop greedy"](steps))
    check_same_tokens("LM generate() greedy", greedy, variants["generate() greedy"](steps))
    check_same_tokens(
        f"LM generate() beam {beams}",
        variants[f"bare beam {beams}"](steps),
        variants[f"generate() beam {beams}"](steps),
    )
    check_same_tokens(
        "LM generate() sampling",
        seeded(lambda: variants["bare sampling"](steps))(),
        seeded(lambda: variants["generate() sampling"](steps))(),
    )
    check_reference_loops(variants, beams, steps)
    baselines = {
        "forward loop greedy": "bare greedy",
        "generate() greedy": "bare greedy",
        f"generate() beam {beams}": f"bare beam {beams}",
        "generate() sampling": "bare sampling",
        **{name: ("bare greedy" if "greedy" in name else f"bare beam {beams}") for name in variants if "[" in name},
    }
    table = decode_table(variants, baselines, steps, rounds, repeats, device)
    add_speedups(table, beams)

    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        grown = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
        step = count_ops(
            lambda: model(
                input_ids=next_tokens, attention_mask=grown, cache=out.cache, use_cache=True, logits_to_keep=1
            )
        )
    forward_step = {"ops": step.ops, "non_view_ops": step.non_view_ops, "syncs": step.syncs, "top_ops": step.by_name}
    return table, forward_step


def seq2seq_training(size: Size, device: torch.device, rounds: int, repeats: int) -> dict:
    torch.manual_seed(0)
    fused = RNNSeq2SeqForConditionalGeneration(seq2seq_config(size)).to(device).train()
    feeding = RNNSeq2SeqForConditionalGeneration(seq2seq_config(size, input_feeding=True)).to(device).train()
    bound_b = BareStacks(seq2seq_config(size), with_projection=True).to(device)
    source = torch.randint(3, size.vocab, (size.batch, size.length), device=device)
    labels = torch.randint(3, size.vocab, (size.batch, size.length), device=device)
    decoder_input_ids = torch.cat([torch.ones_like(labels[:, :1]), labels[:, :-1]], dim=1)
    mask = torch.ones_like(source)
    # the bare row trains a copy of the fused model, so both rows start from the same weights; the last row trains
    # a copy of the input-feeding model whose recurrent steps run the fused op (the reference of the cell steps)
    bare = copy.deepcopy(fused)
    feeding_fused_op = copy.deepcopy(feeding)
    for module in feeding_fused_op.modules():
        if isinstance(module, RecurrentStack):
            module.cell_steps = False
    losses = {
        "bound B": lambda: bound_b.loss(source, decoder_input_ids, labels),
        "bare fused": lambda: bare_seq2seq_loss(bare, source, decoder_input_ids, labels),
        "fused": lambda: fused(input_ids=source, attention_mask=mask, labels=labels).loss,
        "input feeding": lambda: feeding(input_ids=source, attention_mask=mask, labels=labels).loss,
        "input feeding, fused-op steps": lambda: (
            feeding_fused_op(input_ids=source, attention_mask=mask, labels=labels).loss
        ),
    }
    modules = {
        "bound B": bound_b,
        "bare fused": bare,
        "fused": fused,
        "input feeding": feeding,
        "input feeding, fused-op steps": feeding_fused_op,
    }
    steps = {name: training_step_fn(modules[name], loss) for name, loss in losses.items()}
    seconds = medians(time_rounds(steps, rounds, device, repeats))
    tokens = size.batch * size.length
    table = {}
    for name, step in steps.items():
        table[name] = {
            "seconds_per_step": seconds[name],
            "target_tokens_per_second": tokens / seconds[name],
            "of_bound_b": seconds["bound B"] / seconds[name],
            "of_bare_fused": seconds["bare fused"] / seconds[name],
            **count_training_ops(step, losses[name]),
        }
    for row in table.values():
        row["ops_over_bound_b"] = row["ops_forward_backward"] / table["bound B"]["ops_forward_backward"]
    return table


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def print_decode_table(title: str, table: dict, forward_step: dict) -> None:
    print(f"\n{title}")
    print(
        f"  {'variant':<40} {'ms':>8} {'x bare':>6} {'ops/call':>8} {'ops/token':>9} {'x bare':>6} "
        f"{'non-view/token':>14} {'ops/step':>8} {'syncs/step':>10}"
    )
    for name, row in table.items():
        ratio = f"{row['time_over_bare']:.2f}" if row["time_over_bare"] else "-"
        ops_ratio = f"{row['ops_per_token_over_bare']:.2f}" if row["ops_per_token_over_bare"] else "-"
        speedup = row.get("speedup_over_transformers_loop")
        print(
            f"  {name:<40} {row['seconds'] * 1e3:>8.2f} {ratio:>6} {row['ops_per_call']:>8} "
            f"{row['ops_per_token']:>9.1f} {ops_ratio:>6} {row['non_view_ops_per_token']:>14.1f} "
            f"{row['ops_per_step']:>8.1f} {row['syncs_per_step']:>10.1f}"
            + (f"   {speedup:.2f}x faster than transformers' loop" if speedup else "")
        )
    print(
        f"  one cached forward step of the model: {forward_step['ops']} ops ({forward_step['non_view_ops']} "
        f"non-view), {forward_step['syncs']} syncs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--anchor",
        action="store_true",
        help="anchor sizes (bi-LSTM 2x(2x256), LSTM 2x512, embeddings 512, vocab 10k, batch 128) instead of tiny",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15 tiny, 5 anchor)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per round (default 3 tiny, 1 anchor)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the size's batch")
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument(
        "--output", default=None, help="JSON path (default: benchmarks/results/overhead_[anchor_]<device>.json)"
    )
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the machine's load)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size = ANCHOR if args.anchor else TINY
    if args.batch_size:
        size = Size(**{**asdict(size), "batch": args.batch_size})
    rounds = args.rounds or (5 if args.anchor else 15)
    repeats = args.repeats or (1 if args.anchor else 3)
    size_name = "anchor" if args.anchor else "tiny"
    output = args.output or (
        f"benchmarks/results/overhead_{size_name}_{device.type}.json"
        if args.anchor
        else f"benchmarks/results/overhead_{device.type}.json"
    )

    results = {
        "machine": machine_info(device),
        "setup": {"size": size_name, **asdict(size), "rounds": rounds, "repeats": repeats, "eos_bias": EOS_BIAS},
        "note": args.note,
        "definitions": {
            "seconds": "median over interleaved rounds of seconds per call (20 decode steps, or one training step)",
            "ops": "top-level aten ops counted with torch.profiler: aten:: events with no aten:: event enclosing them",
            "ops_per_token": "ops of the whole call (encoder and setup included) / decode steps",
            "ops_per_step": "(ops at 20 steps - ops at 10 steps) / 10: the marginal cost of one decode step",
            "non_view_ops": "ops less those that only make a view (bench_common.VIEW_OPS), i.e. no GPU kernel",
            "syncs": "aten::_local_scalar_dense events at any depth: host reads of tensor values",
        },
    }
    print(f"device {results['machine']['device_name']}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"size {size_name}: {size}")

    table, forward_step = seq2seq_decoding(size, device, rounds, repeats)
    results["seq2seq_decoding"] = table
    results["seq2seq_forward_step"] = forward_step
    print_decode_table(f"Seq2Seq decoding, {size.length} steps, batch {size.batch}", table, forward_step)

    if not args.skip_training:
        train = seq2seq_training(size, device, rounds, repeats)
        results["seq2seq_training"] = train
        print("\nSeq2Seq training step (forward + backward + Adam)")
        print(
            f"  {'variant':<30} {'ms':>9} {'tokens/s':>10} {'of B':>6} {'of bare':>8} {'ops fwd+bwd':>12} "
            f"{'non-view':>9} {'ops Adam':>9} {'x B ops':>8}"
        )
        for name, row in train.items():
            print(
                f"  {name:<30} {row['seconds_per_step'] * 1e3:>9.2f} {row['target_tokens_per_second']:>10.0f} "
                f"{row['of_bound_b']:>6.2f} {row['of_bare_fused']:>8.2f} {row['ops_forward_backward']:>12} "
                f"{row['non_view_ops_forward_backward']:>9} {row['ops_optimizer_step']:>9} "
                f"{row['ops_over_bound_b']:>8.2f}"
            )

    if not args.skip_lm:
        table, forward_step = lm_decoding(size, device, rounds, repeats)
        results["lm_decoding"] = table
        results["lm_forward_step"] = forward_step
        print_decode_table(f"LM decoding, prompt {size.length}, {size.length} new tokens", table, forward_step)

    synchronize(device)
    results["token_checks"] = dict(TOKEN_CHECKS)
    print(f"\nwrote {write_json(output, results)}")


if __name__ == "__main__":
    main()
