"""The settings of the Accelerate loop (`LoopArguments`), checked before anything trains.

Names follow `transformers.TrainingArguments` where they mean the same, so one recipe `training:` section drives
both engines (`LoopArguments.from_training_section`). Every value is checked when the arguments are built: a wrong
type (PyYAML reads `1e-3` as the string "1e-3"), a value out of range, or settings that contradict each other raise
a one-line `ValueError` naming the argument, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass

from transformers import SchedulerType, Seq2SeqTrainingArguments

logger = logging.getLogger(__name__)

STRATEGIES = ("no", "steps", "epoch")
# Trainer's names of the optimizers the loop implements: AdamW (torch's, fused or not: the same update) and plain SGD
# (no momentum, as Trainer's "sgd"; the optimizer of the classic RNN language models).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")
REPORTERS = ("none", "all", "tensorboard")


@dataclass
class LoopArguments:
    """Settings of `train_with_accelerate`.

    Evaluation, checkpoints and the best model work as in `Trainer`: `eval_strategy` / `save_strategy` "no",
    "steps" (every `eval_steps` / `save_steps` optimizer steps) or "epoch"; left unset they are "steps" when
    `eval_steps` / `save_steps` is given and "no" otherwise. Checkpoints at the "steps" schedule are also written at
    the last step. `metric_for_best_model` ("loss", "bleu", ... with or without the "eval_" prefix; default "loss")
    picks the best evaluation; `load_best_model_at_end` writes a checkpoint at every evaluation that improves it
    (whatever the save schedule), keeps the best one past `save_total_limit` and loads it after training;
    `early_stopping_patience` stops after that many evaluations without an improvement of more than
    `early_stopping_threshold`.
    """

    output_dir: str
    max_steps: int | None = None  # optimizer steps; None (or -1, Trainer's "unset"): num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    optim: str = "adamw_torch"  # one of OPTIMIZERS
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0  # optimizer steps; a value in (0, 1) is a fraction of all steps (as in Trainer)
    max_grad_norm: float | None = 1.0
    label_smoothing_factor: float = 0.0  # eps of label smoothing (losses.sequence_loss); 0: the model's own loss
    seed: int = 42
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (see the README's mixed-precision policy)
    logging_steps: int = 50
    eval_strategy: str | None = None
    eval_steps: int | None = None
    save_strategy: str | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    metric_for_best_model: str | None = None
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    max_train_seconds: float | None = None  # stop (log, save, evaluate at the end) after this wall time of training
    generation_num_beams: int | None = None  # beams for evaluation (default: the model's generation config)
    generation_max_new_tokens: int | None = None
    # "tensorboard" (logs to output_dir/runs), "all" (what is installed), "none" (or None)
    report_to: None | str | list[str] = "none"  # (this order for HfArgumentParser)
    disable_tqdm: bool = False  # the progress bar (main process only)
    resume: bool = True  # continue from the newest complete checkpoint in output_dir; False: start over
    # What the run is (recipe + data), computed by the caller; a checkpoint of another run is never resumed.
    fingerprint: str | None = None

    def __post_init__(self):
        if self.max_steps == -1:
            self.max_steps = None
        if self.disable_tqdm is None:
            self.disable_tqdm = False
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            _check_type(item.name, getattr(self, item.name), hints[item.name])
        _check_choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _check_choice("optim", self.optim, OPTIMIZERS)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, [kind.value for kind in SchedulerType])
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("max_steps", "logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                _check_at_least(name, getattr(self, name), 1)
        if self.early_stopping_patience is not None:
            _check_at_least("early_stopping_patience", self.early_stopping_patience, 1)
        for name in ("num_train_epochs", "learning_rate", "weight_decay", "warmup_steps", "adam_epsilon"):
            _check_at_least(name, getattr(self, name), 0)
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"`warmup_steps` must be whole steps or a fraction in (0, 1), got {self.warmup_steps}")
        if self.max_steps is None and self.num_train_epochs <= 0:
            raise ValueError(f"`num_train_epochs` must be > 0 without `max_steps`, got {self.num_train_epochs}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be > 0 or None, got {self.max_grad_norm}")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"`label_smoothing_factor` must be in [0, 1), got {self.label_smoothing_factor}")

        if self.eval_strategy is None:
            self.eval_strategy = "steps" if self.eval_steps else "no"
        if self.save_strategy is None:
            self.save_strategy = "steps" if self.save_steps else "no"
        _check_choice("eval_strategy", self.eval_strategy, STRATEGIES)
        _check_choice("save_strategy", self.save_strategy, STRATEGIES)
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps  # as Trainer
        if self.save_strategy == "steps" and self.save_steps is None:
            self.save_steps = 500  # as Trainer
        if self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith(("loss", "perplexity"))
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise ValueError("`load_best_model_at_end` needs evaluations: set `eval_strategy` to 'steps' or 'epoch'")
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise ValueError("`early_stopping_patience` needs evaluations: set `eval_strategy` to 'steps' or 'epoch'")

        reporters = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        unknown = [name for name in reporters if name not in REPORTERS]
        if unknown:
            logger.warning("the Accelerate loop reports only to tensorboard; ignoring report_to %s", unknown)
        self.report_to = [name for name in reporters if name in REPORTERS and name != "none"]

    @property
    def metric_key(self) -> str:
        """The logged name of `metric_for_best_model` ("bleu" -> "eval_bleu")."""
        name = self.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"

    @classmethod
    def from_training_section(cls, output_dir: str, settings: dict) -> LoopArguments:
        """Map a recipe's `training:` section (TrainingArguments names) onto these arguments.

        `bf16: true` / `fp16: true` select the mixed precision and `generation_max_length` sets
        `generation_max_new_tokens`. A key that is neither one of these arguments nor a `Seq2SeqTrainingArguments`
        field is an error naming the nearest valid key (a typo would otherwise train with the default); a
        `TrainingArguments` field the loop does not implement is ignored with a warning that lists them.
        """
        own = {item.name for item in dataclasses.fields(cls)} - {"output_dir"}
        trainer = {item.name for item in dataclasses.fields(Seq2SeqTrainingArguments)}
        unknown = sorted(key for key in settings if key not in own | trainer)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(own | trainer), n=1)
                hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
            raise ValueError(f"unknown training setting {', '.join(hints)}")
        if settings.get("bf16") and settings.get("fp16"):
            raise ValueError("`bf16` and `fp16` are both true: choose one mixed precision")
        values, ignored = {}, []
        for key, value in settings.items():
            if key in own:
                values[key] = value
            elif key in ("bf16", "fp16"):
                if value:
                    values["mixed_precision"] = key
            elif key == "generation_max_length":
                values.setdefault("generation_max_new_tokens", value)
            else:
                ignored.append(key)
        if ignored:
            logger.warning("the Accelerate loop ignores these settings (not implemented): %s", sorted(ignored))
        return cls(output_dir=output_dir, **values)


def _accepts(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, option) for option in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and all(_accepts(item, typing.get_args(hint)[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_type(name: str, value, hint) -> None:
    if _accepts(value, hint):
        return
    expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    hint_text = ""
    if isinstance(value, str):
        try:
            float(value)
            hint_text = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
    raise ValueError(f"`{name}` must be {expected}, got {value!r} ({type(value).__name__}){hint_text}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")


def _check_at_least(name: str, value, minimum) -> None:
    if not value >= minimum:  # also refuses NaN
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")


__all__ = ["LoopArguments"]
