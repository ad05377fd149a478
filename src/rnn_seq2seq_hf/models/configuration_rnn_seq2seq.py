"""Configuration of the recurrent encoder-decoder (Seq2Seq) model with attention."""

from __future__ import annotations

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

ATTENTION_TYPES = ("none", "bahdanau", "dot", "general", "concat")
BRIDGE_TYPES = ("zero", "last", "linear")


class RNNSeq2SeqConfig(PreTrainedConfig):
    r"""
    Configuration of an [`RNNSeq2SeqModel`] / [`RNNSeq2SeqForConditionalGeneration`].

    Source and target share one vocabulary (a joint subword vocabulary), so `vocab_size` covers both.

    Args:
        vocab_size (`int`, defaults to 10000): size of the joint source/target vocabulary.
        embedding_size (`int`, defaults to 256): size of the token embeddings (encoder and decoder).
        hidden_size (`int`, defaults to 512): size of the decoder state and of the encoder outputs. A bidirectional
            encoder gives each direction `hidden_size // 2` units and concatenates them (OpenNMT's convention), so
            `hidden_size` must then be even.
        encoder_layers (`int`, defaults to 2): number of stacked encoder layers.
        decoder_layers (`int`, defaults to 2): number of stacked decoder layers.
        cell_type (`str`, defaults to `"lstm"`): `"rnn_tanh"`, `"rnn_relu"`, `"lstm"` or `"gru"`, for both sides.
        bidirectional_encoder (`bool`, defaults to `True`): read the source in both directions.
        attention_type (`str`, defaults to `"general"`):
            - `"none"`: the plain encoder-decoder; the decoder sees the source only through its initial state.
            - `"bahdanau"`: additive attention queried with the previous decoder state; its context is fed into the
              RNN input and into a deep output layer (Bahdanau et al., 2015).
            - `"dot"`, `"general"`, `"concat"`: the three scores of Luong et al. (2015), queried with the current
              RNN output, followed by the attentional state tanh(W_c [c_t; h_t]).
        input_feeding (`bool`, defaults to `False`): concatenate the previous attentional state to the next decoder
            input (Luong et al., 2015, section 3.3). Needs attention. Without it, Luong attention trains with one
            recurrent call over the whole target sequence (the fast path).
        bridge (`str`, defaults to `"last"`): how the decoder's initial state comes from the encoder: `"zero"`
            (zeros), `"last"` (the encoder's final state of each layer, both directions concatenated; needs
            `encoder_layers == decoder_layers`) or `"linear"` (tanh of a learned projection of the top encoder
            layer's final state).
        embedding_dropout, hidden_dropout, output_dropout (`float`, default 0.1): dropout on embeddings, between
            stacked recurrent layers, and on the decoder output before the vocabulary projection.
        share_embeddings (`bool`, defaults to `False`): one embedding matrix for encoder and decoder.
        tie_word_embeddings (`bool`, defaults to `False`): share the decoder embedding with the output layer (a
            projection from `hidden_size` to `embedding_size` is added when they differ).
        initializer_range (`float`, defaults to 0.1): weights are initialised uniformly in [-r, r].
        pad_token_id, bos_token_id, eos_token_id (`int`): special token ids (defaults 0, 1, 2).
        decoder_start_token_id (`int`, defaults to `bos_token_id`): first decoder input token.
        use_cache (`bool`, defaults to `True`): return the decoder state so decoding can continue from it.
    """

    model_type = "rnn_seq2seq"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # transformers code reads `num_hidden_layers`; here it means the decoder's layers, as in T5 and BART (the
    # decoder is what generate() steps through). The encoder's depth is `encoder_layers`.
    attribute_map = {"num_hidden_layers": "decoder_layers"}

    def __init__(
        self,
        vocab_size: int = 10000,
        embedding_size: int = 256,
        hidden_size: int = 512,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        cell_type: str = "lstm",
        bidirectional_encoder: bool = True,
        attention_type: str = "general",
        input_feeding: bool = False,
        bridge: str = "last",
        embedding_dropout: float = 0.1,
        hidden_dropout: float = 0.1,
        output_dropout: float = 0.1,
        share_embeddings: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.1,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        decoder_start_token_id: int | None = None,
        use_cache: bool = True,
        is_encoder_decoder: bool = True,
        **kwargs,
    ):
        check_known_keys(type(self), kwargs)
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.cell_type = cell_type
        self.bidirectional_encoder = bidirectional_encoder
        self.attention_type = attention_type
        self.input_feeding = input_feeding
        self.bridge = bridge
        self.embedding_dropout = embedding_dropout
        self.hidden_dropout = hidden_dropout
        self.output_dropout = output_dropout
        self.share_embeddings = share_embeddings
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = bos_token_id if decoder_start_token_id is None else decoder_start_token_id
        self.use_cache = use_cache
        saved_pipelines = kwargs.pop("custom_pipelines", None)
        super().__init__(is_encoder_decoder=is_encoder_decoder, **kwargs)
        if saved_pipelines and not _library_installed_here(type(self)):
            # Loaded with trust_remote_code: keep the entry so pipeline() finds the pipeline file of the repository.
            # With the library, the task is registered locally and pipeline() needs no remote code.
            self.custom_pipelines = saved_pipelines
        self.check_values()

    def to_dict(self) -> dict:
        # Every saved Seq2Seq checkpoint names its pipeline (see models/pipeline_seq2seq.py, which the modeling file
        # imports, so save_pretrained copies it next to the weights).
        return {**super().to_dict(), "custom_pipelines": _custom_pipelines()}

    def to_diff_dict(self) -> dict:
        return {**super().to_diff_dict(), "custom_pipelines": _custom_pipelines()}

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
        for name in ("vocab_size", "embedding_size", "hidden_size", "encoder_layers", "decoder_layers"):
            check_positive_int(name, getattr(self, name))
        check_choice("cell_type", self.cell_type, CELL_TYPES)
        check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
        check_choice("bridge", self.bridge, BRIDGE_TYPES)
        for name in ("embedding_dropout", "hidden_dropout", "output_dropout"):
            check_probability(name, getattr(self, name))
        for name in (
            "bidirectional_encoder",
            "input_feeding",
            "share_embeddings",
            "tie_word_embeddings",
            "use_cache",
            "is_encoder_decoder",
        ):
            check_bool(name, getattr(self, name))
        check_positive_float("initializer_range", self.initializer_range)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_token_id(name, getattr(self, name), self.vocab_size)
        check_token_id("decoder_start_token_id", self.decoder_start_token_id, self.vocab_size, required=True)

        if not self.is_encoder_decoder:
            raise ValueError("`is_encoder_decoder` must be True for an RNNSeq2SeqConfig, got False.")
        if self.bidirectional_encoder and self.hidden_size % 2:
            raise ValueError(
                f"`hidden_size` must be even with `bidirectional_encoder=True` (each direction gets half), "
                f"got {self.hidden_size}."
            )
        if self.input_feeding and self.attention_type == "none":
            raise ValueError(
                "`input_feeding=True` needs attention: with `attention_type='none'` there is no attentional state "
                f"to feed; choose one of {list(ATTENTION_TYPES[1:])} or set `input_feeding=False`."
            )
        if self.attention_type == "none" and self.bridge == "zero":
            raise ValueError(
                "`attention_type='none'` with `bridge='zero'` gives a decoder that never sees the source; "
                "use `bridge='last'` or `bridge='linear'`."
            )
        if self.bridge == "last" and self.encoder_layers != self.decoder_layers:
            raise ValueError(
                f"`bridge='last'` copies the encoder's final state layer by layer, so `encoder_layers` "
                f"({self.encoder_layers}) must equal `decoder_layers` ({self.decoder_layers}); "
                "use `bridge='linear'` or `bridge='zero'` otherwise."
            )

    @property
    def encoder_hidden_size(self) -> int:
        """Units per direction of each encoder layer."""
        return self.hidden_size // 2 if self.bidirectional_encoder else self.hidden_size


def _custom_pipelines() -> dict:
    return {
        "seq2seq-generation": {
            "impl": "pipeline_seq2seq.Seq2SeqGenerationPipeline",
            "pt": ["AutoModelForSeq2SeqLM"],
            "type": "text",
        }
    }


def _library_installed_here(config_class: type) -> bool:
    """True when this class is the installed library's, not a checkpoint's copy (`transformers_modules.`)."""
    return config_class.__module__.startswith("rnn_seq2seq_hf.")


__all__ = ["RNNSeq2SeqConfig", "ATTENTION_TYPES", "BRIDGE_TYPES"]
