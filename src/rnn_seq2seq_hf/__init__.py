"""rnn_seq2seq_hf: RNN language models and attention Seq2Seq models as first-class Hugging Face transformers models.

Importing the package registers both model families with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM` and `AutoModelForSeq2SeqLM` load and build them.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from .models import (
    RNNCache,
    RNNEncoderOutput,
    RNNLMConfig,
    RNNLMForCausalLM,
    RNNLMModel,
    RNNLMPreTrainedModel,
    RNNSeq2SeqConfig,
    RNNSeq2SeqForConditionalGeneration,
    RNNSeq2SeqModel,
    RNNSeq2SeqPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(RNNLMConfig.model_type, RNNLMConfig, exist_ok=True)
AutoModel.register(RNNLMConfig, RNNLMModel, exist_ok=True)
AutoModelForCausalLM.register(RNNLMConfig, RNNLMForCausalLM, exist_ok=True)
AutoConfig.register(RNNSeq2SeqConfig.model_type, RNNSeq2SeqConfig, exist_ok=True)
AutoModel.register(RNNSeq2SeqConfig, RNNSeq2SeqModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration, exist_ok=True)

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
    "__version__",
]
