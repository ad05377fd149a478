"""End-to-end training jobs on top of `Seq2SeqTrainer` / `Trainer` (or the Accelerate loop): tokenizer, data, model,
evaluation, figures, metrics and a model card, all written into one output folder:

    OUTPUT_DIR/
      model/            model, tokenizer, generation config, model card (README.md), modeling code for
                        trust_remote_code loading, figures the card shows; written atomically
      checkpoints/      the engine's checkpoints (Trainer: the best is loaded back at the end)
      metrics.json      final scores, training time and machine; written last: a run is finished once it exists
      recipe.yaml       the resolved recipe (overrides applied); `--recipe OUTPUT_DIR/recipe.yaml` runs it again
      train.log         the run's log; run.json: its fingerprint; .lock: the pid of the run training here
      loss.png          training / validation loss curves
      attention.png     attention heatmap of one validation sentence (translation)
      test_translations.txt / samples.txt

A job reads top to bottom: check the recipe (before any work), claim the folder (`run_folder.RunFolder`), build or
load the tokenizer and model, train (resuming the folder's newest complete checkpoint), save the model, and only
then evaluate it, so an evaluation failure never loses the training.
"""

from __future__ import annotations

import copy
import enum
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
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
    TrainerState,
    TrainingArguments,
    set_seed,
)

from .accelerate_loop import LoopArguments, train_with_accelerate
from .averaging import complete_checkpoints, has_state_file, is_complete_checkpoint, load_averaged_weights
from .data import lm_blocks, lm_token_stream, tokenize_parallel
from .inference import attention_weights, evaluate_perplexity, translate
from .losses import sequence_loss
from .metrics import translation_scores
from .model_card import CardInfo, build_card, hardware_description, plural
from .models import RNNLMForCausalLM, RNNSeq2SeqForConditionalGeneration
from .plotting import plot_attention, plot_loss_curves
from .recipes import RecipeError, config_class, recipe_yaml, validate_recipe
from .run_folder import (
    TRAIN_LOG_ONLY,
    RunFolder,
    RunFolderError,
    run_fingerprint,
    write_file_atomically,
    write_folder_atomically,
)
from .tbptt import TRAINER_DEFAULTS as LM_TRAINER_DEFAULTS
from .tokenization import lm_reads_lines, special_token_ids, tokenizer_kind, train_tokenizer

logger = logging.getLogger(__name__)

ENGINES = ("trainer", "accelerate")
FAMILIES = {"translation": "rnn_seq2seq", "language_modeling": "rnn_lm"}


class NonFiniteLossError(ValueError):
    """Training produced a loss (or weights) that is not a finite number; the run stops without saving a model."""


def default_report_to() -> list[str]:
    """TensorBoard when it is installed, nothing else (no network services)."""
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []


def save_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """Save model, tokenizer and generation config so the folder loads with the Auto classes, with the library
    installed and, through `trust_remote_code=True`, without it (importing the library marks the models for auto
    class, so the modeling files are copied next to the weights).

    The folder is written atomically (`run_folder.write_folder_atomically`): a previous folder stays intact until the
    new one is complete and flushed to disk.
    """
    model.config.use_cache = True  # Trainer turns it off for training

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(folder, write)


# --- the loss and the Trainer the jobs use ------------------------------------------------------------------------


def sequence_loss_function(model: PreTrainedModel, label_smoothing: float = 0.0):
    """Trainer's `compute_loss_func` for our models: `losses.sequence_loss` (label smoothing included), shifted for
    the LM and not for the Seq2Seq model, over `num_items_in_batch` target tokens.

    Trainer's own label smoother shifts labels only for the causal-LM classes it knows, so it would silently compute
    the LM's loss against the wrong tokens; and it removes `labels` before the forward, so the Seq2Seq model then
    gets its decoder inputs from the collator (`DataCollatorForSeq2Seq(model=...)`).
    """
    shift = not model.config.is_encoder_decoder

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return sequence_loss(
            logits, labels, shift=shift, label_smoothing=label_smoothing, num_items_in_batch=num_items_in_batch
        )

    return compute_loss


class _JobTrainerMixin:
    """What the jobs add to `Trainer`:

    - a non-finite training loss stops training at once with a `NonFiniteLossError` (one line), before the
      optimizer step that would spread it into the weights; a callback cannot do this (callbacks never see the
      step's loss, and the logged loss hides non-finite values with `logging_nan_inf_filter`);
    - loading the best checkpoint back of a model with tied weights is quiet: the tied copy is not stored, so
      Trainer's "There were missing keys" warning was about nothing.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"training stopped at step {self.state.global_step + 1}: the training loss is {loss.item()} (not "
                "finite); lower training.learning_rate or check the data. Checkpoints saved before are kept; no "
                "model was saved"
            )
        return loss

    def _issue_warnings_after_load(self, load_result) -> None:
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) != len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))


class JobTrainer(_JobTrainerMixin, Trainer):
    """`Trainer` with the checks of `_JobTrainerMixin`."""


class JobSeq2SeqTrainer(_JobTrainerMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` with the checks of `_JobTrainerMixin`."""


class LossWatch(TrainerCallback):
    """Copies Trainer's log entries into the run's `train.log`, and warns once when the training loss grows to 100
    times the lowest loss logged so far (a run that is diverging)."""

    def __init__(self):
        self.lowest = math.inf
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        logging.getLogger(TRAIN_LOG_ONLY).info("step %d: %s", state.global_step, logs)
        loss = logs.get("loss")
        if loss is None or not math.isfinite(loss):
            return
        if loss > 100 * self.lowest and not self.warned:
            logger.warning(
                "the training loss exploded: %.4g at step %d, lowest %.4g", loss, state.global_step, self.lowest
            )
            self.warned = True
        self.lowest = min(self.lowest, loss)


class TimeLimit(TrainerCallback):
    """Stop training after `seconds` of wall time (the recipe's `time_limit_minutes`): a run sized for a time budget
    (a lent GPU, a CPU hour) ends with its evaluations and best checkpoint instead of being killed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if not control.should_training_stop and time.perf_counter() - self.started > self.seconds:
            logger.info(
                "time limit of %.1f minutes reached at step %d: stopping", self.seconds / 60, state.global_step
            )
            control.should_training_stop = True


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


# --- checking a recipe before any work ----------------------------------------------------------------------------

TRAINER_DEFAULTS = {
    "translation": dict(
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="bleu",
        greater_is_better=True,
        predict_with_generate=True,
        train_sampling_strategy="group_by_length",
        logging_steps=50,
    ),
    "language_modeling": LM_TRAINER_DEFAULTS,  # the same for block and truncated-BPTT training
}


def _one_line(error: BaseException) -> str:
    """An error's message on one line (some, like GenerationConfig's, start with a line break)."""
    text = " ".join(str(error).split())
    return text[:400] if text else type(error).__name__


def trainer_arguments(recipe: dict, output_dir: str | Path) -> TrainingArguments:
    """`Seq2SeqTrainingArguments` / `TrainingArguments` of a job: our defaults, overridden by the recipe's `training`
    section. Checkpoints go to `output_dir/checkpoints`.

    Checkpoints follow evaluations (best-model selection needs both on the same schedule), and without evaluation
    there is no best model to load back. `average_last_checkpoints: N` keeps enough checkpoints to average.
    """
    task, settings = recipe["task"], dict(recipe.get("training") or {})
    cls = Seq2SeqTrainingArguments if task == "translation" else TrainingArguments
    defaults = {
        **TRAINER_DEFAULTS[task],
        "report_to": default_report_to(),
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    evaluation = settings.get("eval_strategy", defaults.get("eval_strategy"))
    if evaluation == "no":
        defaults["load_best_model_at_end"] = False
    else:
        defaults["save_strategy"] = evaluation
        if "eval_steps" in settings:
            defaults["save_steps"] = settings["eval_steps"]
    values = {**defaults, **settings}
    average = recipe.get("average_last_checkpoints")
    if average:
        # Trainer keeps the best checkpoint besides the newest ones: one more.
        needed = average + (1 if values.get("load_best_model_at_end") else 0)
        if values.get("save_strategy") == "no":
            raise RecipeError(
                "recipe: `average_last_checkpoints` needs checkpoints; set training.save_strategy (or eval_strategy)"
            )
        if "save_total_limit" in settings and settings["save_total_limit"] is not None:
            if settings["save_total_limit"] < needed:
                raise RecipeError(
                    f"recipe: `training.save_total_limit` is {settings['save_total_limit']}, but "
                    f"`average_last_checkpoints: {average}` needs at least {needed} checkpoints kept"
                )
        else:
            values["save_total_limit"] = max(values.get("save_total_limit") or 0, needed)
    values["output_dir"] = str(Path(output_dir) / "checkpoints")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"recipe training: {_one_line(error)}") from None


# What the Accelerate engine does by default in a job, as the Trainer engine does (TRAINER_DEFAULTS): evaluate every
# epoch, keep the best checkpoint by validation BLEU (translation) or loss (language models) and load it at the end,
# stop early after `early_stopping_patience` evaluations without improvement, log to TensorBoard when installed.
LOOP_DEFAULTS = {
    "translation": dict(
        eval_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="bleu", greater_is_better=True
    ),
    "language_modeling": dict(
        eval_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False
    ),
}


def loop_arguments(recipe: dict, output_dir: str | Path, fingerprint: str | None = None) -> LoopArguments:
    """The Accelerate loop's arguments: the job defaults (`LOOP_DEFAULTS`), overridden by the recipe's `training`
    section, with the run's fingerprint (a checkpoint of another run is never resumed)."""
    settings = dict(recipe.get("training") or {})
    defaults = {**LOOP_DEFAULTS[recipe["task"]], "report_to": default_report_to()}
    if settings.get("eval_strategy", defaults["eval_strategy"]) == "no":
        defaults["load_best_model_at_end"] = False
    if recipe.get("early_stopping_patience") and "early_stopping_patience" not in settings:
        defaults["early_stopping_patience"] = recipe["early_stopping_patience"]
    average = recipe.get("average_last_checkpoints")
    if average and "save_strategy" not in settings and "save_steps" not in settings:
        defaults["save_strategy"] = "epoch"  # checkpoints to average: one per epoch, as with the Trainer engine
    if average and "save_total_limit" not in settings:
        defaults["save_total_limit"] = average  # (the best checkpoint is kept besides them)
    if recipe.get("time_limit_minutes"):
        defaults["max_train_seconds"] = 60 * recipe["time_limit_minutes"]
    settings = {**defaults, **settings}
    try:
        args = LoopArguments.from_training_section(str(Path(output_dir) / "checkpoints"), settings)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"recipe training: {_one_line(error)}") from None
    args.fingerprint = fingerprint
    if average:
        if args.save_strategy == "no":
            raise RecipeError(
                "recipe: `average_last_checkpoints` needs checkpoints; set training.save_strategy (or save_steps)"
            )
        if args.save_total_limit is not None and args.save_total_limit < average:
            raise RecipeError(
                f"recipe: `training.save_total_limit` is {args.save_total_limit}, but `average_last_checkpoints: "
                f"{average}` needs at least {average} checkpoints kept"
            )
    return args


def generation_config(recipe: dict, base: GenerationConfig) -> GenerationConfig:
    """`base` (the model's generation config) updated with the recipe's `generation` section and validated."""
    settings = dict(recipe.get("generation") or {})
    config = copy.deepcopy(base)
    config.update(**settings)
    try:
        config.validate(strict=True, user_set_attributes=set(settings))
    except ValueError as error:
        raise RecipeError(f"recipe generation: {_one_line(error)}") from None
    return config


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", ".", "~"))


def pretrained_config(model_name_or_path: str, task: str):
    """The config of the model to fine-tune, checked to be of the family the task trains."""
    if _is_local(model_name_or_path) and not (Path(model_name_or_path).expanduser() / "config.json").is_file():
        raise RunFolderError(f"--model-name-or-path {model_name_or_path}: not a model folder (no config.json)")
    import rnn_seq2seq_hf  # noqa: F401  (registers the model types)

    where = str(Path(model_name_or_path).expanduser()) if _is_local(model_name_or_path) else model_name_or_path
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise RunFolderError(f"--model-name-or-path {model_name_or_path}: cannot load ({_one_line(error)})") from None
    if config.model_type != FAMILIES[task]:
        raise RunFolderError(
            f"--model-name-or-path {model_name_or_path} is a {config.model_type!r} model; a {task} job fine-tunes "
            f"{FAMILIES[task]!r} models"
        )
    return config


def _check_model_section_matches(recipe: dict, config) -> None:
    """When fine-tuning, the recipe's `model` section may be empty; a key it sets must equal the loaded model's value,
    except dropout rates, which only change training and are applied."""
    for key, value in (recipe.get("model") or {}).items():
        if "dropout" in key:
            continue
        current = getattr(config, key, None)
        if current != value:
            raise RecipeError(
                f"recipe: `model.{key}: {value!r}` differs from the model being fine-tuned ({current!r}); "
                "fine-tuning keeps the architecture: remove the key or make it match (dropout rates may change)"
            )


def check_recipe(recipe: dict, engine: str = "trainer", model_name_or_path: str | None = None) -> dict:
    """Everything a run will use, checked before any work: the recipe's keys, types and ranges
    (`recipes.validate_recipe`), then the model config, the training arguments and the generation config built as
    the run will build them, so their own checks run now and not after hours of training. Returns the validated
    recipe (float strings converted); raises `RecipeError` (or `RunFolderError` for a starting model that cannot be
    used) with a one-line message.
    """
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {list(ENGINES)}, got {engine!r}")
    recipe = validate_recipe(recipe, engine, pretrained=model_name_or_path is not None)
    task = recipe["task"]
    if model_name_or_path is not None:
        config = pretrained_config(model_name_or_path, task)
        _check_model_section_matches(recipe, config)
        try:  # the config's own checks of the dropout rates the recipe changes
            type(config).from_dict({**config.to_dict(), **recipe["model"]})
        except (ValueError, TypeError) as error:
            raise RecipeError(f"recipe model: {_one_line(error)}") from None
    else:
        vocabulary = recipe["tokenizer"].get("vocab_size") or 1000  # the real size comes from the tokenizer
        try:
            config = config_class(task)(vocab_size=vocabulary, **recipe["model"])
        except (ValueError, TypeError) as error:
            raise RecipeError(f"recipe model: {_one_line(error)}") from None
    if engine == "trainer":
        trainer_arguments(recipe, "unused")
    else:
        loop_arguments(recipe, "unused")
    if task == "translation":
        generation_config(recipe, GenerationConfig.from_model_config(config))
    return recipe


# --- building the model -----------------------------------------------------------------------------------------


def new_config(tokenizer: PreTrainedTokenizerBase, recipe: dict):
    """The config of a new model: the recipe's `model` section, the vocabulary size and token ids of the tokenizer."""
    return config_class(recipe["task"])(vocab_size=len(tokenizer), **special_token_ids(tokenizer), **recipe["model"])


def new_model(config) -> PreTrainedModel:
    return (RNNSeq2SeqForConditionalGeneration if config.is_encoder_decoder else RNNLMForCausalLM)(config)


@dataclass
class Start:
    """The tokenizer and model a run starts from, and where they came from (for the model card)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    tokenizer_origin: str


def _load_pretrained(recipe: dict, model_name_or_path: str) -> Start:
    """The model and tokenizer to fine-tune (the installed library's classes, no remote code), with the recipe's
    dropout rates."""
    local = _is_local(model_name_or_path)
    where = str(Path(model_name_or_path).expanduser()) if local else model_name_or_path
    auto = AutoModelForSeq2SeqLM if recipe["task"] == "translation" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(where, trust_remote_code=False, **(recipe.get("model") or {}))
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise RunFolderError(f"--model-name-or-path {model_name_or_path}: cannot load ({_one_line(error)})") from None
    shown = Path(model_name_or_path).name if local else model_name_or_path  # no path of this machine in the card
    if recipe.get("tokenizer"):
        logger.info("fine-tuning: the tokenizer comes from %s; the recipe's tokenizer section is not used", shown)
    return Start(model, tokenizer, f"the tokenizer of `{shown}`, the model this one was fine-tuned from")


# --- fitting --------------------------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """A trained model and how it was trained."""

    model: PreTrainedModel
    args: object  # TrainingArguments or LoopArguments
    log_history: list[dict]
    steps: int
    epochs: float


def _resume_checkpoint(run: RunFolder, overwrite: bool) -> Path | None:
    """The newest complete checkpoint of the folder, unless the run starts over.

    Trainer writes `trainer_state.json` last, so a newer checkpoint folder without a readable one is what a crash
    while saving left behind: it is removed (Trainer would otherwise count it among the checkpoints it keeps).
    """
    if overwrite:
        return None
    complete = complete_checkpoints(run.checkpoints)
    newest = complete[-1] if complete else None
    newest_step = int(newest.name.split("-")[1]) if newest else -1
    if run.main and run.checkpoints.is_dir():
        for folder in run.checkpoints.glob("checkpoint-*"):
            step = folder.name.split("-")[1]
            if folder.is_dir() and step.isdigit() and int(step) > newest_step and not has_state_file(folder):
                logger.warning("removing %s: a checkpoint whose writing was interrupted", folder)
                shutil.rmtree(folder, ignore_errors=True)
    if newest is not None:
        logger.info("resuming from %s", newest)
    return newest


def _fit_with_trainer(
    start: Start, recipe, collator, run, overwrite, train_features, eval_features, metrics
) -> Fitted:
    """Train with `Seq2SeqTrainer` (best checkpoint by validation BLEU) or `Trainer` (by validation loss)."""
    model, tokenizer = start.model, start.tokenizer
    args = trainer_arguments(recipe, run.folder)
    translation = recipe["task"] == "translation"
    callbacks = [LossWatch()]
    if translation:
        callbacks.append(KeepGenerationConfig(model.generation_config))
    patience = recipe.get("early_stopping_patience")
    if patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
    if recipe.get("time_limit_minutes"):
        callbacks.append(TimeLimit(60 * recipe["time_limit_minutes"]))
    trainer_class = JobSeq2SeqTrainer if translation else JobTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_features,
        eval_dataset=eval_features if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=metrics,
        compute_loss_func=sequence_loss_function(model, args.label_smoothing_factor),
        callbacks=callbacks,
    )
    resume = _resume_checkpoint(run, overwrite)
    state = TrainerState.load_from_json(str(resume / "trainer_state.json")) if resume else None
    if state is not None and state.max_steps and state.global_step >= state.max_steps:
        # Training ended before (the run stopped later, in saving or evaluating). Trainer would train one step past
        # max_steps when resumed from its last checkpoint; take the weights it ended with instead.
        best = run.checkpoints / Path(state.best_model_checkpoint or "none").name  # this folder's, if it moved
        final = best if args.load_best_model_at_end and is_complete_checkpoint(best) else resume
        logger.info("training had ended; the final weights are those of %s", final)
        load_averaged_weights(model, [final])  # the average of one checkpoint: its weights, ties restored
        return Fitted(model, args, state.log_history, state.global_step, state.epoch or 0.0)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    return Fitted(trainer.model, args, state.log_history, state.global_step, state.epoch or 0.0)


def _fit_with_accelerate(start: Start, recipe, collator, run, fingerprint, train_features, eval_features, scorer):
    """Train with the Accelerate loop (crash-safe checkpoints, exact resume)."""
    args = loop_arguments(recipe, run.folder, fingerprint)
    if run.overwrite:
        args.resume = False

    def model_columns(dataset):
        names = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
        return dataset.select_columns(names)

    model, state, _ = train_with_accelerate(
        start.model,
        model_columns(train_features),
        collator,
        args,
        eval_dataset=model_columns(eval_features) if eval_features is not None else None,
        tokenizer=start.tokenizer,
        compute_metrics=scorer,
    )
    processes = PartialState().num_processes
    batches = math.ceil(len(train_features) / (args.per_device_train_batch_size * processes))
    steps_per_epoch = max(1, math.ceil(batches / args.gradient_accumulation_steps))
    return Fitted(model, args, state.log_history, state.step, state.step / steps_per_epoch)


# --- after training: save first, then evaluate --------------------------------------------------------------------


def _check_finite_weights(model: PreTrainedModel) -> None:
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise NonFiniteLossError(f"the trained weight {name} holds values that are not finite; no model was saved")


def _save_final_model(run: RunFolder, recipe: dict, fitted: Fitted, tokenizer) -> Path:
    """Average the last checkpoints if the recipe asks, check the weights, save the model folder and the resolved
    recipe. Runs before any evaluation."""
    model = fitted.model
    average = recipe.get("average_last_checkpoints")
    if average:
        paths = complete_checkpoints(run.checkpoints)[-average:]
        if len(paths) < average:
            raise ValueError(f"{run.checkpoints}: {average} checkpoints to average, found {len(paths)}")
        logger.info("averaging %s", ", ".join(path.name for path in paths))
        load_averaged_weights(model, paths)
    _check_finite_weights(model)
    model_dir = save_model_folder(model, tokenizer, run.folder / "model")
    header = f"# The resolved recipe of this run (source: {recipe.get('source', 'a dict')}).\n"
    write_file_atomically(run.folder / "recipe.yaml", header + recipe_yaml(recipe))
    logger.info("saved %s", model_dir)
    return model_dir


def _copy_into(source: Path, folder: Path) -> None:
    temporary = folder / f".tmp-{source.name}"
    shutil.copyfile(source, temporary)
    os.replace(temporary, folder / source.name)


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def _hyperparameters(fitted: Fitted, recipe: dict, tokenizer_trained: bool) -> dict:
    """What the card lists: the recipe by name, the model and tokenizer settings, and training as it happened (the
    epochs and optimizer steps actually trained, not the recipe's limits)."""
    chosen: dict[str, object] = {"recipe": recipe.get("source", "(given as a dict)")}
    chosen.update({f"model.{key}": value for key, value in (recipe.get("model") or {}).items()})
    if tokenizer_trained:
        chosen.update({f"tokenizer.{key}": value for key, value in (recipe.get("tokenizer") or {}).items()})
    chosen["epochs trained"] = round(float(fitted.epochs), 2)
    chosen["optimizer steps"] = f"{fitted.steps:,}"
    for name in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "label_smoothing_factor",
        "seed",
    ):
        value = _plain(getattr(fitted.args, name, None))
        if value is not None:
            chosen[name] = value
    if recipe.get("average_last_checkpoints"):
        chosen["checkpoints averaged"] = recipe["average_last_checkpoints"]
    return chosen


def _show_progress(recipe: dict) -> bool:
    return not (recipe.get("training") or {}).get("disable_tqdm", False)


# --- the jobs -------------------------------------------------------------------------------------------------------


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
    model_name_or_path: str | None = None,
    overwrite_output_dir: bool = False,
    card_title: str | None = None,
    card_summary: str | None = None,
    attention_example: str | None = None,
) -> dict:
    """Train a Seq2Seq model on `source`/`target` string datasets as the recipe says; returns the final metrics.

    With `engine="trainer"` (`Seq2SeqTrainer`), validation uses `predict_with_generate` (BLEU, chrF, exact match)
    and the best checkpoint by validation BLEU is kept, with early stopping; running the same job again resumes
    from the folder's newest complete checkpoint. With `engine="accelerate"` the data-parallel loop of
    `accelerate_loop.py` trains (crash-safe checkpoints, exact resume) and validates at the end. Either way the
    model is saved, then the test set (or the validation set without one) is translated with the recipe's
    generation settings and scored, on the main process. Launch with `torchrun` / `accelerate launch` for several
    processes; other processes return an empty dict.

    Args:
        model_name_or_path: fine-tune this model (a folder or Hub id of ours) with its tokenizer instead of training
            a new tokenizer and model; the recipe's `model` section must be empty or match it (dropout may change).
        overwrite_output_dir: replace a finished run in `output_dir` and start over instead of resuming.
        card_title, card_summary: the model card's title and first paragraph (default: made from the data).
        attention_example: the source sentence whose attention `attention.png` shows (default: the longest of the
            first 50 validation sentences).
    """
    # 1. Check everything the run will use, and claim the output folder.
    recipe = check_recipe(recipe, engine, model_name_or_path)
    languages = languages or ["src", "tgt"]
    data = {
        f"{name}.{column}": split[column]
        for name, split in (("train", train), ("validation", validation))
        for column in ("source", "target")
    }
    fingerprint = run_fingerprint(recipe, data, engine=engine, start=model_name_or_path)
    output_dir = Path(output_dir)
    with RunFolder(output_dir, fingerprint, overwrite=overwrite_output_dir) as run:
        set_seed((recipe["training"]).get("seed", 42))
        started = time.perf_counter()

        # 2. Tokenizer and model: new ones from the recipe, or the model to fine-tune with its tokenizer.
        if model_name_or_path is None:
            tokenizer = train_tokenizer(list(train["source"]) + list(train["target"]), **recipe["tokenizer"])
            config = new_config(tokenizer, recipe)
            start = Start(new_model(config), tokenizer, "trained on the training text with `tokenizers`")
            start.model.generation_config = generation_config(recipe, GenerationConfig.from_model_config(config))
        else:
            start = _load_pretrained(recipe, model_name_or_path)
            start.model.generation_config = generation_config(recipe, start.model.generation_config)
        model, tokenizer = start.model, start.tokenizer

        # 3. Data: training pairs longer than the recipe's limits are dropped; evaluation data is never filtered.
        data_settings = recipe["data"]
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

        # 4. Train. The collator makes the decoder inputs from the labels (Trainer removes the labels before the
        # forward when it computes the loss itself, with label smoothing).
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        if engine == "accelerate":
            fitted = _fit_with_accelerate(
                start, recipe, collator, run, fingerprint, train_features, validation_features, translation_scores
            )
        else:
            fitted = _fit_with_trainer(
                start, recipe, collator, run, overwrite_output_dir, train_features, validation_features,
                _translation_metrics(tokenizer),
            )  # fmt: skip
        training_seconds = time.perf_counter() - started
        if not PartialState().is_main_process:
            return {}
        model = fitted.model

        # 5. Save the model before anything can fail in evaluation.
        model_dir = _save_final_model(run, recipe, fitted, tokenizer)

        # 6. Evaluate: translate the test set (or the validation set) with the recipe's generation settings.
        evaluation = test if test is not None else validation
        split_name = "test" if test is not None else "validation"
        started_eval = time.perf_counter()
        hypotheses = translate(
            model,
            tokenizer,
            list(evaluation["source"]),
            batch_size=recipe["training"].get("per_device_eval_batch_size", 32),
            progress=_show_progress(recipe),
        )
        scores = translation_scores(hypotheses, list(evaluation["target"]))
        write_file_atomically(output_dir / f"{split_name}_translations.txt", "\n".join(hypotheses) + "\n")
        evaluation_seconds = time.perf_counter() - started_eval

        # 7. Figures and the model card.
        plot_loss_curves(fitted.log_history, output_dir / "loss.png", title="translation model loss")
        _copy_into(output_dir / "loss.png", model_dir)
        attention_file = None
        if model.config.attention_type != "none":
            # the longest of the first validation sentences shows alignment best
            candidates = list(validation["source"][:50])
            example = attention_example or max(candidates, key=lambda text: len(tokenizer.tokenize(text)))
            output = translate(model, tokenizer, [example])[0]
            weights, source_tokens, target_tokens = attention_weights(model, tokenizer, example, output)
            plot_attention(
                weights, source_tokens, target_tokens, output_dir / "attention.png", title=f"{example}  ->  {output}"
            )
            _copy_into(output_dir / "attention.png", model_dir)
            attention_file = "attention.png"
        config = model.config
        direction = f"{languages[0]} to {languages[-1]}"
        card = build_card(
            model,
            tokenizer,
            CardInfo(
                model_name=card_title or f"RNN translation model ({direction}) trained on {dataset_name}",
                summary=card_summary
                or (
                    f"An RNN encoder-decoder ({config.cell_type.upper()}, {config.attention_type} attention) that "
                    f"translates {direction}, trained with rnn_seq2seq_hf on {dataset_name}."
                ),
                training_data=data_description or f"{len(train_features):,} sentence pairs of {dataset_name}.",
                dataset_name=dataset_name,
                dataset_type=dataset_type,
                dataset_split=split_name,
                results={k: scores[k] for k in ("bleu", "bleu_lowercase", "chrf", "exact_match")},
                evaluation_description=(
                    f"On {len(evaluation):,} {split_name} sentences, decoded with "
                    f"{plural(model.generation_config.num_beams, 'beam')}: sacreBLEU (cased, detokenized, 13a), "
                    "lowercased sacreBLEU, chrF, and exact match (in %)."
                ),
                hyperparameters=_hyperparameters(fitted, recipe, model_name_or_path is None),
                training_seconds=training_seconds,
                language=languages,
                usage_example=str(evaluation[0]["source"]),
                attention_image=attention_file,
                examples=[
                    (evaluation[i]["source"], hypotheses[i], evaluation[i]["target"])
                    for i in range(min(5, len(evaluation)))
                ],
                tokenizer_origin=start.tokenizer_origin,
            ),
        )
        write_file_atomically(model_dir / "README.md", card.content)

        # 8. The metrics, last: a folder with model/ and metrics.json holds a finished run.
        metrics = {
            **{name: round(value, 4) for name, value in scores.items()},
            "split": split_name,
            "sentences": len(evaluation),
            "generation": model.generation_config.to_diff_dict(),
            "training_seconds": round(training_seconds, 1),
            "evaluation_seconds": round(evaluation_seconds, 1),
            "optimizer_steps": fitted.steps,
            "epochs": round(float(fitted.epochs), 2),
            "hardware": hardware_description(),
            "train_pairs": len(train_features),
            "recipe": recipe.get("source", ""),
        }
        _write_metrics(output_dir, metrics)
        return metrics


def _translation_metrics(tokenizer):
    """`compute_metrics` of `Seq2SeqTrainer`: BLEU, chrF and exact match of the generated validation outputs."""

    def compute_metrics(prediction) -> dict:
        predictions = np.where(prediction.predictions < 0, tokenizer.pad_token_id, prediction.predictions)
        labels = np.where(prediction.label_ids < 0, tokenizer.pad_token_id, prediction.label_ids)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return translation_scores([h.strip() for h in hypotheses], [r.strip() for r in references])

    return compute_metrics


def _write_metrics(output_dir: Path, metrics: dict) -> None:
    write_file_atomically(output_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")


def _fit_language_model_tbptt(start: Start, recipe, run, fingerprint, streams, engine) -> Fitted:
    """Train with stateful truncated BPTT (tbptt.py): the job's defaults and callbacks as for block training."""
    from .tbptt import TBPTTSettings, fit_language_model_tbptt

    evaluation = recipe.get("evaluation") or {}
    training = dict(recipe.get("training") or {})
    callbacks = [LossWatch()]
    if recipe.get("early_stopping_patience"):
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe["early_stopping_patience"]))
    if recipe.get("time_limit_minutes"):
        callbacks.append(TimeLimit(60 * recipe["time_limit_minutes"]))
        if engine == "accelerate":
            training["max_train_seconds"] = 60 * recipe["time_limit_minutes"]
    if engine == "accelerate" and run.overwrite:
        training["resume"] = False
    model, args, log_history = fit_language_model_tbptt(
        start.model,
        start.tokenizer,
        {split: stream for split, stream in streams.items() if split != "test"},
        training,
        run.folder,
        TBPTTSettings.from_data_section(recipe["data"]),
        engine=engine,
        evaluation_batch_size=evaluation.get("batch_size", 10),
        evaluation_block_size=evaluation.get("block_size"),
        fingerprint=fingerprint,
        report_to=default_report_to(),
        callbacks=callbacks if engine == "trainer" else None,
    )
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    epochs = max((entry.get("epoch", 0) for entry in log_history), default=0.0)
    return Fitted(model, args, log_history, steps, epochs)


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
    model_name_or_path: str | None = None,
    overwrite_output_dir: bool = False,
    card_title: str | None = None,
    card_summary: str | None = None,
) -> dict:
    """Train an RNN LM on fixed-size blocks with `Trainer` (or the Accelerate loop, `engine="accelerate"`); save it,
    then report stateful perplexity on validation and test from the main process. Arguments as `train_translation`.
    """
    # 1. Check everything the run will use, and claim the output folder.
    recipe = check_recipe(recipe, engine, model_name_or_path)
    fingerprint = run_fingerprint(
        recipe, {"train": train_lines, "validation": validation_lines}, engine=engine, start=model_name_or_path
    )
    output_dir = Path(output_dir)
    with RunFolder(output_dir, fingerprint, overwrite=overwrite_output_dir) as run:
        set_seed(recipe["training"].get("seed", 42))
        started = time.perf_counter()

        # 2. Tokenizer and model. Prompts are encoded as they are (no </s>) and padded on the left, as transformers'
        # pipelines expect; the data pipeline adds </s> at line ends itself (word and subword vocabularies).
        if model_name_or_path is None:
            per_line = recipe["tokenizer"].get("kind", "word") != "char"
            texts = train_lines if per_line else ["\n".join(train_lines)]
            tokenizer = train_tokenizer(texts, padding_side="left", add_eos=False, **recipe["tokenizer"])
            start = Start(
                new_model(new_config(tokenizer, recipe)), tokenizer, "trained on the training text with `tokenizers`"
            )
        else:
            start = _load_pretrained(recipe, model_name_or_path)
        model, tokenizer = start.model, start.tokenizer
        kind, per_line = tokenizer_kind(tokenizer), lm_reads_lines(tokenizer)

        # 3. Data: each split as one token stream; training on blocks of block_size + 1 tokens.
        block_size = recipe["data"].get("block_size", 70)
        streams = {
            "train": lm_token_stream(train_lines, tokenizer, per_line),
            "validation": lm_token_stream(validation_lines, tokenizer, per_line),
        }
        if test_lines:
            streams["test"] = lm_token_stream(test_lines, tokenizer, per_line)
        logger.info("tokens: %s", {name: len(stream) for name, stream in streams.items()})
        train_blocks = lm_blocks(streams["train"], block_size)
        validation_blocks = lm_blocks(streams["validation"], block_size)

        # 4. Train: truncated BPTT over the stream with the state carried across windows (`data.stateful`), or
        # independent blocks.
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        if recipe["data"].get("stateful"):
            fitted = _fit_language_model_tbptt(start, recipe, run, fingerprint, streams, engine)
        elif engine == "accelerate":
            fitted = _fit_with_accelerate(
                start, recipe, collator, run, fingerprint, train_blocks, validation_blocks, None
            )
        else:
            fitted = _fit_with_trainer(
                start, recipe, collator, run, overwrite_output_dir, train_blocks, validation_blocks, None
            )
        training_seconds = time.perf_counter() - started
        if not PartialState().is_main_process:
            return {}
        model = fitted.model

        # 5. Save the model before anything can fail in evaluation.
        model_dir = _save_final_model(run, recipe, fitted, tokenizer)

        # 6. Evaluate: perplexity with the state carried across each split, and samples.
        evaluation = recipe.get("evaluation") or {}
        results = {
            split: evaluate_perplexity(
                model,
                stream,
                evaluation.get("batch_size", 10),
                evaluation.get("block_size", block_size),
                progress=_show_progress(recipe),
            )
            for split, stream in streams.items()
            if split != "train"
        }
        samples = _lm_samples(model, tokenizer, recipe.get("sample") or {}, per_line)
        write_file_atomically(output_dir / "samples.txt", samples + "\n")

        # 7. Figures and the model card.
        plot_loss_curves(fitted.log_history, output_dir / "loss.png", title="language model loss")
        _copy_into(output_dir / "loss.png", model_dir)
        unit = "character" if kind == "char" else "token"
        final_split = "test" if "test" in results else "validation"
        card_results = {"perplexity": results[final_split]["perplexity"]}
        if kind == "char":
            card_results["bits_per_character"] = results[final_split]["bits_per_token"]
        level = {"char": "character-level", "word": "word-level"}.get(kind, f"{kind} subword")
        config = model.config
        card = build_card(
            model,
            tokenizer,
            CardInfo(
                model_name=card_title or f"RNN language model trained on {dataset_name}",
                summary=card_summary
                or (
                    f"A {plural(config.num_hidden_layers, 'layer')} {config.cell_type.upper()} {level} language "
                    f"model trained with rnn_seq2seq_hf on {dataset_name}."
                ),
                training_data=data_description or f"{len(streams['train']):,} training {unit}s of {dataset_name}.",
                dataset_name=dataset_name,
                dataset_type=dataset_type,
                dataset_split=final_split,
                results=card_results,
                evaluation_description=(
                    f"Perplexity on the {final_split} text ({results[final_split]['tokens']:,} predicted {unit}s), "
                    "reading it as one stream with the recurrent state carried across blocks."
                ),
                hyperparameters=_hyperparameters(fitted, recipe, model_name_or_path is None),
                training_seconds=training_seconds,
                usage_example=(recipe.get("sample") or {}).get("prompt", "the" if per_line else "\n"),
                samples=samples,
                tokenizer_origin=start.tokenizer_origin,
            ),
        )
        write_file_atomically(model_dir / "README.md", card.content)

        # 8. The metrics, last: a folder with model/ and metrics.json holds a finished run.
        metrics = {
            "tokenizer": kind,
            "vocab_size": len(tokenizer),
            **{f"{split}_perplexity": scores["perplexity"] for split, scores in results.items()},
            **{f"{split}_nats_per_{unit}": scores["nats_per_token"] for split, scores in results.items()},
            **{f"{split}_bits_per_{unit}": scores["bits_per_token"] for split, scores in results.items()},
            **{f"{split}_predicted_tokens": scores["tokens"] for split, scores in results.items()},
            "training_seconds": round(training_seconds, 1),
            "optimizer_steps": fitted.steps,
            "epochs": round(float(fitted.epochs), 2),
            "hardware": hardware_description(),
            "recipe": recipe.get("source", ""),
        }
        _write_metrics(output_dir, metrics)
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


__all__ = [
    "JobSeq2SeqTrainer",
    "JobTrainer",
    "KeepGenerationConfig",
    "LossWatch",
    "NonFiniteLossError",
    "check_recipe",
    "default_report_to",
    "generation_config",
    "loop_arguments",
    "save_model_folder",
    "sequence_loss_function",
    "train_language_model",
    "train_translation",
    "trainer_arguments",
]
