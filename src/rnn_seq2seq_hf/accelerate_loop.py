"""A data-parallel training loop on `accelerate`, with checkpoints that survive crashes and resume exactly.

Launch the same script with `python` (1 process), `accelerate launch --num_processes N` or
`torchrun --nproc_per_node N` (CPU: set ACCELERATE_USE_CPU=1; GPUs: one process per GPU); `accelerate launch
--num_machines M --machine_rank R --main_process_ip IP ...` for several machines.

What it guarantees:
- **Same result on any number of processes.** The loss of every micro-batch is a sum over its target tokens divided
  by the token count of the whole global batch (all processes, all accumulation steps), so N processes with per-device
  batch B/N give the gradient of one process with batch B (DDP averages gradients, hence the factor N).
- **Evaluation counts every example once.** Generated outputs are padded across processes and gathered with
  `gather_for_metrics`, which drops the duplicates that even batching adds when the dataset does not divide.
- **Atomic checkpoints.** A checkpoint is written into `.tmp-checkpoint-<step>/`, completed with `loop_state.json`
  (step, epoch, position in the epoch, log), flushed to disk, then renamed to `checkpoint-<step>/` in one step. A
  crash while saving leaves only the temporary folder, which is ignored and removed; resuming picks the newest
  complete checkpoint.
- **Exact resume.** Model, optimizer, scheduler, gradient scaler and every RNG state are restored; the data order of
  each epoch depends only on (seed, epoch), and the batches already seen in the interrupted epoch are skipped, so a
  resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "loop_state.json"


@dataclass
class LoopArguments:
    """Settings of `train_with_accelerate` (names follow `TrainingArguments` where they mean the same)."""

    output_dir: str
    max_steps: int | None = None  # optimizer steps; None: num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 42
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (see the README's mixed-precision policy)
    save_steps: int | None = None  # checkpoint every N optimizer steps and at the end; None: no checkpoints
    save_total_limit: int | None = 2
    eval_steps: int | None = None  # evaluate every N steps and at the end; None: only at the end
    logging_steps: int = 50
    generation_num_beams: int | None = None  # beams for evaluation (default: the model's generation config)
    generation_max_new_tokens: int | None = None
    resume: bool = True  # continue from the newest complete checkpoint in output_dir, if any
    # What the run is (recipe + data), computed by the caller; a checkpoint of another run is never resumed.
    fingerprint: str | None = None

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1 or None, got {self.max_steps}")

    @classmethod
    def from_training_section(cls, output_dir: str, settings: dict) -> LoopArguments:
        """Map a recipe's `training:` section (TrainingArguments names) onto these arguments.

        `bf16: true` / `fp16: true` select the mixed precision; Trainer-only settings (logging backends, evaluation
        strategies, ...) are ignored with a log line.
        """
        known = {f.name for f in fields(cls)}
        values, ignored = {}, []
        for key, value in settings.items():
            if key in known:
                values[key] = value
            elif key in ("bf16", "fp16") and value:
                values["mixed_precision"] = key
            elif key == "generation_max_length":
                values["generation_max_new_tokens"] = value
            else:
                ignored.append(key)
        if ignored:
            logger.info("accelerate loop: ignoring Trainer-only settings %s", sorted(ignored))
        return cls(output_dir=output_dir, **values)


@dataclass
class LoopState:
    """Where training is; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches (per process) already consumed in `epoch`
    log_history: list[dict] = field(default_factory=list)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (a folder counts only once renamed from its temp name)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: LoopState, total_limit: int | None) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns its folder."""
    final = output_dir / f"checkpoint-{state.step}"
    temporary = output_dir / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        for path in temporary.iterdir():
            _fsync(path)
        _fsync(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)  # the one atomic step: before it the checkpoint does not exist
        _fsync(output_dir)
        if total_limit:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _token_count(batch: dict, causal: bool) -> torch.Tensor:
    """Target tokens of a micro-batch, counted the way the model's loss counts them."""
    labels = batch["labels"][:, 1:] if causal else batch["labels"]
    return (labels != -100).sum()


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


def train_with_accelerate(
    model,
    train_dataset,
    collator,
    args: LoopArguments,
    eval_dataset=None,
    tokenizer=None,
    compute_metrics=None,
    accelerator: Accelerator | None = None,
) -> tuple[torch.nn.Module, LoopState, dict]:
    """Train `model` on `train_dataset` (a map-style dataset of features) and return (unwrapped model, final state,
    final evaluation metrics).

    The model must be built identically on every process (seed before building it). `collator` turns a list of
    features into a batch with `labels`; `compute_metrics(predictions, references) -> dict` scores generated text.
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
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    causal = not model.config.is_encoder_decoder

    train_loader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collator,
        # An explicit generator: creating an epoch's iterator then draws nothing from the global RNG, whose state
        # (dropout masks) checkpoints restore.
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_loader = None
    if eval_dataset is not None:
        eval_dataset = eval_dataset.add_column("example_id", list(range(len(eval_dataset))))
        eval_loader = DataLoader(
            eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=_with_example_ids(collator)
        )
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    accelerator.unwrap_model(model).flatten_recurrent_weights()

    steps_per_epoch = max(1, math.ceil(len(train_loader) / args.gradient_accumulation_steps))
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.warmup_steps, total_steps)
    accelerator.register_for_checkpointing(scheduler)

    state = LoopState()
    checkpoints = complete_checkpoints(output_dir) if args.resume else []
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        state = LoopState(**json.loads((checkpoints[-1] / STATE_FILE).read_text()))
        logger.info("resumed from %s (step %d)", checkpoints[-1], state.step)

    model.train()
    running_loss = torch.zeros((), device=accelerator.device)
    while state.step < total_steps:
        train_loader.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        batches = iter(loader)
        exhausted = False
        while state.step < total_steps and not exhausted:
            window = []
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                    break
                window.append(batch)
            if not window:
                break
            # The global batch's token count: every micro-batch's loss is divided by it.
            local = sum(_token_count(batch, causal) for batch in window)
            global_tokens = accelerator.reduce(local.to(accelerator.device), reduction="sum").clamp(min=1)
            for index, batch in enumerate(window):
                last = index == len(window) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = model(**batch, num_items_in_batch=global_tokens, use_cache=False).loss
                    # DDP averages gradients over processes; undo it so the gradient is the global-batch mean.
                    accelerator.backward(loss * accelerator.num_processes)
                running_loss += loss.detach() * accelerator.num_processes
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batches_in_epoch += len(window)

            if state.step % args.logging_steps == 0 or state.step == total_steps:
                step_loss = accelerator.reduce(running_loss, reduction="mean").item()
                entry = {"step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0]}
                running_loss.zero_()
                state.log_history.append(entry)
                if accelerator.is_main_process:
                    logger.info("%s", entry)
            if args.eval_steps and eval_loader is not None and state.step % args.eval_steps == 0:
                metrics = evaluate(model, eval_loader, accelerator, tokenizer, args, compute_metrics)
                metrics.pop("example_ids")
                state.log_history.append({"step": state.step, **metrics})
            if args.save_steps and (state.step % args.save_steps == 0 or state.step == total_steps):
                save_checkpoint(accelerator, output_dir, state, args.save_total_limit)
        if exhausted:
            state.epoch += 1
            state.batches_in_epoch = 0

    final_metrics = {}
    if eval_loader is not None:
        final_metrics = evaluate(model, eval_loader, accelerator, tokenizer, args, compute_metrics)
        logged = {k: v for k, v in final_metrics.items() if k != "example_ids"}
        state.log_history.append({"step": state.step, **logged})
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), state, final_metrics


__all__ = [
    "LoopArguments",
    "LoopState",
    "complete_checkpoints",
    "evaluate",
    "save_checkpoint",
    "train_with_accelerate",
]
