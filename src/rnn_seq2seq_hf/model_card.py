"""Model cards filled from what is known about a trained model, with Hub metadata (YAML front matter and a
`model-index` of evaluation results) built by `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult`.

The templates are `model_cards/rnn_seq2seq.md` and `model_cards/rnn_lm.md` (installed inside the package as
`rnn_seq2seq_hf/card_templates/`).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__


def template_path(name: str) -> Path:
    """`model_cards/<name>.md` of a source checkout, else the copy installed with the package."""
    package = Path(__file__).resolve().parent
    for folder in (package.parents[1] / "model_cards", package / "card_templates"):
        if (folder / f"{name}.md").is_file():
            return folder / f"{name}.md"
    raise FileNotFoundError(f"model card template {name}.md not found")


def hardware_description() -> str:
    if torch.cuda.is_available():
        return f"1 x {torch.cuda.get_device_name(0)}"
    return f"{torch.get_num_threads()} CPU threads ({platform.machine()}, torch {torch.__version__})"


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


@dataclass
class CardInfo:
    """What the card says about a trained model; fields not known can stay at their defaults."""

    model_name: str
    summary: str
    training_data: str
    dataset_name: str  # shown in the model-index, e.g. "Multi30k (test_2016_flickr)"
    dataset_type: str  # a Hub dataset id or a short identifier, e.g. "bentrevett/multi30k"
    dataset_split: str = "test"
    results: dict[str, float] = field(default_factory=dict)  # metric name -> value, e.g. {"bleu": 35.1}
    evaluation_description: str = ""
    hyperparameters: dict[str, object] = field(default_factory=dict)
    training_seconds: float | None = None
    hardware: str = field(default_factory=hardware_description)
    repo_id: str = "path/to/this/model"
    usage_example: str = ""
    language: list[str] | None = None
    datasets: list[str] | None = None
    license: str = "apache-2.0"
    intended_use: str = "Research, teaching and as a baseline for sequence-to-sequence tasks."
    attention_image: str | None = None  # file name inside the model folder
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, output, reference)
    samples: str = ""  # generated text (language models)


def architecture_rows(model) -> list[tuple[str, object]]:
    config = model.config
    rows = [("cell", config.cell_type), ("embedding size", config.embedding_size), ("hidden size", config.hidden_size)]
    if config.model_type == "rnn_seq2seq":
        rows += [
            (
                "encoder",
                f"{config.encoder_layers} layers, {'bi' if config.bidirectional_encoder else 'uni'}directional",
            ),
            ("decoder", f"{config.decoder_layers} layers"),
            ("attention", config.attention_type),
            ("input feeding", config.input_feeding),
            ("bridge (decoder initial state)", config.bridge),
            ("shared encoder/decoder embeddings", config.share_embeddings),
        ]
    else:
        rows += [("layers", config.num_hidden_layers), ("input-to-output connection", config.input_to_output)]
    rows += [
        ("tied output embeddings", config.tie_word_embeddings),
        ("vocabulary", config.vocab_size),
        ("parameters", f"{sum(p.numel() for p in model.parameters()):,}"),
        (
            "dropout (embedding / between layers / output)",
            f"{config.embedding_dropout} / {config.hidden_dropout} / {config.output_dropout}",
        ),
    ]
    return rows


def tokenizer_description(tokenizer) -> str:
    backend = tokenizer.backend_tokenizer
    kind = type(backend.model).__name__
    lowercase = "Lowercase" in repr(backend.normalizer)
    return (
        f"{kind} vocabulary of {len(tokenizer):,} tokens trained on the training text with `tokenizers`"
        f"{', lowercased' if lowercase else ''}; special tokens `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3; every "
        "encoded text ends with `</s>`."
    )


def build_card(model, tokenizer, info: CardInfo) -> ModelCard:
    """Fill the template of the model's family."""
    is_seq2seq = model.config.model_type == "rnn_seq2seq"
    task_type = "translation" if is_seq2seq else "text-generation"
    eval_results = [
        EvalResult(
            task_type=task_type,
            dataset_type=info.dataset_type,
            dataset_name=info.dataset_name,
            dataset_split=info.dataset_split,
            metric_type=metric,
            metric_name=metric,
            metric_value=round(float(value), 4),
        )
        for metric, value in info.results.items()
    ]
    card_data = ModelCardData(
        model_name=info.model_name,
        library_name="transformers",
        pipeline_tag=task_type,
        tags=["rnn", model.config.cell_type, "rnn_seq2seq_hf"]
        + (["seq2seq", "attention", model.config.attention_type] if is_seq2seq else ["language-model"]),
        datasets=info.datasets,
        language=info.language,
        metrics=sorted(info.results) or None,
        license=info.license,
        eval_results=eval_results or None,
    )
    results = [(name, f"{value:.2f}" if isinstance(value, float) else value) for name, value in info.results.items()]
    hyperparameters = list(info.hyperparameters.items()) + [("rnn_seq2seq_hf version", __version__)]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path("rnn_seq2seq" if is_seq2seq else "rnn_lm")),
        model_name=info.model_name,
        summary=info.summary,
        architecture=architecture_rows(model),
        training_data=info.training_data,
        tokenizer_description=tokenizer_description(tokenizer),
        hyperparameters=hyperparameters,
        training_time=format_duration(info.training_seconds) if info.training_seconds is not None else "unknown time",
        hardware=info.hardware,
        evaluation_description=info.evaluation_description,
        results=results,
        attention_image=info.attention_image,
        examples=[tuple(cell.replace("|", "\\|") for cell in row) for row in info.examples],
        samples=info.samples,
        repo_id=info.repo_id,
        usage_example=info.usage_example.replace('"', '\\"'),
        intended_use=info.intended_use,
    )


__all__ = ["CardInfo", "build_card", "format_duration", "hardware_description", "template_path"]
