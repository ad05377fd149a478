"""End-to-end training jobs on top of `Seq2SeqTrainer` / `Trainer`: tokenizer, data, model, evaluation, figures,
metrics and a model card, all written into one output folder:

    OUTPUT_DIR/
      model/            model, tokenizer, generation config, model card (README.md), modeling code for
                        trust_remote_code loading, figures the card shows
      checkpoints/      Trainer checkpoints (the best is loaded back at the end)
      metrics.json      final scores, training time and machine
      loss.png          training / validation loss curves
      attention.png     attention heatmap of one validation sentence (translation)
      test_translations.txt / samples.txt
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .accelerate_loop import LoopArguments, train_with_accelerate
from .data import lm_blocks, lm_token_stream, tokenize_parallel
from .inference import attention_weights, evaluate_perplexity, translate
from .metrics import translation_scores
from .model_card import CardInfo, build_card, hardware_description
from .models import RNNLMConfig, RNNLMForCausalLM, RNNSeq2SeqConfig, RNNSeq2SeqForConditionalGeneration
from .plotting import plot_attention, plot_loss_curves
from .tokenization import special_token_ids, train_tokenizer

logger = logging.getLogger(__name__)


def default_report_to() -> list[str]:
    """TensorBoard when it is installed, nothing else (no network services)."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Save model, tokenizer and generation config so the folder loads with the Auto classes, with the library
    installed and, through `trust_remote_code=True`, without it (importing the library marks the models for auto
    class, so the modeling files are copied next to the weights).
    """
    folder = Path(folder)
    model.config.use_cache = True  # Trainer turns it off for training
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _training_arguments(cls, output_dir: Path, settings: dict, defaults: dict):
    """Training arguments: our defaults, overridden by the recipe's `training` section.

    Checkpoints follow evaluations (best-model selection needs both on the same schedule), and without evaluation
    there is no best model to load back.
    """
    defaults = {**defaults, "dataloader_pin_memory": torch.cuda.is_available()}
    evaluation = settings.get("eval_strategy", defaults.get("eval_strategy"))
    if evaluation == "no":
        defaults["load_best_model_at_end"] = False
    else:
        defaults["save_strategy"] = evaluation
        if "eval_steps" in settings:
            defaults["save_steps"] = settings["eval_steps"]
    values = {**defaults, **settings}
    values["output_dir"] = str(output_dir / "checkpoints")
    return cls(**values)


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, default=str) + "\n")


def _check_engine(engine: str) -> None:
    if engine not in ("trainer", "accelerate"):
        raise ValueError(f"`engine` must be 'trainer' or 'accelerate', got {engine!r}")


def _model_columns(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.select_columns([c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names])


def _fit_with_accelerate(model, tokenizer, collator, training, output_dir, train_features, eval_features, scorer):
    """Train with the Accelerate loop; returns (model, its arguments, log history)."""
    loop_args = LoopArguments.from_training_section(str(output_dir / "checkpoints"), training)
    model, state, _ = train_with_accelerate(
        model,
        _model_columns(train_features),
        collator,
        loop_args,
        eval_dataset=_model_columns(eval_features) if eval_features is not None else None,
        tokenizer=tokenizer,
        compute_metrics=scorer,
    )
    return model, loop_args, state.log_history


def _fit_translation_with_trainer(
    model, tokenizer, collator, recipe, training, output_dir, train_features, eval_features
):
    """Train with `Seq2SeqTrainer` (best checkpoint by validation BLEU); returns (model, arguments, log history)."""
    args = _training_arguments(
        Seq2SeqTrainingArguments,
        output_dir,
        training,
        dict(
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="bleu",
            greater_is_better=True,
            predict_with_generate=True,
            train_sampling_strategy="group_by_length",
            logging_steps=50,
            report_to=default_report_to(),
        ),
    )

    def compute_metrics(prediction) -> dict:
        predictions = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return translation_scores([h.strip() for h in hypotheses], [r.strip() for r in references])

    callbacks = [KeepGenerationConfig(model.generation_config)]
    if recipe.get("early_stopping_patience") and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe["early_stopping_patience"]))
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=eval_features if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer.model, args, trainer.state.log_history


class KeepGenerationConfig(TrainerCallback):
    """Keep the model's generation config as configured through `Seq2SeqTrainer` evaluation.

    `Seq2SeqTrainer.prediction_step` fills the model's generation config with transformers' defaults (max_length=20)
    in place. With `max_new_tokens` set, every later `generate()` then warns that both are set, and the saved
    generation_config.json carries the conflict to every user of the model. Put the configured one back after each
    prediction step (the last evaluation included, so the model leaves training as configured).
    """

    def __init__(self, generation_config: GenerationConfig):
        self.generation_config = copy.deepcopy(generation_config)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            model.generation_config = copy.deepcopy(self.generation_config)


def _fit_lm_with_trainer(model, tokenizer, collator, training, output_dir, train_blocks, validation_blocks):
    """Train with `Trainer` (best checkpoint by validation loss); returns (model, arguments, log history)."""
    args = _training_arguments(
        TrainingArguments,
        output_dir,
        training,
        dict(
            eval_strategy="epoch",
            save_strategy="epoch",
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            logging_steps=50,
            report_to=default_report_to(),
        ),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_blocks,
        eval_dataset=validation_blocks if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer.model, args, trainer.state.log_history


def train_translation(
    recipe: dict,
    output_dir: str | Path,
    train: datasets.Dataset,
    validation: datasets.Dataset,
    test: datasets.Dataset | None = None,
    data_description: str = "",
    dataset_name: str = "custom",
    dataset_type: str = "custom",
    languages: list[str] | None = None,
    engine: str = "trainer",
) -> dict:
    """Train a Seq2Seq model on `source`/`target` string datasets as the recipe says; returns the final metrics.

    With `engine="trainer"` (`Seq2SeqTrainer`), validation uses `predict_with_generate` (BLEU, chrF, exact match)
    and the best checkpoint by validation BLEU is kept, with early stopping. With `engine="accelerate"` the
    data-parallel loop of `accelerate_loop.py` trains (crash-safe checkpoints, exact resume) and validates at the
    end. Either way the test set (or the validation set without one) is then translated with the recipe's
    generation settings and scored, on the main process. Launch with `torchrun` / `accelerate launch` for several
    processes; other processes return an empty dict.
    """
    _check_engine(engine)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training = dict(recipe.get("training", {}))
    set_seed(training.get("seed", 42))
    started = time.perf_counter()

    tokenizer_settings = recipe.get("tokenizer", {})
    tokenizer = train_tokenizer(list(train["source"]) + list(train["target"]), **tokenizer_settings)
    data_settings = recipe.get("data", {})
    train_features = tokenize_parallel(
        train, tokenizer, data_settings.get("max_source_length"), data_settings.get("max_target_length")
    )
    validation_features = tokenize_parallel(validation, tokenizer)
    logger.info(
        "%d training pairs (%d after length filtering), %d validation",
        len(train),
        len(train_features),
        len(validation_features),
    )

    config = RNNSeq2SeqConfig(vocab_size=len(tokenizer), **special_token_ids(tokenizer), **recipe.get("model", {}))
    model = RNNSeq2SeqForConditionalGeneration(config)
    generation = recipe.get("generation", {})
    model.generation_config = GenerationConfig.from_model_config(config)
    model.generation_config.update(**generation)

    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    if engine == "accelerate":
        model, args, log_history = _fit_with_accelerate(
            model, tokenizer, collator, training, output_dir, train_features, validation_features, translation_scores
        )
    else:
        model, args, log_history = _fit_translation_with_trainer(
            model, tokenizer, collator, recipe, training, output_dir, train_features, validation_features
        )
    training_seconds = time.perf_counter() - started
    if not PartialState().is_main_process:
        return {}

    evaluation = test if test is not None else validation
    split_name = "test" if test is not None else "validation"
    started_eval = time.perf_counter()
    hypotheses = translate(
        model, tokenizer, list(evaluation["source"]), batch_size=training.get("per_device_eval_batch_size", 32)
    )
    scores = translation_scores(hypotheses, list(evaluation["target"]))
    (output_dir / f"{split_name}_translations.txt").write_text("\n".join(hypotheses) + "\n")

    metrics = {
        **{name: round(value, 4) for name, value in scores.items()},
        "split": split_name,
        "sentences": len(evaluation),
        "generation": model.generation_config.to_diff_dict(),
        "training_seconds": round(training_seconds, 1),
        "evaluation_seconds": round(time.perf_counter() - started_eval, 1),
        "hardware": hardware_description(),
        "train_pairs": len(train_features),
        "recipe": recipe.get("source", ""),
    }
    _write_json(output_dir / "metrics.json", metrics)
    plot_loss_curves(log_history, output_dir / "loss.png", title="translation model loss")

    model_dir = output_dir / "model"
    save_model_folder(model, tokenizer, model_dir)
    attention_file = None
    if config.attention_type != "none":
        # the longest of the first validation sentences shows alignment best
        candidates = list(validation["source"][:50])
        example = max(candidates, key=lambda text: len(tokenizer.tokenize(text)))
        output = translate(model, tokenizer, [example])[0]
        weights, source_tokens, target_tokens = attention_weights(model, tokenizer, example, output)
        plot_attention(
            weights, source_tokens, target_tokens, output_dir / "attention.png", title=f"{example}  ->  {output}"
        )
        shutil.copy(output_dir / "attention.png", model_dir / "attention.png")
        attention_file = "attention.png"
    shutil.copy(output_dir / "loss.png", model_dir / "loss.png")
    card = build_card(
        model,
        tokenizer,
        CardInfo(
            model_name=recipe.get("name", "rnn-seq2seq translation model"),
            summary=_description_text(recipe),
            training_data=data_description or f"{len(train_features):,} sentence pairs.",
            dataset_name=dataset_name,
            dataset_type=dataset_type,
            dataset_split=split_name,
            results={k: scores[k] for k in ("bleu", "bleu_lowercase", "chrf", "exact_match")},
            evaluation_description=(
                f"On {len(evaluation):,} {split_name} sentences, decoded with "
                f"{model.generation_config.num_beams} beams: sacreBLEU (cased, detokenized, 13a), lowercased "
                "sacreBLEU, chrF, and exact match (in %)."
            ),
            hyperparameters=_hyperparameters(args, recipe),
            training_seconds=training_seconds,
            language=languages,
            usage_example=str(evaluation[0]["source"]),
            attention_image=attention_file,
            examples=[
                (evaluation[i]["source"], hypotheses[i], evaluation[i]["target"])
                for i in range(min(5, len(evaluation)))
            ],
        ),
    )
    card.save(model_dir / "README.md")
    return metrics


def train_language_model(
    recipe: dict,
    output_dir: str | Path,
    train_lines: list[str],
    validation_lines: list[str],
    test_lines: list[str] | None = None,
    data_description: str = "",
    dataset_name: str = "custom",
    dataset_type: str = "custom",
    engine: str = "trainer",
) -> dict:
    """Train an RNN LM on fixed-size blocks with `Trainer` (or the Accelerate loop, `engine="accelerate"`); report
    stateful perplexity on validation and test from the main process."""
    _check_engine(engine)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    training = dict(recipe.get("training", {}))
    set_seed(training.get("seed", 42))
    started = time.perf_counter()

    tokenizer_settings = recipe.get("tokenizer", {})
    kind = tokenizer_settings.get("kind", "word")
    per_line = kind != "char"
    texts = train_lines if per_line else ["\n".join(train_lines)]
    # prompts are encoded as they are (no </s>) and padded on the left, as transformers' pipelines expect
    tokenizer = train_tokenizer(texts, padding_side="left", add_eos=False, **tokenizer_settings)
    data_settings = recipe.get("data", {})
    block_size = data_settings.get("block_size", 70)
    streams = {
        "train": lm_token_stream(train_lines, tokenizer, per_line),
        "validation": lm_token_stream(validation_lines, tokenizer, per_line),
    }
    if test_lines:
        streams["test"] = lm_token_stream(test_lines, tokenizer, per_line)
    logger.info("tokens: %s", {name: len(stream) for name, stream in streams.items()})

    config = RNNLMConfig(vocab_size=len(tokenizer), **special_token_ids(tokenizer), **recipe.get("model", {}))
    model = RNNLMForCausalLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    train_blocks = lm_blocks(streams["train"], block_size)
    validation_blocks = lm_blocks(streams["validation"], block_size)
    if engine == "accelerate":
        model, args, log_history = _fit_with_accelerate(
            model, tokenizer, collator, training, output_dir, train_blocks, validation_blocks, None
        )
    else:
        model, args, log_history = _fit_lm_with_trainer(
            model, tokenizer, collator, training, output_dir, train_blocks, validation_blocks
        )
    training_seconds = time.perf_counter() - started
    if not PartialState().is_main_process:
        return {}

    evaluation = recipe.get("evaluation", {})
    results = {}
    for split in ("validation", "test"):
        if split in streams:
            scores = evaluate_perplexity(
                model, streams[split], evaluation.get("batch_size", 10), evaluation.get("block_size", block_size)
            )
            results[split] = scores
    samples = _lm_samples(model, tokenizer, recipe.get("sample", {}), per_line)
    (output_dir / "samples.txt").write_text(samples + "\n")

    unit = "character" if kind == "char" else "token"
    metrics = {
        "tokenizer": kind,
        "vocab_size": len(tokenizer),
        **{f"{split}_perplexity": scores["perplexity"] for split, scores in results.items()},
        **{f"{split}_nats_per_{unit}": scores["nats_per_token"] for split, scores in results.items()},
        **{f"{split}_bits_per_{unit}": scores["bits_per_token"] for split, scores in results.items()},
        **{f"{split}_predicted_tokens": scores["tokens"] for split, scores in results.items()},
        "training_seconds": round(training_seconds, 1),
        "hardware": hardware_description(),
        "recipe": recipe.get("source", ""),
    }
    _write_json(output_dir / "metrics.json", metrics)
    plot_loss_curves(log_history, output_dir / "loss.png", title="language model loss")

    model_dir = output_dir / "model"
    save_model_folder(model, tokenizer, model_dir)
    shutil.copy(output_dir / "loss.png", model_dir / "loss.png")
    final_split = "test" if "test" in results else "validation"
    card_results = {"perplexity": results[final_split]["perplexity"]}
    if kind == "char":
        card_results["bits_per_character"] = results[final_split]["bits_per_token"]
    card = build_card(
        model,
        tokenizer,
        CardInfo(
            model_name=recipe.get("name", "rnn-lm language model"),
            summary=_description_text(recipe),
            training_data=data_description or f"{len(streams['train']):,} training tokens.",
            dataset_name=dataset_name,
            dataset_type=dataset_type,
            dataset_split=final_split,
            results=card_results,
            evaluation_description=(
                f"Perplexity on the {final_split} text ({results[final_split]['tokens']:,} predicted {unit}s), "
                "reading it as one stream with the recurrent state carried across blocks."
            ),
            hyperparameters=_hyperparameters(args, recipe),
            training_seconds=training_seconds,
            usage_example=recipe.get("sample", {}).get("prompt", "the"),
            samples=samples,
        ),
    )
    card.save(model_dir / "README.md")
    return metrics


def _lm_samples(model, tokenizer, settings: dict, per_line: bool) -> str:
    prompt = settings.get("prompt", "the" if per_line else "\n")
    encoded = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    torch.manual_seed(settings.get("seed", 0))
    # The model was trained on one running stream in which the end-of-sentence token only separates sentences, so a
    # sample runs on across sentence ends for max_new_tokens (eos_token_id=None: no stopping on EOS).
    generated = model.generate(
        **encoded,
        eos_token_id=None,
        do_sample=settings.get("do_sample", True),
        max_new_tokens=settings.get("max_new_tokens", 100),
        temperature=settings.get("temperature", 0.8),
        top_k=settings.get("top_k", 0),
        num_return_sequences=settings.get("num_samples", 3),
    )
    texts = tokenizer.batch_decode(generated, skip_special_tokens=not per_line)
    if per_line:
        texts = [text.replace(tokenizer.eos_token, "\n").replace(tokenizer.pad_token, "") for text in texts]
        if tokenizer.unk_token:  # special tokens decode without the word separator (PTB's own "<unk>" is one)
            texts = [text.replace(tokenizer.unk_token, f" {tokenizer.unk_token} ") for text in texts]
        texts = ["\n".join(" ".join(line.split()) for line in text.split("\n")) for text in texts]  # a sentence a line
    return "\n---\n".join(texts)


def _description_text(recipe: dict) -> str:
    return str(recipe.get("description", "")).strip()


def _hyperparameters(args, recipe: dict) -> dict:
    chosen = {f"model.{key}": value for key, value in recipe.get("model", {}).items()}
    chosen.update({f"tokenizer.{key}": value for key, value in recipe.get("tokenizer", {}).items()})
    for name in (
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "seed",
    ):
        chosen[name] = getattr(args, name)
    return chosen


__all__ = ["default_report_to", "save_model_folder", "train_language_model", "train_translation"]
