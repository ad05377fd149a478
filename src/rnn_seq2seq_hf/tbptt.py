"""Stateful truncated-BPTT training of the RNN language models with `Trainer` (and the pieces the Accelerate loop
shares): the recurrent state each micro-batch slot carries from one window to the next, the learning rate scaled by
the window length, stateful evaluation split across processes, and one entry point for both engines.

How a step runs (the data side is `lm_streams.py`): micro-batch j of window w continues the streams micro-batch j
of window w - 1 read, so the model starts from the final state that call left, detached (the gradient stops at the
window's start: the truncation). At window 0 of every epoch the state starts from zero. With gradient accumulation
each slot keeps its own state; with several processes each process keeps the states of its own streams.

Resume: the Accelerate loop stores the carried states in its checkpoints (`stream_state_<process>.safetensors`) and
resumes them exactly. `Trainer` checkpoints do not hold them: a resumed `Trainer` run starts its first window from a
zero state (as the first window of an epoch does), logged once; everything after that window is carried again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .lm_streams import POSITION_KEYS, StreamDataLoader, TokenStream
from .models.cache_rnn import RNNCache

logger = logging.getLogger(__name__)


# --- the carried state -------------------------------------------------------------------------------------------


class CarriedState:
    """The recurrent state of every micro-batch slot, carried from window to window.

    `cache_for(epoch, window, slot)` gives the cache the slot's previous window left (None: start from zero, at
    window 0 or when that window was not the one before); `keep(...)` stores the state a window ended with,
    detached.
    """

    def __init__(self):
        self.caches: dict[int, RNNCache] = {}
        self.positions: dict[int, tuple[int, int]] = {}  # slot -> (epoch, window) of the state kept
        self._warned = False

    def cache_for(self, epoch: int, window: int, slot: int) -> RNNCache | None:
        if window > 0 and self.positions.get(slot) == (epoch, window - 1):
            return self.caches[slot]
        if window > 0 and not self._warned:
            logger.info(
                "truncated BPTT: window %d of epoch %d starts from a zero state (no state of the window before it, "
                "e.g. after resuming Trainer from a checkpoint); later windows carry the state again",
                window,
                epoch,
            )
            self._warned = True
        self.caches.pop(slot, None)
        self.positions.pop(slot, None)
        return None

    def keep(self, epoch: int, window: int, slot: int, cache: RNNCache | None) -> None:
        if cache is None:
            raise ValueError("truncated BPTT needs the model's state: call it with use_cache=True")
        self.caches[slot] = cache.detach_()
        self.positions[slot] = (epoch, window)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything as tensors (for a safetensors file): per slot its state, position and seen-token count."""
        tensors = {}
        for slot, cache in self.caches.items():
            for index, tensor in enumerate(cache.get_state()):
                tensors[f"slot{slot}.state{index}"] = tensor.detach().cpu().contiguous()
            epoch, window = self.positions[slot]
            tensors[f"slot{slot}.position"] = torch.tensor([epoch, window, cache.num_seen_tokens], dtype=torch.long)
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore what `state_tensors` returned; raises `ValueError` for a malformed set of tensors."""
        self.caches, self.positions = {}, {}
        slots = sorted({int(name.split(".")[0][4:]) for name in tensors if name.startswith("slot")})
        for slot in slots:
            position = tensors.get(f"slot{slot}.position")
            states = []
            while f"slot{slot}.state{len(states)}" in tensors:
                states.append(tensors[f"slot{slot}.state{len(states)}"].to(device))
            if position is None or position.shape != (3,) or not 1 <= len(states) <= 2:
                raise ValueError(f"the carried state of slot {slot} is incomplete ({sorted(tensors)})")
            cache = RNNCache(states[0].shape[0], len(states))
            cache.set_state(tuple(states))
            epoch, window, seen = (int(value) for value in position)
            cache.num_seen_tokens = seen
            self.caches[slot], self.positions[slot] = cache, (epoch, window)


def split_position(batch: dict) -> tuple[dict, tuple[int, int, int]]:
    """(the model inputs of a micro-batch, its (epoch, window, slot))."""
    inputs = {key: value for key, value in batch.items() if key not in POSITION_KEYS}
    return inputs, tuple(int(batch[key]) for key in POSITION_KEYS)


# --- stateful evaluation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationStream:
    """A validation (or test) text read the standard way: one stream cut into `batch_size` contiguous parts read
    side by side in blocks of `block_size` tokens, the state carried across blocks (as `inference.evaluate_perplexity`
    and `rnn-seq2seq evaluate-lm` read it); the tokens left over by the division form one more part."""

    tokens: np.ndarray
    batch_size: int = 10
    block_size: int = 70

    def __post_init__(self):
        for name in ("batch_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"evaluation `{name}` must be an integer >= 1, got {value!r}")
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or len(tokens) < 2:
            raise ValueError(f"the evaluation text must have at least 2 tokens, got shape {tokens.shape}")
        object.__setattr__(self, "tokens", tokens.astype(np.int64, copy=False))

    def parts(self, process_index: int = 0, num_processes: int = 1) -> list[torch.Tensor]:
        """The `[rows, length]` groups of parts this process reads (rows `process_index::num_processes` of the
        main group; the leftover part goes to the last process)."""
        stream = torch.from_numpy(self.tokens)
        per_part = len(stream) // self.batch_size
        groups = []
        if per_part > 1:
            main = stream[: per_part * self.batch_size].view(self.batch_size, per_part)[process_index::num_processes]
            if len(main):
                groups.append(main)
        leftover_start = per_part * self.batch_size if per_part > 1 else 0
        if len(stream) - leftover_start > 1 and process_index == num_processes - 1:
            groups.append(stream[leftover_start:][None])
        return groups


@torch.no_grad()
def stream_loss(model, evaluation: EvaluationStream, process_index: int = 0, num_processes: int = 1):
    """(sum of the negative log-likelihoods, number of predicted tokens) of this process's parts, float64 and long
    tensors on the model's device (sum them over processes for the whole text). Leaves the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for part in evaluation.parts(process_index, num_processes):
        part = part.to(device)
        cache = None
        for start in range(0, part.shape[1] - 1, evaluation.block_size):
            targets = part[:, start + 1 : start + evaluation.block_size + 1]
            inputs = part[:, start : start + targets.shape[1]]
            out = model(input_ids=inputs, cache=cache, use_cache=True)
            cache = out.cache
            logprobs = out.logits.float().log_softmax(-1)
            nll -= logprobs.gather(-1, targets[..., None]).sum().double()
            count += targets.numel()
    return nll, count


def loss_metrics(nll: torch.Tensor, count: torch.Tensor, prefix: str = "eval") -> dict[str, float]:
    mean = (nll / count.clamp(min=1)).item()
    return {f"{prefix}_loss": mean, f"{prefix}_perplexity": math.exp(min(mean, 50.0)), f"{prefix}_tokens": int(count)}


# --- the learning rate scaled by the window length (AWD-LSTM) ----------------------------------------------------


class ScaledLearningRate:
    """Multiply every parameter group's learning rate by `factor` for one optimizer step, then restore it, so the
    schedule itself is untouched: `with ScaledLearningRate(optimizer, length / bptt): optimizer.step()`.

    AWD-LSTM scales the learning rate of a window by its length over `bptt`, so that short windows (whose loss is a
    mean over fewer steps) move the weights less.
    """

    def __init__(self, optimizer, factor: float):
        self.optimizer, self.factor, self.saved = optimizer, factor, None

    def __enter__(self):
        self.saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor
        return self

    def __exit__(self, *exc):
        for group, lr in zip(self.optimizer.param_groups, self.saved):
            group["lr"] = lr
        return False


class _WindowLengthLearningRate(TrainerCallback):
    """`ScaledLearningRate` around Trainer's optimizer step, with the factor of the window being trained."""

    def __init__(self, trainer: TBPTTTrainer):
        self.trainer, self.scaled = trainer, None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.scaled = ScaledLearningRate(optimizer, self.trainer.window_length / self.trainer.stream.bptt)
        self.scaled.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.scaled is not None:
            self.scaled.__exit__(None, None, None)
            self.scaled = None


# --- Trainer ---------------------------------------------------------------------------------------------------


class TBPTTTrainer(Trainer):
    """`Trainer` for stateful truncated BPTT: trains on `train_stream` (a `TokenStream`: the streams, windows and
    their order are in `lm_streams.py`), carries each slot's state from window to window, and evaluates
    `eval_stream` (an `EvaluationStream`) with the state carried, split across processes.

    Every `Trainer` feature that does not reorder the data works as usual (gradient accumulation, several
    processes with `torchrun`, schedules, logging, checkpoints, the best model by `eval_loss`). Refused: label
    smoothing (Trainer's smoother would shift the already shifted targets). See the module docstring for resuming.

    Args:
        train_stream: the training text and its windows.
        eval_stream: the validation text (needed for evaluations during training).
        scale_lr_by_window_length: scale each step's learning rate by window length / bptt (AWD-LSTM).
        Other arguments: as `Trainer` (`train_dataset` / `eval_dataset` / `data_collator` are not used).
    """

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        *,
        train_stream: TokenStream,
        eval_stream: EvaluationStream | None = None,
        scale_lr_by_window_length: bool = False,
        **kwargs,
    ):
        if not isinstance(train_stream, TokenStream):
            raise ValueError(f"`train_stream` must be a TokenStream, got {type(train_stream).__name__}")
        if eval_stream is not None and not isinstance(eval_stream, EvaluationStream):
            raise ValueError(f"`eval_stream` must be an EvaluationStream, got {type(eval_stream).__name__}")
        if args is not None and args.label_smoothing_factor:
            raise ValueError(
                "`label_smoothing_factor` is not supported with truncated BPTT in Trainer (its label smoother would "
                "shift the already shifted targets); use the Accelerate engine, or 0"
            )
        if args is not None and args.dataloader_persistent_workers:
            raise ValueError(
                "`dataloader_persistent_workers` would keep the first epoch's windows in the workers; truncated BPTT "
                "reads its windows in the main process (set it to False)"
            )
        for name in ("train_dataset", "eval_dataset", "data_collator"):
            if kwargs.get(name) is not None:
                raise ValueError(f"TBPTTTrainer reads `train_stream` / `eval_stream`; do not pass `{name}`")
        args = args or TrainingArguments(output_dir="tbptt_trainer")
        self.stream = train_stream
        self.eval_stream = eval_stream
        self.windows = train_stream.windows(
            args.per_device_train_batch_size, args.gradient_accumulation_steps, args.process_index, args.world_size
        )
        self.carried = CarriedState()
        self.window_length = train_stream.bptt
        # Trainer checks that there is something to evaluate on; the stream is read by `evaluate` below.
        super().__init__(
            model=model,
            args=args,
            train_dataset=self.windows,
            eval_dataset=eval_stream.tokens if eval_stream is not None else None,
            **kwargs,
        )
        if scale_lr_by_window_length:
            self.add_callback(_WindowLengthLearningRate(self))

    def get_train_dataloader(self) -> StreamDataLoader:
        # Each process reads only its own streams, in order: no sampler, no sharding by accelerate, no workers (a
        # micro-batch is a slice of a tensor already in memory).
        return StreamDataLoader(self.windows, pin_memory=self.args.dataloader_pin_memory)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # Trainer's own prediction_step would land here: evaluation is `evaluate` below
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs, (epoch, window, slot) = split_position(inputs)
        self.window_length = inputs["input_ids"].shape[1]
        inputs["cache"] = self.carried.cache_for(epoch, window, slot)
        inputs["use_cache"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.carried.keep(epoch, window, slot, outputs.cache)
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Stateful perplexity of `eval_stream` (each process reads its share of the parts; the sums are added)."""
        if eval_dataset is not None or self.eval_stream is None:
            raise ValueError("TBPTTTrainer evaluates its `eval_stream`; pass one to the constructor")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        nll, count = stream_loss(model, self.eval_stream, self.args.process_index, self.args.world_size)
        model.train(was_training)
        if self.args.world_size > 1:
            nll, count = self.accelerator.reduce(nll, "sum"), self.accelerator.reduce(count, "sum")
        metrics = loss_metrics(nll, count, metric_key_prefix)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


# --- one entry point for both engines ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TBPTTSettings:
    """How truncated BPTT reads the training text (the recipe's `data` section: `block_size`,
    `random_window_lengths`, `scale_lr_by_window_length`)."""

    bptt: int = 35
    random_window_lengths: bool = False
    scale_lr_by_window_length: bool = False

    def __post_init__(self):
        for name in ("random_window_lengths", "scale_lr_by_window_length"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.bptt, bool) or not isinstance(self.bptt, int) or self.bptt < 1:
            raise ValueError(f"`block_size` (the BPTT window) must be an integer >= 1, got {self.bptt!r}")

    @classmethod
    def from_data_section(cls, data: dict) -> TBPTTSettings:
        return cls(
            bptt=data.get("block_size", 35),
            random_window_lengths=data.get("random_window_lengths", False),
            scale_lr_by_window_length=data.get("scale_lr_by_window_length", False),
        )


# TrainingArguments defaults of the LM jobs (training.py uses them for block training too): evaluate and save every
# epoch, keep the best checkpoint by validation loss.
TRAINER_DEFAULTS = dict(
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    load_best_model_at_end=True,
    metric_for_best_model="eval_loss",
    greater_is_better=False,
    logging_steps=50,
)


def fit_language_model_tbptt(
    model,
    tokenizer,
    streams: dict[str, np.ndarray],
    training: dict,
    output_dir: str | Path,
    settings: TBPTTSettings | None = None,
    *,
    engine: str = "trainer",
    evaluation_batch_size: int = 10,
    evaluation_block_size: int | None = None,
    fingerprint: str | None = None,
    report_to: list[str] | None = None,
    callbacks: list | None = None,
):
    """Train an RNN LM with stateful truncated BPTT; returns (model, the engine's arguments, log history).

    Args:
        model: an `RNNLMForCausalLM` (built identically on every process).
        tokenizer: saved with Trainer checkpoints.
        streams: token streams; `"train"` is trained on, `"validation"` (optional) evaluated during training.
        training: the recipe's `training` section (TrainingArguments names, for both engines).
        output_dir: checkpoints go to `output_dir/checkpoints`.
        settings: window length, random lengths, learning-rate scaling.
        engine: "trainer" (`TBPTTTrainer`) or "accelerate" (the loop of `accelerate_loop.py`, with exact resume).
        evaluation_batch_size, evaluation_block_size: how validation is read (default block: the window length).
        fingerprint: the run's fingerprint (Accelerate engine: a checkpoint of another run is never resumed).
        report_to: Trainer's `report_to` default (the recipe's value wins).
        callbacks: `TrainerCallback`s for Trainer (e.g. early stopping, a stop on a non-finite loss).
    """
    if engine not in ("trainer", "accelerate"):
        raise ValueError(f"`engine` must be 'trainer' or 'accelerate', got {engine!r}")
    settings = settings or TBPTTSettings()
    output_dir = Path(output_dir)
    seed = training.get("seed", 42)
    train_stream = TokenStream(streams["train"], settings.bptt, settings.random_window_lengths, seed=seed)
    eval_stream = None
    if streams.get("validation") is not None:
        eval_stream = EvaluationStream(
            streams["validation"], evaluation_batch_size, evaluation_block_size or settings.bptt
        )
    if engine == "accelerate":
        from .accelerate_loop import LoopArguments, train_with_accelerate

        loop_args = LoopArguments.from_training_section(str(output_dir / "checkpoints"), training)
        if fingerprint is not None:
            loop_args.fingerprint = fingerprint
        model, state, _ = train_with_accelerate(
            model,
            train_stream,
            None,
            loop_args,
            eval_dataset=eval_stream,
            tokenizer=tokenizer,
            scale_lr_by_window_length=settings.scale_lr_by_window_length,
        )
        return model, loop_args, state.log_history

    values = {**TRAINER_DEFAULTS, "report_to": report_to if report_to is not None else [], **training}
    values["dataloader_pin_memory"] = values.get("dataloader_pin_memory", torch.cuda.is_available())
    if eval_stream is None or values.get("eval_strategy") == "no":
        values["eval_strategy"], values["load_best_model_at_end"] = "no", False
    elif "save_strategy" not in training:
        values["save_strategy"] = values["eval_strategy"]  # best-model selection needs both on one schedule
        if "eval_steps" in training:
            values["save_steps"] = training["eval_steps"]
    values["output_dir"] = str(output_dir / "checkpoints")
    args = TrainingArguments(**values)
    trainer = TBPTTTrainer(
        model=model,
        args=args,
        train_stream=train_stream,
        eval_stream=eval_stream if args.eval_strategy != "no" else None,
        scale_lr_by_window_length=settings.scale_lr_by_window_length,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer.model, args, trainer.state.log_history


__all__ = [
    "CarriedState",
    "EvaluationStream",
    "ScaledLearningRate",
    "TBPTTSettings",
    "TBPTTTrainer",
    "fit_language_model_tbptt",
    "loss_metrics",
    "split_position",
    "stream_loss",
]
