"""rnn_seq2seq_hf: RNN language models and attention Seq2Seq models as first-class Hugging Face transformers models.

Importing the package
- registers both model families with the Auto classes, so `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
  `AutoModelForSeq2SeqLM` load and build them;
- registers the "seq2seq-generation" pipeline task (transformers 5.x removed `text2text-generation`);
- marks the configs and model heads "for auto class", so every `save_pretrained` / `push_to_hub` writes `auto_map`
  into config.json and copies the model files next to the weights: the checkpoint then loads with
  `trust_remote_code=True` on machines without this library.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.pipelines import PIPELINE_REGISTRY

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
    Seq2SeqGenerationPipeline,
)

__version__ = "0.1.0"

AutoConfig.register(RNNLMConfig.model_type, RNNLMConfig, exist_ok=True)
AutoModel.register(RNNLMConfig, RNNLMModel, exist_ok=True)
AutoModelForCausalLM.register(RNNLMConfig, RNNLMForCausalLM, exist_ok=True)
AutoConfig.register(RNNSeq2SeqConfig.model_type, RNNSeq2SeqConfig, exist_ok=True)
AutoModel.register(RNNSeq2SeqConfig, RNNSeq2SeqModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration, exist_ok=True)

PIPELINE_REGISTRY.register_pipeline(
    "seq2seq-generation", pipeline_class=Seq2SeqGenerationPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

RNNLMConfig.register_for_auto_class()
RNNLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RNNLMModel.register_for_auto_class("AutoModel")
RNNSeq2SeqConfig.register_for_auto_class()
RNNSeq2SeqForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
RNNSeq2SeqModel.register_for_auto_class("AutoModel")

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
    "__version__",
]
