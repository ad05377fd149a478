"""Tiny models with sharpened weights and the independent references the tests compare against.

Tiny default-initialised models are so close to uniform that wrong state handling can still pick the same tokens;
`initializer_range=0.5` and a scaled output layer (`sharpen`) make the next-token distributions peaked, as
in a trained model (checked by `assert_sharp`).
"""

from __future__ import annotations

import itertools

import torch

from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM, RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration

CELL_TYPES = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
ATTENTION_TYPES = ["none", "bahdanau", "dot", "general", "concat"]
PAD, BOS, EOS = 0, 1, 2

# Every cell type x attention type x input feeding (input feeding needs attention).
SEQ2SEQ_VARIANTS = [
    (cell, attention, feeding)
    for cell, attention, feeding in itertools.product(CELL_TYPES, ATTENTION_TYPES, [False, True])
    if not (attention == "none" and feeding)
]
SEQ2SEQ_IDS = [f"{c}-{a}{'-feed' if f else ''}" for c, a, f in SEQ2SEQ_VARIANTS]


def tiny_lm_config(**overrides) -> RNNLMConfig:
    values = dict(
        vocab_size=23,
        embedding_size=12,
        hidden_size=16,
        num_hidden_layers=2,
        cell_type="lstm",
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
        initializer_range=0.5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    values.update(overrides)
    return RNNLMConfig(**values)


def tiny_seq2seq_config(**overrides) -> RNNSeq2SeqConfig:
    values = dict(
        vocab_size=23,
        embedding_size=12,
        hidden_size=16,
        encoder_layers=2,
        decoder_layers=2,
        cell_type="lstm",
        attention_type="general",
        bridge="last",
        embedding_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
        initializer_range=0.5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    values.update(overrides)
    if values["attention_type"] == "none" and values["bridge"] == "zero":
        values["bridge"] = "last"
    return RNNSeq2SeqConfig(**values)


def seq2seq_variant_config(cell: str, attention: str, feeding: bool, **overrides) -> RNNSeq2SeqConfig:
    return tiny_seq2seq_config(cell_type=cell, attention_type=attention, input_feeding=feeding, **overrides)


@torch.no_grad()
def sharpen(model, logit_std: float = 4.0):
    """Scale the vocabulary projection until logits on random input have standard deviation `logit_std`, so
    next-token distributions are peaked, as in a trained model."""
    probe = random_tokens(4, 6, model.config.vocab_size, seed=123)
    inputs = {"input_ids": probe}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = random_tokens(4, 5, model.config.vocab_size, seed=321)
    # Other terms (input_to_output) do not scale, and a tied projection also scales the input embedding (logits
    # then grow up to quadratically): repeat damped steps until the spread is right.
    tied = model.lm_head.linear.weight is model.get_input_embeddings().weight
    for _ in range(20):
        logits = model(**inputs).logits
        std = (logits - logits.mean(-1, keepdim=True)).std().item()
        if abs(std / logit_std - 1) < 0.05:
            break
        model.lm_head.linear.weight.mul_((logit_std / std) ** (0.5 if tied else 1.0))
    return model


# Logits of sharpened models reach ~10; float32 kernels that sum in another order differ by ~1e-5 there.
LOGIT_TOL = dict(atol=1e-4, rtol=1e-4)


def make_lm(seed: int = 0, **overrides) -> RNNLMForCausalLM:
    torch.manual_seed(seed)
    return sharpen(RNNLMForCausalLM(tiny_lm_config(**overrides)).eval())


def make_seq2seq(seed: int = 0, config: RNNSeq2SeqConfig | None = None, **overrides):
    torch.manual_seed(seed)
    return sharpen(RNNSeq2SeqForConditionalGeneration(config or tiny_seq2seq_config(**overrides)).eval())


def random_tokens(batch: int, length: int, vocab_size: int = 23, seed: int = 0, low: int = 3) -> torch.Tensor:
    """Token ids that are not special tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, length), generator=generator)


def right_padded(sequences: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def left_padded(sequences: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def assert_sharp(logits: torch.Tensor, min_mean_max_prob: float = 0.3) -> None:
    """Fail if the model is too close to uniform for state bugs to show (mean top probability too low)."""
    top = logits.float().softmax(-1).max(-1).values.mean().item()
    assert top >= min_mean_max_prob, f"test model too flat: mean top probability {top:.3f}"


def strip_after_eos(tokens: list[int], eos: int = EOS) -> list[int]:
    """Generated tokens up to and including the first EOS (later positions are padding)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def seq2seq_sequence_logprob(model, source: torch.Tensor, generated: list[int]) -> float:
    """log p(generated | source) from one full teacher-forced forward pass (no cache), `generated` without start."""
    start = model.config.decoder_start_token_id
    decoder_input_ids = torch.tensor([[start] + generated[:-1]])
    logits = model(input_ids=source[None], decoder_input_ids=decoder_input_ids, use_cache=False).logits[0]
    logprobs = logits.float().log_softmax(-1)
    return sum(logprobs[t, tok].item() for t, tok in enumerate(generated))


@torch.no_grad()
def lm_sequence_logprob(model, prompt: list[int], generated: list[int]) -> float:
    """log p(generated | prompt) from one full forward pass over prompt + generated (no cache)."""
    ids = torch.tensor([prompt + generated[:-1]])
    logprobs = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    offset = len(prompt) - 1
    return sum(logprobs[offset + t, tok].item() for t, tok in enumerate(generated))


class HostReads:
    """Counts the reads of tensor values by the host while active: calls of the Python methods that read them
    (`item`, `tolist`, `bool(t)`, `int(t)`, `.cpu()`, ...) and, with the profiler, every `aten::_local_scalar_dense`
    (what `item()` and `bool()` run underneath). On a GPU each is a synchronisation that stalls the launch queue."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")

    def __init__(self):
        self.calls = 0
        self.scalar_reads = 0

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._counting(method))
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profiler.__enter__()
        return self

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.calls += 1
            return method(tensor, *args, **kwargs)

        return counted

    def __exit__(self, *exc):
        self._profiler.__exit__(*exc)
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self.scalar_reads = sum(event.name == "aten::_local_scalar_dense" for event in self._profiler.events())
