"""A data-parallel training loop on `accelerate`, with checkpoints that survive crashes and resume exactly.

Launch the same script with `python` (1 process), `accelerate launch --num_processes N` or
`torchrun --nproc_per_node N` (CPU: set ACCELERATE_USE_CPU=1; GPUs: one process per GPU); `accelerate launch
--num_machines M --machine_rank R --main_process_ip IP ...` for several machines (checkpoints need an output folder
that every machine sees).

What it guarantees:
- **Same result on any number of processes.** The loss of every micro-batch is a sum over its target tokens divided
  by the token count of the whole global batch (all processes, all accumulation steps), so N processes with per-device
  batch B/N give the gradient of one process with batch B (DDP averages gradients, hence the factor N).
- **Logged losses as Trainer logs them.** Each step's loss is the global batch's mean token loss; a log entry holds
  the mean over the steps since the previous entry.
- **Evaluation counts every example once.** Generated outputs are padded across processes and gathered with
  `gather_for_metrics`, which drops the duplicates that even batching adds when the dataset does not divide.
  Evaluation (greedy or beam search) draws nothing from the random generators, so evaluating changes nothing in
  training.
- **Checkpoints that run no code, written atomically** (`checkpointing.py`): safetensors and JSON only, in a
  temporary folder renamed when complete, with a manifest of sizes and sha256 that a resume verifies.
- **Exact resume.** Model, optimizer, scheduler, gradient scaler, every process's RNG states and the loop's state
  (position in the epoch, the logging window, the best model, early stopping) are restored; the data order of each
  epoch depends only on (seed, epoch), and the batches already seen in the interrupted epoch are skipped, so a
  resumed run ends with the same weights and the same log as an uninterrupted one.
- **No silent divergence.** A non-finite loss or gradient norm, or non-finite weights before a checkpoint, stop
  training with `TrainingDivergedError`; no checkpoint with such weights is written. A loss more than
  `LOSS_EXPLOSION_FACTOR` times the mean of the recent steps is reported with a warning.

Language models can train with stateful truncated BPTT: pass a `lm_streams.TokenStream` as `train_dataset` (and an
`tbptt.EvaluationStream` as `eval_dataset`). Each process then reads its own streams window after window (no
shuffling), every micro-batch slot starts from the state its previous window left (detached; zero at the start of
an epoch), optionally with the learning rate scaled by the window length (`scale_lr_by_window_length`). The carried
states are part of the checkpoint (`stream_state_<process>.safetensors`), so resume stays exact. One step is one
window of all streams: N processes x k accumulation steps x b streams train like one process with N * k * b streams.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpointing
from .checkpointing import CheckpointError, choose_checkpoint, complete_checkpoints
from .lm_streams import TokenStream
from .loop_arguments import LoopArguments
from .losses import count_target_tokens, sequence_loss
from .tbptt import CarriedState, EvaluationStream, ScaledLearningRate, loss_metrics, split_position, stream_loss

logger = logging.getLogger(__name__)

LOSS_EXPLOSION_FACTOR = 100.0  # warn when a step's loss exceeds this many times the recent mean
LOSS_HISTORY = 50  # steps in that recent mean
LOSS_HISTORY_MIN = 10  # steps needed before warning


class TrainingDivergedError(ValueError):
    """Training produced a non-finite loss, gradient norm or weights and was stopped; nothing non-finite was saved.

    The message is one line: the step, what was not finite, the newest intact checkpoint and what to try.
    """


@dataclass
class LoopState:
    """Where training is; saved with every checkpoint, so a resumed run continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches (per process) already consumed in `epoch`
    log_history: list[dict] = field(default_factory=list)
    window_loss: float = 0.0  # sum of the step losses since the last log entry
    window_steps: int = 0
    recent_losses: list[float] = field(default_factory=list)  # the last LOSS_HISTORY step losses
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None  # folder name of the checkpoint holding the best model
    evaluations_without_improvement: int = 0
    stopped_early: bool = False


def _with_example_ids(collator):
    """Keep each example's index through the collator, so evaluation can show what it scored."""

    def collate(features: list[dict]) -> dict:
        ids = torch.tensor([feature.pop("example_id") for feature in features])
        batch = collator(features)
        batch["example_id"] = ids
        return batch

    return collate


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, tokenizer, args: LoopArguments, compute_metrics=None) -> dict:
    """Loss over all evaluation examples and, for Seq2Seq models, generated outputs scored by `compute_metrics`.

    Every example is scored exactly once whatever the number of processes; the indices scored are returned under
    `example_ids` (sorted) so this can be checked.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    causal = not unwrapped.config.is_encoder_decoder
    nll_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    predictions, references, example_ids = [], [], []
    for batch in loader:
        ids = batch.pop("example_id")
        labels = batch["labels"]
        with accelerator.autocast():
            logits = model(**batch, use_cache=False).logits.float()
        if causal:
            logits, targets = logits[:, :-1], labels[:, 1:]
        else:
            targets = labels
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
        )
        # Sums per example, so duplicated tail examples can be dropped by gather_for_metrics like everything else.
        per_example_nll = nll.view(targets.shape).sum(1).double()
        per_example_tokens = (targets != -100).sum(1)
        ids, per_example_nll, per_example_tokens = accelerator.gather_for_metrics(
            (ids, per_example_nll, per_example_tokens)
        )
        example_ids.extend(ids.tolist())
        nll_sum += per_example_nll.sum()
        tokens += per_example_tokens.sum()
        if not causal and compute_metrics is not None:
            generate_kwargs = {}
            if args.generation_num_beams:
                generate_kwargs["num_beams"] = args.generation_num_beams
            if args.generation_max_new_tokens:
                generate_kwargs["max_new_tokens"] = args.generation_max_new_tokens
            generated = unwrapped.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **generate_kwargs
            )
            generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
            padded_labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            generated, padded_labels = accelerator.gather_for_metrics((generated, padded_labels))
            predictions.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
            padded_labels = torch.where(padded_labels < 0, tokenizer.pad_token_id, padded_labels)
            references.extend(tokenizer.batch_decode(padded_labels, skip_special_tokens=True))
    model.train()
    mean = (nll_sum / tokens.clamp(min=1)).item()
    metrics = {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_examples": len(example_ids)}
    if predictions:
        scores = compute_metrics([p.strip() for p in predictions], [r.strip() for r in references])
        metrics.update({f"eval_{name}": value for name, value in scores.items()})
    metrics["example_ids"] = sorted(example_ids)
    return metrics


# --- one optimizer step ------------------------------------------------------------------------------------------


def _target_tokens(batch: dict, causal: bool) -> torch.Tensor:
    """Target tokens of a micro-batch: its `shift_labels` (truncated BPTT windows) or its labels as the loss counts
    them."""
    if "shift_labels" in batch:
        return (batch["shift_labels"] != -100).sum()
    return count_target_tokens(batch["labels"], causal)


def _micro_batch_loss(
    model, batch: dict, causal: bool, args: LoopArguments, global_tokens: torch.Tensor, unwrapped, carried=None
):
    """Loss of one micro-batch: its summed token losses divided by the token count of the global batch.

    Without label smoothing this is the model's own loss; with it, `losses.sequence_loss` on the logits (the
    Seq2Seq decoder inputs then come from `prepare_decoder_input_ids_from_labels`). With truncated BPTT (`carried`
    given) the micro-batch starts from the state its slot's previous window left, and leaves its own.
    """
    inputs, position = dict(batch), None
    if carried is not None:
        inputs, position = split_position(batch)
        inputs["cache"] = carried.cache_for(*position)
    use_cache = carried is not None
    if not args.label_smoothing_factor:
        outputs = model(**inputs, num_items_in_batch=global_tokens, use_cache=use_cache)
        loss = outputs.loss
    else:
        labels = inputs.pop("labels")
        targets = inputs.pop("shift_labels", None)  # already shifted (truncated BPTT windows)
        if not causal and "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = unwrapped.prepare_decoder_input_ids_from_labels(labels)
        outputs = model(**inputs, use_cache=use_cache)
        loss = sequence_loss(
            outputs.logits,
            labels if targets is None else targets,
            shift=causal and targets is None,
            label_smoothing=args.label_smoothing_factor,
            num_items_in_batch=global_tokens,
        )
    if carried is not None:
        carried.keep(*position, outputs.cache)
    return loss


def _optimizer_step(
    model, window, optimizer, scheduler, accelerator, args, causal, state, carried=None, lr_factor=None
) -> tuple[float, ...]:
    """Forward and backward over the micro-batches of one global batch, then one optimizer step.

    Returns (the global batch's mean token loss, the gradient norm before clipping or NaN if not clipped, the
    learning rate of this step (the schedule's, before any `lr_factor`); the three values Trainer logs). Raises
    `TrainingDivergedError` before the optimizer step if the loss or the gradient norm is not finite. `carried`:
    the truncated-BPTT states; `lr_factor`: multiplies the learning rate of this step only.
    """
    # The global batch's token count: every micro-batch's loss is divided by it.
    local = sum(_target_tokens(batch, causal) for batch in window)
    global_tokens = accelerator.reduce(local.to(accelerator.device), reduction="sum").clamp(min=1)
    step_loss = torch.zeros((), device=accelerator.device)
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = _micro_batch_loss(
                model, batch, causal, args, global_tokens, accelerator.unwrap_model(model), carried
            )
            # DDP averages gradients over processes; undo it so the gradient is the global-batch mean.
            accelerator.backward(loss * accelerator.num_processes)
        step_loss += loss.detach().float() * accelerator.num_processes
    # Every process gets the same value, so all of them stop together if it is not finite.
    step_loss = accelerator.reduce(step_loss, reduction="mean").item()
    if not math.isfinite(step_loss):
        raise _diverged(args, state.step + 1, f"the loss is {step_loss}")
    grad_norm = float("nan")
    if args.max_grad_norm:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        # With fp16 a gradient scaler skips steps with overflowing gradients by itself.
        if not math.isfinite(grad_norm) and accelerator.scaler is None:
            raise _diverged(args, state.step + 1, f"the gradient norm is {grad_norm}")
    learning_rate = scheduler.get_last_lr()[0]
    with ScaledLearningRate(optimizer, lr_factor) if lr_factor is not None else contextlib.nullcontext():
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, learning_rate


def _diverged(args: LoopArguments, step: int, what: str) -> TrainingDivergedError:
    checkpoints = complete_checkpoints(args.output_dir)
    intact = f"the newest checkpoint, {checkpoints[-1].name}, is intact" if checkpoints else "no checkpoint was saved"
    return TrainingDivergedError(
        f"training diverged at step {step}: {what}; {intact}. Try a lower learning_rate, more "
        "warmup_steps or a max_grad_norm"
    )


def _check_weights(model, args: LoopArguments, state: LoopState) -> None:
    """Refuse to go on (and to save) with non-finite weights. All processes hold the same weights, so all agree."""
    parameters = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in parameters])
    if not bool(finite.all()):
        name = parameters[int((~finite).nonzero()[0])][0].removeprefix("module.")
        raise _diverged(args, state.step, f"parameter {name} has non-finite values after the optimizer step")


def _watch_loss(state: LoopState, loss: float) -> None:
    """Warn when a step's loss explodes against the recent mean."""
    history = state.recent_losses
    if len(history) >= LOSS_HISTORY_MIN:
        mean = sum(history) / len(history)
        if mean > 0 and loss > LOSS_EXPLOSION_FACTOR * mean:
            logger.warning(
                "loss exploded at step %d: %.4g, %.0f times the mean of the last %d steps (%.4g)",
                state.step,
                loss,
                loss / mean,
                len(history),
                mean,
            )
    history.append(loss)
    del history[:-LOSS_HISTORY]


# --- reporting ---------------------------------------------------------------------------------------------------


class _Reporter:
    """Log entries to the Python log, the progress bar and TensorBoard (main process only)."""

    def __init__(self, args: LoopArguments, accelerator: Accelerator, total_steps: int, state: LoopState, resumed):
        self.main = accelerator.is_main_process
        self.progress = tqdm(
            total=total_steps,
            initial=state.step,
            desc="training",
            unit="step",
            disable=not self.main or args.disable_tqdm,
            dynamic_ncols=True,
        )
        self.writer = None
        if self.main and args.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if "tensorboard" in args.report_to:
                    raise ValueError(
                        "`report_to` asks for 'tensorboard' but the tensorboard package is not installed: "
                        "pip install tensorboard, or set report_to to 'none'"
                    ) from None
            else:
                # purge_step hides what an interrupted run logged after the checkpoint this run resumed from (what
                # it logged up to that step is in the checkpoint's log too).
                log_dir = Path(args.output_dir) / "runs"
                self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=state.step + 1 if resumed else None)

    def step(self) -> None:
        self.progress.update(1)

    def log(self, entry: dict) -> None:
        if not self.main:
            return
        logger.info("%s", entry)
        if "loss" in entry:
            self.progress.set_postfix(loss=f"{entry['loss']:.4g}", refresh=False)
        if self.writer is not None:
            for name, value in entry.items():
                if name == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                self.writer.add_scalar(tag, value, entry["step"])
            self.writer.flush()

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()


# --- checkpoints -------------------------------------------------------------------------------------------------


def _save(accelerator, args: LoopArguments, state: LoopState, model, optimizer, scheduler, carried=None) -> Path:
    _check_weights(model, args, state)
    if state.best_step == state.step:
        state.best_checkpoint = f"checkpoint-{state.step}"
    keep = None
    if args.load_best_model_at_end and state.best_checkpoint:
        keep = Path(args.output_dir) / state.best_checkpoint
    plain = {"fingerprint": args.fingerprint, "world_size": accelerator.num_processes, "state": asdict(state)}
    return checkpointing.save_checkpoint(
        accelerator,
        Path(args.output_dir),
        state.step,
        plain,
        model,
        optimizer,
        scheduler,
        args.save_total_limit,
        keep,
        process_tensors=carried.state_tensors() if carried is not None else None,
    )


def _on_all_processes(accelerator: Accelerator, action, what: str):
    """Run `action()` on every process; if it raises `CheckpointError` on any of them, raise on all of them (the
    others would otherwise wait forever in the next collective)."""
    error = None
    try:
        result = action()
    except CheckpointError as caught:
        error, result = caught, None
    failures = accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device), reduction="sum")
    if error is not None:
        raise error
    if int(failures):
        raise CheckpointError(f"{what} failed on another process (see its error)")
    return result


def _resume(accelerator, args: LoopArguments, model, optimizer, scheduler, carried=None) -> LoopState | None:
    """Restore the newest usable checkpoint of `args.output_dir` (and the carried truncated-BPTT states into
    `carried`); None if there is none."""
    output_dir = Path(args.output_dir)
    # The main process verifies the checkpoints (sizes, sha256) and tells the others which one to load.
    chosen = _on_all_processes(
        accelerator, lambda: choose_checkpoint(output_dir) if accelerator.is_main_process else None, "resume"
    )
    code = torch.tensor([-1 if chosen is None else int(chosen.name.split("-")[1])], device=accelerator.device)
    step = int(broadcast(code, from_process=0)[0])
    if step < 0:
        return None
    folder = output_dir / f"checkpoint-{step}"

    def load() -> LoopState:
        plain = checkpointing.read_json(folder, checkpointing.LOOP_STATE)
        if not isinstance(plain, dict) or set(plain) != {"fingerprint", "world_size", "state"}:
            raise CheckpointError(f"{folder / checkpointing.LOOP_STATE}: not a loop state of this version")
        if plain["fingerprint"] != args.fingerprint:
            raise CheckpointError(
                f"{folder} belongs to another run: its fingerprint is {plain['fingerprint']!r}, this run's is "
                f"{args.fingerprint!r} (the recipe or the data changed). Start over in a new output folder, or in "
                "this one with resume=False (the CLI's --overwrite-output-dir)"
            )
        if plain["world_size"] != accelerator.num_processes:
            raise CheckpointError(
                f"{folder} was written by {plain['world_size']} processes, this run has {accelerator.num_processes}: "
                "exact resume needs the same number (the data is split by process); start over in a new output folder"
            )
        known = {item.name for item in fields(LoopState)}
        if not isinstance(plain["state"], dict) or not set(plain["state"]) <= known:
            raise CheckpointError(f"{folder / checkpointing.LOOP_STATE}: not a loop state of this version")
        state = LoopState(**plain["state"])
        checkpointing.load_checkpoint(folder, accelerator, model, optimizer, scheduler)
        if carried is not None:
            tensors = checkpointing.read_process_tensors(folder, accelerator.process_index)
            try:
                carried.load_state_tensors(tensors, accelerator.device)
            except ValueError as error:
                name = checkpointing.process_tensor_file(accelerator.process_index)
                raise CheckpointError(f"{folder / name}: {error}") from None
        return state

    state = _on_all_processes(accelerator, load, "loading " + str(folder))
    logger.info("resumed from %s (step %d)", folder, state.step)
    return state


def _load_best(accelerator, args: LoopArguments, state: LoopState, model) -> bool:
    """Load the best checkpoint's weights into `model`; False (with a warning) if it is gone or damaged."""
    folder = Path(args.output_dir) / state.best_checkpoint

    def verify() -> None:
        if accelerator.is_main_process:
            checkpointing.verify_checkpoint(folder)

    def load() -> None:
        checkpointing.load_model_weights(folder, accelerator.unwrap_model(model))

    try:  # verified by the main process first, then loaded by all, each step agreed on by all processes
        _on_all_processes(accelerator, verify, "verifying the best model")
        _on_all_processes(accelerator, load, "loading the best model")
    except CheckpointError as error:
        logger.warning("could not load the best model, keeping the last one: %s", error)
        return False
    logger.info("loaded the best model from %s (%s = %s)", folder.name, args.metric_key, state.best_metric)
    return True


# --- evaluation during training ----------------------------------------------------------------------------------


def _record_evaluation(metrics: dict, args: LoopArguments, state: LoopState) -> None:
    """Track the best evaluation and early stopping (as Trainer and its EarlyStoppingCallback do)."""
    if args.metric_key not in metrics:
        raise ValueError(
            f"`metric_for_best_model` is {args.metric_for_best_model!r} but the evaluation gives "
            f"{sorted(k for k in metrics if k.startswith('eval_'))}"
        )
    value = metrics[args.metric_key]
    best = state.best_metric

    def better(a: float, b: float) -> bool:
        return a > b if args.greater_is_better else a < b

    if best is None or better(value, best):
        state.best_metric, state.best_step = value, state.step
    if best is None or (better(value, best) and abs(value - best) > args.early_stopping_threshold):
        state.evaluations_without_improvement = 0
    else:
        state.evaluations_without_improvement += 1
    if args.early_stopping_patience and state.evaluations_without_improvement >= args.early_stopping_patience:
        state.stopped_early = True
        logger.info(
            "early stopping at step %d: %s did not improve for %d evaluations (best %s at step %s)",
            state.step,
            args.metric_key,
            state.evaluations_without_improvement,
            state.best_metric,
            state.best_step,
        )


def _check_evaluation_setup(args: LoopArguments, causal: bool, eval_dataset, tokenizer, compute_metrics) -> None:
    """Refuse, before training, an evaluation that would fail at its first run."""
    if eval_dataset is None:
        if args.eval_strategy != "no":
            raise ValueError(f"`eval_strategy` is {args.eval_strategy!r} but no `eval_dataset` was given")
        return
    if isinstance(eval_dataset, EvaluationStream):
        always = ("eval_loss", "eval_perplexity", "eval_tokens")
        if not causal:
            raise ValueError("an `EvaluationStream` evaluates a language model, not a Seq2Seq model")
        if args.eval_strategy != "no" and args.metric_key not in always:
            raise ValueError(
                f"`metric_for_best_model` is {args.metric_for_best_model!r}, but stream evaluations give only "
                f"{list(always)}"
            )
        return
    generates = not causal and compute_metrics is not None
    if generates and tokenizer is None:
        raise ValueError("`compute_metrics` scores generated text: pass the `tokenizer` that decodes it")
    always = ("eval_loss", "eval_perplexity", "eval_examples")
    if args.eval_strategy != "no" and args.metric_key not in always and not generates:
        raise ValueError(
            f"`metric_for_best_model` is {args.metric_for_best_model!r}, but evaluations give only {list(always)} "
            "(generation metrics such as BLEU need a Seq2Seq model and `compute_metrics`)"
        )


# --- the loop ----------------------------------------------------------------------------------------------------


def _evaluate_stream(model, evaluation: EvaluationStream, accelerator: Accelerator) -> dict:
    """Stateful perplexity of a text, each process reading its share of the parts; draws nothing random."""
    unwrapped = accelerator.unwrap_model(model)
    nll, count = stream_loss(unwrapped, evaluation, accelerator.process_index, accelerator.num_processes)
    unwrapped.train()
    nll, count = accelerator.reduce(nll, reduction="sum"), accelerator.reduce(count, reduction="sum")
    return loss_metrics(nll, count)


def _evaluate_any(model, eval_dataset, eval_loader, accelerator, tokenizer, args, compute_metrics) -> dict:
    if isinstance(eval_dataset, EvaluationStream):
        return _evaluate_stream(model, eval_dataset, accelerator)
    metrics = evaluate(model, eval_loader, accelerator, tokenizer, args, compute_metrics)
    metrics.pop("example_ids")
    return metrics


def train_with_accelerate(
    model,
    train_dataset,
    collator,
    args: LoopArguments,
    eval_dataset=None,
    tokenizer=None,
    compute_metrics=None,
    accelerator: Accelerator | None = None,
    scale_lr_by_window_length: bool = False,
) -> tuple[torch.nn.Module, LoopState, dict]:
    """Train `model` on `train_dataset` (a map-style dataset of features) and return (unwrapped model, final state,
    final evaluation metrics of the returned model, without `example_ids`; empty without `eval_dataset`).

    The model must be built identically on every process (seed before building it). `collator` turns a list of
    features into a batch with `labels`; `compute_metrics(predictions, references) -> dict` scores generated text.

    Truncated BPTT (language models): `train_dataset` a `TokenStream` (`collator` unused), `eval_dataset` an
    `EvaluationStream`; `scale_lr_by_window_length` scales each step's learning rate by window length / bptt.

    Raises:
        TrainingDivergedError: the loss, gradient norm or weights became non-finite.
        CheckpointError: the checkpoint to resume from is of another run or damaged beyond the fallback.
    """
    accelerator = accelerator or Accelerator(
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate runs {accelerator.num_processes}: each "
            "process would train alone. On CPUs set ACCELERATE_USE_CPU=1, and create no accelerate PartialState "
            "before this loop's Accelerator."
        )
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".tmp-checkpoint-*"):  # left by a crash while saving
            shutil.rmtree(stale)
        if not args.resume:
            for old in checkpointing.checkpoint_folders(output_dir):
                logger.warning("resume=False: removing %s of an earlier run", old)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    causal = not model.config.is_encoder_decoder
    _check_evaluation_setup(args, causal, eval_dataset, tokenizer, compute_metrics)
    streams = train_dataset if isinstance(train_dataset, TokenStream) else None
    if streams is None and scale_lr_by_window_length:
        raise ValueError("`scale_lr_by_window_length` needs truncated BPTT: pass a TokenStream as `train_dataset`")
    if streams is not None and not causal:
        raise ValueError("truncated BPTT (a TokenStream as `train_dataset`) trains a language model, not Seq2Seq")
    regularised = getattr(model.config, "activation_regularization", 0) or getattr(
        model.config, "temporal_activation_regularization", 0
    )
    if args.label_smoothing_factor and regularised:
        raise ValueError(
            "`label_smoothing_factor` computes the loss from the logits, without the model's activation "
            "regularisation (AR/TAR): set one of them to 0"
        )

    # 1. Data, optimizer, schedule. The loaders have their own generators: starting an epoch or an evaluation then
    #    draws nothing from the global RNG, whose state (dropout masks) checkpoints restore. Truncated BPTT reads
    #    each process's own streams in order (lm_streams.py), without a loader.
    train_loader = windows = carried = None
    if streams is not None:
        windows = streams.windows(
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            accelerator.process_index,
            accelerator.num_processes,
        )
        carried = CarriedState()
    else:
        train_loader = DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(args.seed),
        )
    eval_loader = None
    if eval_dataset is not None and not isinstance(eval_dataset, EvaluationStream):
        eval_dataset = eval_dataset.add_column("example_id", list(range(len(eval_dataset))))
        eval_loader = DataLoader(
            eval_dataset,
            batch_size=args.per_device_eval_batch_size,
            collate_fn=_with_example_ids(collator),
            generator=torch.Generator(),
        )
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
    if train_loader is not None:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    accelerator.unwrap_model(model).flatten_recurrent_weights()

    # per process; the same on every process (even batches; truncated BPTT: windows x accumulation steps)
    batches_per_epoch = len(windows) if windows is not None else len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError("`train_dataset` is empty: no batch to train on")
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = math.ceil(args.warmup_steps * total_steps) if args.warmup_steps < 1 else int(args.warmup_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, warmup, total_steps)

    # 2. Resume from the newest complete checkpoint, if any.
    state = _resume(accelerator, args, model, optimizer, scheduler, carried) if args.resume else None
    resumed = state is not None
    state = state or LoopState()
    reporter = _Reporter(args, accelerator, total_steps, state, resumed)

    def log(entry: dict) -> None:
        state.log_history.append(entry)
        reporter.log(entry)

    grad_norm = learning_rate = float("nan")

    def log_window() -> None:
        epoch = state.epoch + state.batches_in_epoch / batches_per_epoch
        loss = state.window_loss / state.window_steps
        entry = {"step": state.step, "epoch": round(epoch, 4), "loss": loss}
        entry["learning_rate"] = learning_rate
        if math.isfinite(grad_norm):
            entry["grad_norm"] = grad_norm
        state.window_loss, state.window_steps = 0.0, 0
        log(entry)

    # 3. Train: one global batch (accumulation window) per optimizer step, then log, evaluate, checkpoint.
    model.train()
    started = time.perf_counter()
    try:
        while state.step < total_steps and not state.stopped_early:
            if windows is not None:
                batches = (
                    {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    for batch in windows.batches(state.epoch, state.batches_in_epoch)
                )
            else:
                train_loader.set_epoch(state.epoch)
                batches = iter(accelerator.skip_first_batches(train_loader, state.batches_in_epoch))
            epoch_ended = False
            while state.step < total_steps and not epoch_ended and not state.stopped_early:
                wanted = min(args.gradient_accumulation_steps, batches_per_epoch - state.batches_in_epoch)
                window = list(itertools.islice(batches, wanted))
                if window:
                    lr_factor = None
                    if scale_lr_by_window_length:
                        lr_factor = window[0]["input_ids"].shape[1] / streams.bptt
                    step_loss, grad_norm, learning_rate = _optimizer_step(
                        model, window, optimizer, scheduler, accelerator, args, causal, state, carried, lr_factor
                    )
                    state.step += 1
                    state.batches_in_epoch += len(window)
                    state.window_loss += step_loss
                    state.window_steps += 1
                    _watch_loss(state, step_loss)
                    reporter.step()
                    if args.max_train_seconds and time.perf_counter() - started > args.max_train_seconds:
                        logger.info(
                            "time limit of %.0f s reached at step %d: stopping", args.max_train_seconds, state.step
                        )
                        total_steps = state.step  # this step is the last: it logs and saves as the last one does
                if len(window) < wanted or state.batches_in_epoch >= batches_per_epoch:
                    state.epoch, state.batches_in_epoch, epoch_ended = state.epoch + 1, 0, True
                if not window:
                    continue

                if state.step % args.logging_steps == 0 or state.step == total_steps:
                    log_window()
                evaluate_now = eval_dataset is not None and (
                    (args.eval_strategy == "steps" and state.step % args.eval_steps == 0)
                    or (args.eval_strategy == "epoch" and epoch_ended)
                )
                if evaluate_now:
                    metrics = _evaluate_any(
                        model, eval_dataset, eval_loader, accelerator, tokenizer, args, compute_metrics
                    )
                    _record_evaluation(metrics, args, state)
                    epoch = state.epoch + state.batches_in_epoch / batches_per_epoch
                    log({"step": state.step, "epoch": round(epoch, 4), **metrics})
                    if state.stopped_early and state.window_steps:
                        log_window()  # the partial logging window of the last step
                last = state.step == total_steps
                save_now = (
                    (args.save_strategy == "steps" and (state.step % args.save_steps == 0 or last))
                    or (args.save_strategy == "epoch" and (epoch_ended or last))
                    or (args.save_strategy != "no" and state.stopped_early)
                    or (args.load_best_model_at_end and evaluate_now and state.best_step == state.step)
                )
                if save_now:
                    _save(accelerator, args, state, model, optimizer, scheduler, carried)
        _check_weights(model, args, state)
    finally:
        reporter.close()

    # 4. The best model, and the final evaluation of the model returned.
    returned_step = state.step
    best_elsewhere = args.load_best_model_at_end and state.best_checkpoint and state.best_step != state.step
    if best_elsewhere and _load_best(accelerator, args, state, model):
        returned_step = state.best_step
    final_metrics = {}
    if eval_dataset is not None:
        logged = [e for e in state.log_history if e.get("step") == returned_step and "eval_loss" in e]
        if logged:
            final_metrics = {k: v for k, v in logged[-1].items() if k.startswith("eval_")}
        else:
            final_metrics = _evaluate_any(
                model, eval_dataset, eval_loader, accelerator, tokenizer, args, compute_metrics
            )
            state.log_history.append({"step": state.step, **final_metrics})
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), state, final_metrics


__all__ = [
    "LOSS_EXPLOSION_FACTOR",
    "CheckpointError",
    "LoopArguments",
    "LoopState",
    "TrainingDivergedError",
    "complete_checkpoints",
    "evaluate",
    "train_with_accelerate",
]
