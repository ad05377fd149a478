"""The model files. Each is written to travel alone with a checkpoint (see `rnn_seq2seq_hf.hub`): they import
installed packages and each other only, never `rnn_seq2seq_hf`."""

from .cache_rnn import RNNCache
from .configuration_rnn_lm import RNNLMConfig
from .configuration_rnn_seq2seq import RNNSeq2SeqConfig
from .modeling_rnn_lm import RNNLMForCausalLM, RNNLMModel, RNNLMPreTrainedModel
from .modeling_rnn_seq2seq import (
    RNNEncoderOutput,
    RNNSeq2SeqForConditionalGeneration,
    RNNSeq2SeqModel,
    RNNSeq2SeqPreTrainedModel,
)
from .pipeline_seq2seq import Seq2SeqGenerationPipeline

__all__ = [
    "RNNCache",
    "RNNEncoderOutput",
    "RNNLMConfig",
    "RNNLMForCausalLM",
    "RNNLMModel",
    "RNNLMPreTrainedModel",
    "RNNSeq2SeqConfig",
    "RNNSeq2SeqForConditionalGeneration",
    "RNNSeq2SeqModel",
    "RNNSeq2SeqPreTrainedModel",
    "Seq2SeqGenerationPipeline",
]
