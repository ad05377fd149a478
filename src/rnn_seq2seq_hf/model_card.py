"""Model cards filled from what is known about a trained model, with Hub metadata (YAML front matter and a
`model-index` of evaluation results) built by `huggingface_hub.ModelCard` / `ModelCardData` / `EvalResult`.

The templates are `model_cards/rnn_seq2seq.md` and `model_cards/rnn_lm.md` (installed inside the package as
`rnn_seq2seq_hf/card_templates/`).
"""

from __future__ import annotations

import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import __version__
from .tokenization import appends_eos, lm_reads_lines, splits_digits, tokenizer_kind

# The package is not on PyPI: the cards' install line installs it from its repository.
REPOSITORY = "https://github.com/rnn-seq2seq-hf/rnn-seq2seq-hf"
INSTALL_COMMAND = f"pip install git+{REPOSITORY}"


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
    return f"{plural(torch.get_num_threads(), 'CPU thread')} ({platform.machine()}, torch {torch.__version__})"


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
    usage_example: str = ""  # a source sentence (translation) or a prompt (LM); quoted safely wherever it is shown
    language: list[str] | None = None
    datasets: list[str] | None = None
    license: str = "apache-2.0"
    intended_use: str = "Research, teaching and as a baseline for sequence-to-sequence tasks."
    attention_image: str | None = None  # file name inside the model folder
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (source, output, reference)
    samples: str = ""  # generated text (language models)
    tokenizer_origin: str = "trained on the training text with `tokenizers`"


def plural(count: int, noun: str) -> str:
    """ "1 layer", "2 layers"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def architecture_rows(model) -> list[tuple[str, object]]:
    config = model.config
    rows = [("cell", config.cell_type), ("embedding size", config.embedding_size), ("hidden size", config.hidden_size)]
    if config.model_type == "rnn_seq2seq":
        rows += [
            (
                "encoder",
                f"{plural(config.encoder_layers, 'layer')}, "
                f"{'bi' if config.bidirectional_encoder else 'uni'}directional",
            ),
            ("decoder", plural(config.decoder_layers, "layer")),
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


VOCABULARY_NAMES = {
    "bpe": "BPE subword vocabulary",
    "unigram": "unigram (SentencePiece-style) subword vocabulary",
    "word": "word vocabulary",
    "char": "character vocabulary",
}


def tokenizer_description(
    tokenizer, is_seq2seq: bool, origin: str = "trained on the training text with `tokenizers`"
) -> str:
    """What the tokenizer is, read from the tokenizer itself (`tokenization.tokenizer_kind` / `appends_eos`)."""
    kind = tokenizer_kind(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    shared = " shared by source and target" if is_seq2seq and kind in ("bpe", "unigram") else ""
    parts = [f"A {VOCABULARY_NAMES.get(kind, kind + ' vocabulary')} of {len(tokenizer):,} tokens{shared}, {origin}"]
    if backend is not None and "Lowercase" in repr(backend.normalizer):
        parts.append("text is lowercased")
    digits = splits_digits(tokenizer)
    if digits:
        parts.append("every digit is a token" if digits == 1 else f"digits are cut into groups of at most {digits}")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    special = ", ".join(f"`{token}`={index}" for token, index in sorted(ids.items(), key=lambda item: item[1]))
    parts.append(f"special tokens {special}")
    if appends_eos(tokenizer):
        parts.append(f"every encoded text ends with `{tokenizer.eos_token}`")
    elif lm_reads_lines(tokenizer):
        parts.append(
            f"texts are encoded as they are, without an end token (prompts too); in training and evaluation "
            f"`{tokenizer.eos_token}` is added after every line"
        )
    else:
        parts.append("texts are encoded as they are, newlines included, without an end token")
    return "; ".join(parts) + "."


def python_string_literal(text: str) -> str:
    """A Python string literal for ``text``, whatever it holds, in the quotes a formatter keeps.

    ``repr`` picks single quotes, which ruff and black rewrite to double quotes: the card's code block would then
    fail a ``ruff format --check`` of the repository it is saved in. Double quotes unless the text holds ``"`` and
    no ``'`` (then single quotes need no escape), as the formatters do.
    """
    literal = repr(text)
    if '"' in text and "'" not in text:
        return literal
    body = literal[1:-1]
    if literal[0] == "'":  # repr escaped the single quotes and left the double quotes bare
        body = body.replace("\\'", "'").replace('"', '\\"')
    return f'"{body}"'


def shell_usage(is_seq2seq: bool, repo_id: str, example: str) -> str:
    """The command-line usage line, with the example quoted for a POSIX shell (it is dataset text)."""
    if is_seq2seq:
        command = f"rnn-seq2seq translate --model {shlex.quote(repo_id)} --num-beams 5"
        return f"printf '%s\\n' {shlex.quote(example)} | {command}"
    return f"rnn-seq2seq generate --model {shlex.quote(repo_id)} --prompt {shlex.quote(example)}"


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
        tokenizer_description=tokenizer_description(tokenizer, is_seq2seq, info.tokenizer_origin),
        hyperparameters=hyperparameters,
        training_time=format_duration(info.training_seconds) if info.training_seconds is not None else "unknown time",
        hardware=info.hardware,
        evaluation_description=info.evaluation_description,
        results=results,
        attention_image=info.attention_image,
        examples=[tuple(cell.replace("|", "\\|") for cell in row) for row in info.examples],
        samples=info.samples,
        repo_id=info.repo_id,
        usage_literal=python_string_literal(info.usage_example),
        shell_usage=shell_usage(is_seq2seq, info.repo_id, info.usage_example),
        install_command=INSTALL_COMMAND,
        intended_use=info.intended_use,
    )


__all__ = [
    "INSTALL_COMMAND",
    "CardInfo",
    "build_card",
    "format_duration",
    "hardware_description",
    "plural",
    "shell_usage",
    "template_path",
    "tokenizer_description",
]
