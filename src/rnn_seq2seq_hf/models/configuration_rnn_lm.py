"""Configuration of the recurrent language model (Elman RNN, LSTM or GRU)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .config_checks import (
    CELL_TYPES,
    check_bool,
    check_choice,
    check_known_keys,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_token_id,
    tolerating_unknown_keys,
)


class RNNLMConfig(PreTrainedConfig):
    r"""
    Configuration of an [`RNNLMModel`] / [`RNNLMForCausalLM`].

    Args:
        vocab_size (`int`, defaults to 10000): number of tokens in the vocabulary.
        embedding_size (`int`, defaults to 256): size of the token embeddings.
        hidden_size (`int`, defaults to 512): size of the recurrent state of every layer.
        num_hidden_layers (`int`, defaults to 2): number of stacked recurrent layers.
        cell_type (`str`, defaults to `"lstm"`): `"rnn_tanh"` or `"rnn_relu"` (Elman), `"lstm"` or `"gru"`.
        embedding_dropout (`float`, defaults to 0.1): dropout on the token embeddings.
        hidden_dropout (`float`, defaults to 0.1): dropout between stacked recurrent layers.
        output_dropout (`float`, defaults to 0.1): dropout on the top layer's output, before the output layer.
        input_to_output (`bool`, defaults to `False`): the output layer also sees the input embedding, that is
            o_t = softmax(W_xo x_t + W_ho h_t + b_o), the formulation of the classic Elman network.
        tie_word_embeddings (`bool`, defaults to `False`): share the input embedding matrix with the output layer
            (W_ho). When `hidden_size != embedding_size` a linear projection from the hidden size to the embedding
            size is inserted before the tied output layer.
        initializer_range (`float`, defaults to 0.1): weights are initialised uniformly in [-r, r].
        variational_dropout (`bool`, defaults to `False`): make `embedding_dropout`, `hidden_dropout` and
            `output_dropout` variational ("locked"): one mask per sequence and feature, the same at every time step
            (Gal & Ghahramani, 2016, "A Theoretically Grounded Application of Dropout in Recurrent Neural Networks";
            AWD-LSTM's `dropouti`, `dropouth`, `dropout`). With `hidden_dropout > 0` the layers then run one by one
            (one fused call each) in training.
        word_dropout (`float`, defaults to 0.0): drop whole word types from the input: every occurrence of a dropped
            word in the batch gets a zero embedding, the rest are scaled by 1 / (1 - p) (Gal & Ghahramani, 2016,
            section 4; AWD-LSTM's embedding dropout `dropoute`). Applies to `input_ids`, not to `inputs_embeds`.
        weight_dropout (`float`, defaults to 0.0): DropConnect on the hidden-to-hidden matrices `weight_hh`, one
            mask per forward call shared by all time steps (Wan et al., 2013; Merity et al., 2018, "Regularizing and
            Optimizing LSTM Language Models" (AWD-LSTM), `wdrop`). The recurrence still runs as one fused call (one
            cuDNN call on a GPU) over the dropped weights.
        activation_regularization (`float`, defaults to 0.0): alpha of AR, an L2 penalty on the top layer's outputs
            after output dropout, added to the training loss (Merity et al., 2017, "Revisiting Activation
            Regularization for Language RNNs"; AWD-LSTM uses 2).
        temporal_activation_regularization (`float`, defaults to 0.0): beta of TAR, an L2 penalty on the change of
            the top layer's outputs (before dropout) from one step to the next, added to the training loss (same
            paper; AWD-LSTM uses 1). AR and TAR are computed only in training mode and are normalised like the token
            loss (see `regularization.activation_regularization`).
        pad_token_id, bos_token_id, eos_token_id (`int`): special token ids (defaults 0, 1, 2).
        use_cache (`bool`, defaults to `True`): return the recurrent state so decoding can continue from it.

    Example:

    ```python
    >>> from rnn_seq2seq_hf import RNNLMConfig, RNNLMForCausalLM
    >>> config = RNNLMConfig(vocab_size=100, embedding_size=32, hidden_size=32, cell_type="gru")
    >>> model = RNNLMForCausalLM(config)
    ```
    """

    model_type = "rnn_lm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 256,
        hidden_size: int = 512,
        num_hidden_layers: int = 2,
        cell_type: str = "lstm",
        embedding_dropout: float = 0.1,
        hidden_dropout: float = 0.1,
        output_dropout: float = 0.1,
        input_to_output: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.1,
        variational_dropout: bool = False,
        word_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        activation_regularization: float = 0.0,
        temporal_activation_regularization: float = 0.0,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        use_cache: bool = True,
        **kwargs,
    ):
        check_known_keys(type(self), kwargs)
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.cell_type = cell_type
        self.embedding_dropout = embedding_dropout
        self.hidden_dropout = hidden_dropout
        self.output_dropout = output_dropout
        self.input_to_output = input_to_output
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.variational_dropout = variational_dropout
        self.word_dropout = word_dropout
        self.weight_dropout = weight_dropout
        self.activation_regularization = activation_regularization
        self.temporal_activation_regularization = temporal_activation_regularization
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.use_cache = use_cache
        super().__init__(**kwargs)
        self.check_values()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # A config.json (from a checkpoint, maybe written by another version) keeps transformers' tolerance of keys
        # this version does not know; only configs built in code refuse them.
        with tolerating_unknown_keys():
            return super().from_dict(config_dict, **kwargs)

    def check_values(self) -> None:
        """Raise a `ValueError` naming the first field whose value is unknown, out of range or inconsistent.

        Called by `__init__` and again by the model, so that a field changed after construction is checked too.
        """
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers"):
            check_positive_int(name, getattr(self, name))
        check_choice("cell_type", self.cell_type, CELL_TYPES)
        for name in ("embedding_dropout", "hidden_dropout", "output_dropout", "word_dropout", "weight_dropout"):
            check_probability(name, getattr(self, name))
        for name in ("input_to_output", "tie_word_embeddings", "use_cache", "variational_dropout"):
            check_bool(name, getattr(self, name))
        for name in ("activation_regularization", "temporal_activation_regularization"):
            check_non_negative_float(name, getattr(self, name))
        check_positive_float("initializer_range", self.initializer_range)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(name, getattr(self, name), self.vocab_size)


def check_non_negative_float(name: str, value: object) -> None:
    """Raise unless ``value`` is a finite number >= 0 (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")


__all__ = ["RNNLMConfig"]
